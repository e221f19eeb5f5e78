"""``load_spec``: a YAML file in, a validated ``JobSpec`` out, or every problem at once."""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from types import MappingProxyType
from typing import Any

from cmbagent_batch.errors import Problem, Severity, SpecError
from cmbagent_batch.spec import checks, gcpause, matrix, schema, taskchecks
from cmbagent_batch.spec.model import (
    AnalysisSpec,
    ExecutionSpec,
    InventorySpec,
    Isolation,
    JobInfo,
    JobSpec,
    LlmSpec,
    ModelSpec,
    SlurmSpec,
    TaskPath,
)
from cmbagent_batch.spec.pricing import SPEC_TABLE, Price, builtin_table, lookup
from cmbagent_batch.spec.tasks import Entry, Tasks, fills
from cmbagent_batch.spec.yamldata import json_path, name_tasks
from cmbagent_batch.spec.yamlio import Document, parse_yaml, read_bytes

# A matrix entry broken the same way in every expansion is reported this many times, then summed up.
MAX_REPEATS = 3
CONFIG_SECTIONS = ("job", "execution", "analysis", "slurm", "llm")
LOCAL_ALIAS = "smollm2-135m-instruct"  # the model name of provider 'local' with the shipped model file


def load_spec(path: str) -> JobSpec:
    """Load, validate and expand the job spec at ``path``; raise ``SpecError`` listing every problem."""
    return load_spec_bytes(read_bytes(path), path)


def load_spec_bytes(raw: bytes, path: str) -> JobSpec:
    with gcpause.paused():
        return _load(raw, path)


def _load(raw: bytes, path: str) -> JobSpec:
    doc = parse_yaml(raw, path)
    data = doc.data
    if not isinstance(data, dict):
        raise SpecError(
            [Problem(path, 1, 1, "$", f"a job spec is a mapping (version, job, tasks, ...), got {schema.describe(data)}")]
        )
    problems = [] if schema.is_valid(data) else schema.problems(doc)
    entries, findings = _expand_tasks(data)
    task_findings, index, deps = taskchecks.check_tasks(entries)
    findings += (task_findings + checks.check_models(data, entries) + checks.check_slurm(data)
                 + checks.check_execution(data))
    problems += _locate(doc, findings)
    if errors := [p for p in problems if p.severity is Severity.ERROR]:
        raise SpecError(name_tasks(_dedupe(errors), data))
    spec = _build(doc, hashlib.sha256(raw).hexdigest(), entries, index, deps)
    if problems:  # warnings only: the spec carries them to the preflight, which says them
        spec = dataclasses.replace(spec, warnings=tuple(name_tasks(_dedupe(problems), data)))
    return spec


def _expand_tasks(data: dict[str, Any]) -> tuple[list[Entry], list[checks.Finding]]:
    tasks = data.get("tasks")
    entries: list[Entry] = []
    findings: list[checks.Finding] = []
    if not isinstance(tasks, list):
        return entries, findings
    total = 0
    for i, entry in enumerate(tasks):
        if not isinstance(entry, dict) or ("matrix" in entry and not _matrix_ok(entry["matrix"])):
            continue  # the schema problems already say what is wrong with it
        findings.extend(checks.Finding(("tasks", i) + p.path, p.message, warning=p.warning)
                        for p in matrix.unknown_placeholders(entry))
        if "matrix" in entry:
            grid, problems = matrix.Grid.of(entry["matrix"])
            findings.extend(checks.Finding(("tasks", i, "matrix") + p.path, p.message) for p in problems)
            if grid is None:
                continue
            body = {k: v for k, v in entry.items() if k != "matrix"}
            names = sorted({*grid.names, *(n for e in grid.extra for n in e)}, key=lambda n: (-len(n), n))
            made = Entry(i, body, grid, fills(body, names), total)
        else:
            made = Entry(i, entry, None, {}, total)
        total += len(made)
        if total > matrix.MAX_TASKS:
            findings.append(checks.Finding(("tasks", i), f"the job expands to over {matrix.MAX_TASKS:,} tasks"))
            break
        entries.append(made)
    return entries, findings


def _matrix_ok(m: Any) -> bool:
    """True when a matrix has the shape expansion needs (the schema reports anything else)."""
    if not isinstance(m, dict) or not m:
        return False
    scalar = (str, int, float, bool)
    for key, values in m.items():
        if key in ("include", "exclude"):
            if not isinstance(values, list) or not all(
                isinstance(e, dict) and e and all(isinstance(v, scalar) for v in e.values()) for e in values
            ):
                return False
        elif not isinstance(values, list) or not values or not all(isinstance(v, scalar) for v in values):
            return False
    return True


