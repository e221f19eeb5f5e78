"""A finished run as a Workflow Run RO-Crate (Provenance Run Crate 0.5) in a directory of its own:

- ``ro-crate-metadata.json``; the job spec as it ran (the crate's main entity: the workflow, whose steps
  and tools are its ``$.tasks`` entries) and ``plan.json`` (the DAG, each edge with its source:
  explicit, files or llm), copied, with their sha256;
- per task: its run (CreateAction) and step run (ControlAction), ``actions.py``;
- the run (CreateAction of the spec) and the runner's run (OrganizeAction of cmbagent-batch);
- the models (the spec's llm.models and those the ledger recorded), the price tables, and the ledger
  file with its chain's head hash.

Tasks are read from the journals one at a time (``rundir.runview.task_row``), sorted by id; what grows
with the tasks in memory is their ids and the ids of their files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from cmbagent_batch import __version__
from cmbagent_batch.plan.analysis.files import input_sources
from cmbagent_batch.provenance.actions import TaskFacts, task_entities
from cmbagent_batch.provenance.files import DataFiles
from cmbagent_batch.provenance.graph import GraphWriter
from cmbagent_batch.provenance.sources import RunSource
from cmbagent_batch.provenance.vocab import (
    ENGINE,
    LANGUAGE,
    METADATA,
    NO_LICENSE,
    PROFILES,
    RO_CRATE,
    action_status,
    fragment,
    profile_entities,
    property_value,
    ref,
    refs,
)
from cmbagent_batch.rundir.layout import Layout, journal_paths
from cmbagent_batch.rundir.runview import current_states, run_history, task_row
from cmbagent_batch.spec.tasks import by_entry
from cmbagent_batch.states import TaskState

PLAN_FILE = "plan.json"


@dataclass(frozen=True, slots=True)
class CrateSummary:
    """What was written: the metadata file, its size, and the tasks and files it describes."""

    path: str
    bytes: int
    entities: int
    tasks: int
    files: int
    hashed_bytes: int


def write_crate(src: RunSource, crate_dir: str, copy: bool, license_id: str | None,
                warn: Callable[[str], None]) -> CrateSummary:
    """Write the crate of ``src`` into ``crate_dir`` (made if missing; it is empty)."""
    os.makedirs(crate_dir, exist_ok=True)
    spec_id = os.path.basename(src.spec_path)
    shutil.copy2(src.spec_path, os.path.join(crate_dir, spec_id))
    with open(os.path.join(crate_dir, PLAN_FILE), "wb") as fh:
        fh.write(orjson.dumps(src.plan) + b"\n")
    layout = Layout.of(src.run_dir)
    with GraphWriter(crate_dir) as graph:
        files = DataFiles(graph, crate_dir, layout, os.path.dirname(os.path.abspath(src.spec_path)), copy)
        head = [spec_id, files.in_crate(PLAN_FILE, "the plan: the DAG, each edge with its source")]
        graph.add_all(_head(src, license_id))
        sources = input_sources(src.spec.tasks)
        tasks, controls, results = 0, list[str](), list[str]()
        for facts in task_facts(src, layout):
            inputs = files.inputs(sources.get(facts.id, ()))
            outputs = files.outputs(facts.id) if facts.state in (TaskState.SUCCEEDED, TaskState.SKIPPED) else []
            graph.add_all(task_entities(facts, inputs, outputs))
            controls.append(fragment("task", facts.id, "control"))
            results += outputs
            tasks += 1
        ledger = _ledger(src, files, graph, warn)
        external = files.external
        run_id = fragment("run", str(src.manifest["run_id"]))
        graph.add_all(_run(src, run_id, spec_id, external, results + ledger, controls))
        graph.add(_spec(src, spec_id))
        graph.add({"@id": "./", "@type": "Dataset", "name": f"Run {src.manifest['run_id']} of job {src.manifest['job']}",
                   "description": f"What cmbagent-batch ran for the job spec {spec_id}: its plan, every task's "
                                  "run with its inputs and outputs, and the models and cost ledger behind it",
                   "datePublished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "license": ref(license_id or NO_LICENSE), "conformsTo": refs([p[0] for p in PROFILES]),
                   "mainEntity": ref(spec_id), "hasPart": refs(head + list(dict.fromkeys(results + external))
                                                               + ledger),
                   "mentions": ref(run_id)})
    return CrateSummary(graph.path, graph.bytes, graph.entities, tasks, files.count, files.hashed_bytes)


def task_facts(src: RunSource, layout: Layout) -> Iterator[TaskFacts]:
    """Each task of the run, sorted by id, with what its last journal record says."""
    history = run_history(src.run_dir, src.manifest)
    starts = start_times(src.run_dir)
    entry = {tid: t.entry for t, ids in by_entry(src.spec.tasks) for tid in ids}
    try:
        states = sorted(current_states(history, src.runner_gone), key=lambda item: history.ids[item[0]])
        for i, state in states:
            row = task_row(history, i, state, layout, detail=True)
            in_run = history.in_run(i)
            record_run = history.runs[history.run[i]] if history.state_of(i) is not None else None
            started = starts.get(row["id"])
            if state is TaskState.SUCCEEDED and not in_run:
                state = TaskState.SKIPPED
            ended = history.t[i] if history.state_of(i) is not None else None
            yield TaskFacts(row["id"], entry[row["id"]], state, in_run, record_run, row["attempts"], row["rank"],
                            row["host"] or src.manifest.get("host"),
                            started[1] if started is not None and started[0] == record_run else None, ended,
                            row.get("reason"), {k: row.get(k) for k in ("wall_s", "cpu_s", "peak_rss_mb", "exit_code")})
    finally:
        history.close()


def start_times(run_dir: str) -> dict[str, tuple[str, float]]:
    """Each task's latest run in the journals, and when its first attempt in that run started."""
    starts: dict[str, tuple[str, float]] = {}
    for path in journal_paths(run_dir):
        with open(path, "rb") as fh:
            for line in fh:
                if b'"running"' not in line:
                    continue
                try:
                    r = orjson.loads(line)
                    tid, run, t = r["task"], r["run"], float(r["t"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line
                if r.get("state") != "running":
                    continue
                known = starts.get(tid)
                if known is None or (known[0] == run and t < known[1]) or (known[0] != run and t > known[1]):
                    starts[tid] = (run, t)
    return starts


def _head(src: RunSource, license_id: str | None) -> list[dict[str, Any]]:
    """The metadata descriptor, the profiles, cmbagent-batch, the spec's language, the license, the
    models and the price tables."""
    entities: list[dict[str, Any]] = [
        {"@id": METADATA, "@type": "CreativeWork", "about": ref("./"),
         "conformsTo": refs([RO_CRATE, "https://w3id.org/workflowhub/workflow-ro-crate/1.0"])},
        *profile_entities(),
        {"@id": ENGINE, "@type": "SoftwareApplication", "name": "cmbagent-batch", "version": __version__},
        {"@id": LANGUAGE, "@type": "ComputerLanguage", "name": "cmbagent-batch job spec",
         "alternateName": "cmbagent-batch YAML", "version": str(src.spec.version)},
        {"@id": license_id, "@type": "CreativeWork", "name": license_id} if license_id else
        {"@id": NO_LICENSE, "@type": "CreativeWork", "name": "no license given",
         "description": "No license was chosen when this crate was exported (export --license sets one)"},
    ]
    entities += _models(src)
    ledger = src.ledger
    for table, date in (ledger.price_tables.items() if ledger is not None else ()):
        entities.append({"@id": fragment("price-table", table), "@type": "CreativeWork", "name": f"price table {table}",
                         "identifier": table, **({"version": date} if date else {})})
    return entities


def _models(src: RunSource) -> list[dict[str, Any]]:
    """A SoftwareApplication per model: each of the spec's llm.models, and each other the ledger recorded."""
    recorded = src.ledger.models if src.ledger is not None else {}
    out = []
    for key in sorted(set(src.spec.llm.models) | set(recorded)):
        m = src.spec.llm.models.get(key)
        names = recorded.get(key, ())
        model: dict[str, Any] = {"@id": fragment("model", key), "@type": "SoftwareApplication",
                                 "name": m.model if m is not None else names[0], "identifier": key,
                                 "alternateName": list(names), "applicationCategory": "language model"}
        if m is not None:
            model["description"] = (f"llm.models.{key} of the spec: provider {m.provider}, priced by "
                                    f"{m.price_table}" + ("" if key in recorded else "; no call recorded"))
            if m.base_url:
                model["url"] = m.base_url
        else:
            model["description"] = f"recorded in the ledger as {key}; not in the spec's llm.models"
        out.append(model)
    return out


def _spec(src: RunSource, spec_id: str) -> dict[str, Any]:
    """The job spec: the workflow, its entries its steps and tools."""
    entries = [t.entry for t, _ in by_entry(src.spec.tasks)]
    return {"@id": spec_id, "@type": ["File", "SoftwareSourceCode", "ComputationalWorkflow", "HowTo"],
            "name": src.manifest["job"], "encodingFormat": "application/yaml",
            "sha256": src.manifest["spec"]["sha256"], "contentSize": os.path.getsize(src.spec_path),
            "programmingLanguage": ref(LANGUAGE), "hasPart": refs([fragment("tool", str(e)) for e in entries]),
            "step": refs([fragment("step", str(e)) for e in entries]), "subjectOf": ref(PLAN_FILE)}


def _run(src: RunSource, run_id: str, spec_id: str, inputs: list[str], results: list[str],
         controls: list[str]) -> Iterator[dict[str, Any]]:
    """The steps and tools (an entry of $.tasks each), the run, and the runner's run."""
    for t, ids in by_entry(src.spec.tasks):
        what = {"shell": t.run, "python": t.call, "agent": t.instructions}.get(t.kind)
        tool: dict[str, Any] = {"@id": fragment("tool", str(t.entry)), "@type": "SoftwareApplication",
                                "name": f"$.tasks[{t.entry}] {t.id}", "description": f"{t.kind} task: {what}"}
        if t.model:
            tool["softwareRequirements"] = ref(fragment("model", t.model))
        yield tool
        yield {"@id": fragment("step", str(t.entry)), "@type": "HowToStep", "name": f"{t.id} ({len(ids)} tasks)",
               "workExample": ref(tool["@id"])}
    m = src.manifest
    ok = m.get("exit_code") == 0
    times = {k: v for k, v in (("startTime", m.get("started")), ("endTime", m.get("ended"))) if v}
    counts = ", ".join(f"{n} {state}" for state, n in (m.get("counts") or {}).items())
    status = action_status(TaskState.SUCCEEDED if ok else TaskState.FAILED)
    run: dict[str, Any] = {"@id": run_id, "@type": "CreateAction", "name": f"Run {m['run_id']} of {spec_id}",
                           "description": f"{m.get('backend')} backend, {m.get('ranks')} rank(s), on {m.get('host')}: "
                                          f"{counts}", "instrument": ref(spec_id), "actionStatus": status,
                           "object": refs(inputs), "result": refs(list(dict.fromkeys(results))), **times}
    if not ok:
        run["error"] = f"the run ended {m.get('status')} with exit code {m.get('exit_code')}: {counts}"
    yield run
    yield {"@id": run_id + "/runner", "@type": "OrganizeAction", "name": f"cmbagent-batch {__version__} run "
           f"{m['run_id']}", "instrument": ref(ENGINE), "object": refs(controls), "result": ref(run_id),
           "actionStatus": status, **times}


def _ledger(src: RunSource, files: DataFiles, graph: GraphWriter, warn: Callable[[str], None]) -> list[str]:
    """The ledger file (hashed), its chain's head hash and what the check of the chain found."""
    facts = src.ledger
    if facts is None:
        return []
    if facts.problem is not None:
        warn(f"UNVERIFIED: {facts.problem}")
    ledger_id = files.describe(facts.path, "ledger.jsonl", "the cost ledger (hash-chained)")
    head = property_value(fragment("ledger", "head"), "ledger_head", facts.head)
    verdict = "verified" if facts.problem is None else f"UNVERIFIED: {facts.problem}"
    graph.add(head)
    graph.add({"@id": fragment("ledger"), "@type": "CreativeWork", "name": "the cost ledger's chain",
               "description": f"{facts.entries} entries, head {facts.head}, {verdict} ({facts.anchor}); "
                              f"cost ${facts.cost_usd:.6f}",
               "about": ref(ledger_id), "identifier": ref(head["@id"]),
               "mentions": refs([fragment("model", k) for k in facts.models]
                                + [fragment("price-table", t) for t in facts.price_tables])})
    return [ledger_id]
