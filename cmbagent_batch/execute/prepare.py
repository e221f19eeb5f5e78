"""What a run needs before anything is launched: the DAG (with the same cached analysis as ``plan``), the
fingerprints, the replayed journals and each task's input files; and whether a task is up to date.
Also used by ``status --explain`` and ``run --only``/``--dry-run``."""

from __future__ import annotations

import fnmatch
import glob
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.ledger.costs import analysis_recorder, job_budget_spent
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.plan.analysis.deps import analyse
from cmbagent_batch.plan.analysis.files import Sources, input_sources
from cmbagent_batch.plan.build import build_dag
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.plan.fingerprint import Fingerprints, fingerprints
from cmbagent_batch.rundir.journal import TaskHistory, replay
from cmbagent_batch.rundir.layout import journal_paths, resolve_run_dir, server_logs
from cmbagent_batch.spec import gcpause
from cmbagent_batch.spec.config import Config
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.states import DONE_STATES, TaskState


@dataclass
class Prepared:
    """Everything the run needs, computed before anything is launched (also used by ``status``)."""

    spec: JobSpec
    dag: Dag
    run_dir: str
    fps: Fingerprints
    history: dict[str, TaskHistory]
    sources: Sources
    analysis: dict[str, Any]
    run_id: str  # of the run about to start; analysis calls made while preparing it are ledgered under it


def prepare(config: Config, cache: Cache, warn: Callable[[str], None], *, refresh: bool = False,
            run_dir: str | None = None, offline: bool = False) -> Prepared:
    with gcpause.paused():
        return _prepare(config, cache, warn, refresh, run_dir, offline)


def _prepare(config: Config, cache: Cache, warn: Callable[[str], None], refresh: bool, run_dir: str | None,
             offline: bool) -> Prepared:
    spec = config.spec
    run_dir = run_dir or resolve_run_dir(spec)
    run_id = uuid.uuid4().hex[:12]
    record = None if offline else analysis_recorder(run_dir, spec, run_id, socket.gethostname())
    analysis = analyse(spec, cache, refresh=refresh, warn=warn, offline=offline, record_calls=record,
                       budget_spent=job_budget_spent(run_dir, spec), server_logs=server_logs(run_dir))
    dag = build_dag(spec, analysis)
    tasks = {t.id: t for t in spec.tasks}
    sources = input_sources(spec.tasks)
    external = {tid: [p for p, matches in entries if not matches] for tid, entries in sources.items()}
    base = os.path.dirname(os.path.abspath(spec.path))
    fps = fingerprints(tasks, {t: dag.dependencies(t) for t in dag.nodes}, external, base)
    history = replay(journal_paths(run_dir), warn)
    return Prepared(spec, dag, run_dir, fps, history, sources, analysis.info, run_id)


def why_rerun(p: Prepared, tid: str) -> str | None:
    """None when the task is up to date; else why it runs (for the run and ``status --explain``).

    ``execution.rerun_on`` names the parts whose change reruns a finished task (spec, inputs, code); an
    upstream change always does. A record journaled before code was fingerprinted (no ``code_fp``) counts
    the code as changed only when one of its files was modified after the task succeeded."""
    h = p.history.get(tid)
    if h is None:
        return "never ran"
    if h.state not in DONE_STATES:
        return f"last run ended {h.record['state']}" + (f": {h.record['reason']}" if h.record.get("reason") else "")
    fp = p.fps[tid]
    old = h.record
    triggers = p.spec.execution.rerun_on
    if old.get("fp") != fp.value:
        if "spec" in triggers and old.get("spec_fp") != fp.spec:
            return "its spec changed"
        if "code" in triggers:
            code = _code_change(p, tid, old)
            if code is not None:
                return code
        if old.get("deps_fp") != fp.deps:
            changed = [d for d in p.dag.dependencies(tid) if why_rerun(p, d) is not None]
            return "upstream changed: " + ", ".join(changed) if changed else "its dependencies changed"
        if "inputs" in triggers and old.get("inputs_fp") != fp.inputs:
            return "its input files changed"
    if not os.path.isdir(os.path.join(p.run_dir, "outputs", tid)) and p.spec.task(tid).outputs:
        return "its published outputs are missing"
    return None


def _code_change(p: Prepared, tid: str, old: dict[str, Any]) -> str | None:
    fp = p.fps[tid]
    deps = p.dag.dependencies(tid)
    if "code_fp" not in old:  # journaled before code was fingerprinted: compare modification times
        since = float(old.get("t") or 0.0)
        if not since or fp.code_mtime <= since:
            return None
        newer = [f.name for f in fp.files if f.mtime > since]
        if newer:
            return "code changed: " + ", ".join(newer)
        ups = [d for d in deps if p.fps[d].code_mtime > since]
        return "upstream changed: " + ", ".join(ups) if ups else None
    if old["code_fp"] == fp.code:
        return None
    before: dict[str, str] = old.get("code_files") or {}
    now = fp.hashes
    files = sorted(n for n in before.keys() | now.keys() if before.get(n) != now.get(n))
    if files:
        return "code changed: " + ", ".join(files)
    ups = [d for d in deps if _journaled_code(p, d) != p.fps[d].code]
    return "upstream changed: " + ", ".join(ups or deps)


def _journaled_code(p: Prepared, tid: str) -> str | None:
    h = p.history.get(tid)
    return None if h is None else h.record.get("code_fp")


def input_links(p: Prepared, tid: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Input files to link into the task's work directory, (source, relative destination), and what
    is missing. An input no task writes comes from the spec file's directory."""
    entries = p.sources.get(tid)
    if not entries:
        return [], []
    links: set[tuple[str, str]] = set()
    missing = []
    base = os.path.dirname(os.path.abspath(p.spec.path))
    for pattern, matches in entries:
        norm = os.path.normpath(pattern)
        found = 0
        if not matches:
            for path in sorted(glob.glob(os.path.join(base, norm))):
                links.add((path, os.path.relpath(path, base)))
                found += 1
            if not found:
                missing.append(f"input {pattern!r} not found: no task writes it and {base} has no such file")
            continue
        for producer, _ in matches:
            root = os.path.join(p.run_dir, "outputs", producer)
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    if rel == norm or fnmatch.fnmatchcase(rel, norm):
                        links.add((os.path.join(root, rel), rel))
                        found += 1
        if not found:
            missing.append(f"input {pattern!r} not found in the published outputs of "
                           + ", ".join(repr(m[0]) for m in matches))
    return sorted(links), missing


def task_runs(p: Prepared, selected: set[str] | None = None) -> dict[str, TaskRun]:
    """The scheduler's view of every task: what is up to date (or not ``selected``) is skipped."""
    ex = p.spec.execution
    runs: dict[str, TaskRun] = {}
    weights = p.dag.bottom_levels()
    tasks = {t.id: t for t in p.spec.tasks}
    for tid in p.dag.nodes:
        t = tasks[tid]
        h = p.history.get(tid)
        before = h.attempts if h else 0
        r = TaskRun(id=tid, kind=t.kind, priority=weights[tid], retries=ex.retries if t.retries is None else t.retries,
                    cpus=t.resources.cpus, memory_mb=float(t.resources.memory_mb or 0), deps=p.dag.dependencies(tid),
                    dependents=p.dag.dependents(tid), attempts=before, attempts_before=before)
        if why_rerun(p, tid) is None:
            r.state = TaskState.SKIPPED
            r.reason = "succeeded in an earlier run; unchanged"
        elif selected is not None and tid not in selected:
            r.state = TaskState.SKIPPED
            r.reason = "not selected by --only"
        runs[tid] = r
    return runs