def _locate(doc: Document, findings: list[checks.Finding]) -> list[Problem]:
    out = []
    for f in findings:
        line, column = doc.locate(f.path, key=f.key)
        out.append(Problem(doc.file, line, column, json_path(f.path), f.message,
                           severity=Severity.WARNING if f.warning else Severity.ERROR))
    return out


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Sorted, without exact repeats; at most MAX_REPEATS per place, then one line counting the rest."""
    ordered = sorted(set(problems), key=lambda p: (p.line or 0, p.column or 0, p.path, p.message))
    out: list[Problem] = []
    i = 0
    while i < len(ordered):
        place = (ordered[i].line, ordered[i].column, ordered[i].path)
        j = i
        while j < len(ordered) and (ordered[j].line, ordered[j].column, ordered[j].path) == place:
            j += 1
        out.extend(ordered[i:min(j, i + MAX_REPEATS)])
        if j - i > MAX_REPEATS:
            first = ordered[i]
            out.append(Problem(first.file, first.line, first.column, first.path,
                               f"... and {j - i - MAX_REPEATS:,} more problems like these here"))
        i = j
    return out


def _build(doc: Document, sha256: str, entries: list[Entry], index: dict[str, int],
           deps: dict[int, tuple[str, ...]]) -> JobSpec:
    data: dict[str, Any] = doc.data
    job = data["job"]
    llm = data.get("llm", {})
    default_model = llm.get("default_model")
    models = {name: _model(doc, name, entry) for name, entry in llm.get("models", {}).items()}
    analysis = data.get("analysis", {})
    slurm = dict(data.get("slurm", {}))
    if "extra_directives" in slurm:
        slurm["extra_directives"] = tuple(slurm["extra_directives"])
    if isinstance(slurm.get("time"), int):
        slurm["time"] = str(slurm["time"])
    execution = _execution(data.get("execution", {}))
    places = doc.item_places("tasks")
    for e in entries:
        e.finish(places[e.index][0], default_model)
    tasks = Tasks(entries, index, deps, default_model)
    return JobSpec(
        path=doc.file,
        sha256=sha256,
        version=data["version"],
        job=JobInfo(name=job["name"], run_dir=job.get("run_dir", f"runs/{job['name']}"), budget_usd=job.get("budget_usd"),
                    **({"keep_superseded": int(job["keep_superseded"])} if "keep_superseded" in job else {})),
        execution=ExecutionSpec(**execution),
        llm=LlmSpec(default_model=default_model, models=MappingProxyType(models)),
        analysis=AnalysisSpec(
            sources=tuple(analysis.get("sources", ("explicit", "files"))),
            model=analysis.get("model", default_model),
            fallback=analysis.get("fallback", "error"),
        ),
        slurm=SlurmSpec(**slurm),
        tasks=tasks,
        declared=MappingProxyType(_declared(doc)),
        places=MappingProxyType(_places(doc, places)),
    )


def _execution(values: dict[str, Any]) -> dict[str, Any]:
    """The ``execution`` mapping as ``ExecutionSpec`` takes it; ``use_process_pool`` read as ``isolation``
    (``checks.check_execution`` has refused the two contradicting each other)."""
    out = {k: tuple(v) if k in ("keep", "rerun_on") else v for k, v in values.items() if k != "use_process_pool"}
    if "isolation" in out:
        out["isolation"] = Isolation(out["isolation"])
    elif "use_process_pool" in values:
        out["isolation"] = Isolation.from_process_pool(values["use_process_pool"])
    if "path" in out:
        out["path"] = TaskPath(out["path"])
    if "inventory" in values:
        inv: dict[str, Any] = values["inventory"]
        out["inventory"] = InventorySpec(cpus=inv["cpus"], gpus=tuple(str(g) for g in inv.get("gpus", ())),
                                         memory_mb=inv.get("memory_mb"))
    return out


def _declared(doc: Document) -> dict[str, int]:
    """Line of every configuration key written in the file, by dotted name (for ``config``)."""
    out: dict[str, int] = {}
    for section in CONFIG_SECTIONS:
        values = doc.data.get(section)
        if not isinstance(values, dict):
            continue
        for key in values:
            if section == "llm" and key == "models":
                continue
            out[f"{section}.{key}"] = doc.locate((section, key), key=True)[0]
    return out


def _places(doc: Document, items: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Where ``checks.check_python_timeouts`` may point: every python entry (``items``: where each entry
    is), its timeout and models, and ``execution.task_timeout``; it runs after the overlay, when the document is gone."""
    data: dict[str, Any] = doc.data
    out: dict[str, tuple[int, int]] = {}
    if "task_timeout" in data.get("execution", {}):
        out["$.execution.task_timeout"] = doc.locate(("execution", "task_timeout"))
    for i, entry in enumerate(data["tasks"]):
        if entry["kind"] == "python":
            out[f"$.tasks[{i}]"] = items[i]
            for key in ("timeout", "models"):
                if key in entry:
                    out[f"$.tasks[{i}].{key}"] = doc.locate(("tasks", i, key))
    return out


def _model(doc: Document, name: str, entry: dict[str, Any]) -> ModelSpec:
    fields = {k: v for k, v in entry.items() if k != "price"}
    if fields.get("provider") == "local":
        path = fields.get("model_path")
        fields.setdefault("model", posixpath.basename(path).removesuffix(".gguf") if path else LOCAL_ALIAS)
        fields["line"], fields["column"] = doc.locate(("llm", "models", name, "model_path" if path else "provider"))
    if "price" in entry:
        return ModelSpec(name=name, price=Price(**entry["price"]), price_table=SPEC_TABLE, **fields)
    table = builtin_table()
    found = lookup(table, entry["model"])
    assert found is not None  # checks.check_models refuses unpriced models
    return ModelSpec(name=name, price=found[1], price_table=table.id, **fields)
