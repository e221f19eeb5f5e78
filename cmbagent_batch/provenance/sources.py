"""What a run crate is made from, checked before anything is written: the run directory's run.json (a run
that is over), the job spec as it ran (same sha256), its plan (made without any model call, and the
same DAG as the run's), and the cost ledger (its chain checked as ``ledger verify`` checks it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.errors import AnalysisError, UsageError
from cmbagent_batch.ledger.files import ledger_path
from cmbagent_batch.ledger.money import Total
from cmbagent_batch.ledger.reader import consume
from cmbagent_batch.plan.build import schema_form
from cmbagent_batch.plan.cached import cached_plan, read_spec_bytes
from cmbagent_batch.rundir.layout import read_json, runner_gone
from cmbagent_batch.spec.config import effective_config
from cmbagent_batch.spec.loader import load_spec_bytes
from cmbagent_batch.spec.model import JobSpec

Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    """What the run's ledger says: its chain's end, and the models and price tables its calls used."""

    path: str
    entries: int
    head: str
    problem: str | None  # what ``ledger verify`` would say is wrong; None: verified
    anchor: str  # what the chain's end was compared with
    cost_usd: float
    models: Mapping[str, tuple[str, ...]]  # the spec's key of each model called -> the names sent and reported
    price_tables: Mapping[str, str]  # each price table's id -> its date ("" when the entries did not keep it)


@dataclass(frozen=True, slots=True)
class RunSource:
    """A finished run, its spec as it ran, its plan and its ledger."""

    run_dir: str
    manifest: dict[str, Any]
    spec: JobSpec
    spec_path: str
    plan: dict[str, Any]  # as ``plan --format json`` prints it
    ledger: LedgerFacts | None
    runner_gone: bool  # run.json says running, but its runner died without a word


def read_source(run_dir: str, cache_flag: str | None, warn: Warn) -> RunSource:
    """The run in ``run_dir`` with its spec, plan and ledger; ``UsageError`` when it is still going, when
    its spec is gone or changed, or when its plan cannot be made again without a model call."""
    manifest = read_json(os.path.join(run_dir, "run.json"))
    gone = manifest.get("status") == "running" and runner_gone(run_dir)
    if manifest.get("status") == "running" and not gone:
        raise UsageError(f"{run_dir}: a run is using it (run.json says running and its lock is held); "
                         "export it once the run has ended")
    spec_path, recorded = manifest["spec"]["path"], manifest["spec"]["sha256"]
    if not os.path.isfile(spec_path):
        raise UsageError(f"{run_dir}/run.json: the job spec {spec_path} is gone; the crate holds the spec the "
                         "run ran, so put it back")
    raw = read_spec_bytes(spec_path)
    now = hashlib.sha256(raw).hexdigest()
    if now != recorded:
        raise UsageError(f"{spec_path} changed since the run in {run_dir} (sha256 {now[:12]} now, {recorded[:12]} "
                         "then): the crate would describe a job that did not run; restore the spec as it ran, "
                         "or run it again")
    spec = effective_config(load_spec_bytes(raw, spec_path), os.environ, {}).spec
    try:
        made = cached_plan(spec_path, {}, cache_flag, warn, offline=True)
    except AnalysisError as exc:
        raise UsageError(f"{spec_path}: the plan's LLM dependency analysis is not in the cache, and export makes "
                         f"no model call ({exc}); give the --cache-dir the run used") from None
    plan = {k: v for k, v in schema_form(made).items() if k != "from_cache"}
    if manifest.get("dag_sha256") and dag_digest(plan) != manifest["dag_sha256"]:
        raise UsageError(f"{spec_path}: its plan now is not the DAG the run in {run_dir} ran (dag_sha256 "
                         f"{manifest['dag_sha256'][:12]} in run.json): was the analysis cache cleared or changed?")
    return RunSource(run_dir, manifest, spec, spec_path, plan, read_ledger(run_dir), gone)


def dag_digest(plan: Mapping[str, Any]) -> str:
    """run.json's ``dag_sha256`` of a plan: its task ids, then its edges, a line each."""
    h = hashlib.sha256()
    for task in plan["tasks"]:
        h.update(task["id"].encode() + b"\n")
    for e in plan["edges"]:
        h.update(f"{e['from']}\0{e['to']}\n".encode())
    return h.hexdigest()


def read_ledger(run_dir: str) -> LedgerFacts | None:
    """The facts of RUN_DIR/ledger.jsonl, its chain checked as it is read; None when the run has none."""
    path = ledger_path(run_dir)
    if not os.path.isfile(path):
        return None
    models: dict[str, set[str]] = {}
    tables: dict[str, str] = {}
    cost = Total()

    def use(entries: Iterable[dict[str, Any]]) -> None:
        for e in entries:
            names = models.setdefault(e["model"], set())
            names.add(e["requested_model"])
            if e.get("reported_model"):
                names.add(e["reported_model"])
            if e["price_table"] not in tables or e.get("price_table_date"):
                tables[e["price_table"]] = str(e.get("price_table_date") or "")
            cost.add(e["cost_usd"])

    status = consume([path], use, verify=True)[0]
    return LedgerFacts(path, status.entries, status.head, status.problem, status.anchor, cost.value,
                       {k: tuple(sorted(v)) for k, v in sorted(models.items())}, dict(sorted(tables.items())))
