"""What a run needs before anything is launched: the DAG (with the same cached analysis as ``plan``), the
fingerprints, the replayed journals and each task's input files; and whether a task is up to date.
Also used by ``status --explain`` and ``run --only``/``--dry-run``."""

from __future__ import annotations

import fnmatch
import glob
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import filterfalse
from typing import Any

from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.ledger.costs import analysis_recorder, job_budget_spent
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.plan.analysis.deps import analyse
from cmbagent_batch.plan.analysis.files import Sources, input_sources
from cmbagent_batch.plan.build import build_dag
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.plan.fingerprint import Fingerprints, fingerprints
from cmbagent_batch.rundir.history import History, load_history
from cmbagent_batch.rundir.layout import Layout, journal_path, journal_paths, resolve_run_dir, server_logs
from cmbagent_batch.rundir.runview import UP_TO_DATE
from cmbagent_batch.spec import gcpause
from cmbagent_batch.spec.config import Config
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.tasks import Tasks, entries_of
from cmbagent_batch.states import DONE_STATES, TaskState


@dataclass
class Prepared:
    """Everything the run needs, computed before anything is launched (also used by ``status``)."""

    spec: JobSpec
    dag: Dag
    run_dir: str
    fps: Fingerprints
    history: History  # what the journals say of every task
    sources: Sources
    analysis: dict[str, Any]
    run_id: str  # of the run about to start; analysis calls made while preparing it are ledgered under it
    layout: Layout  # where each task's work directory and published outputs are
    stale: set[str] | None = None  # the tasks not up to date (``stale_tasks``), once asked for
    published: set[str] | None = None  # the tasks with a published outputs directory, once asked for


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
    sources = input_sources(spec.tasks)
    external = {tid: [p for p, matches in entries if not matches] for tid, entries in sources.items()}
    base = os.path.dirname(os.path.abspath(spec.path))
    fps = fingerprints(spec.tasks, dag, external, base)  # no task is made for it
    history = load_history(os.path.dirname(journal_path(run_dir, 0)), journal_paths(run_dir), warn)
    return Prepared(spec, dag, run_dir, fps, history, sources, analysis.info, run_id, Layout.of(run_dir))


def why_rerun(p: Prepared, tid: str) -> str | None:
    """None when the task is up to date; else why it runs (for the run and ``status --explain``).

    ``execution.rerun_on`` names the parts whose change reruns a finished task (spec, inputs, code); an
    upstream change always does. A record journaled before code was fingerprinted (no ``code_fp``) counts
    the code as changed only when one of its files was modified after the task succeeded."""
    return None if tid not in stale_tasks(p) else _why(p, tid, explain=True)


def stale_tasks(p: Prepared) -> set[str]:
    """The tasks that are not up to date (whose ``why_rerun`` is not None), found once for the run:
    ``--only``, the input check, ``--dry-run`` and the scheduler's view all ask. A task whose last record
    is a success with its fingerprint costs a comparison of bytes (and the look for its published
    outputs, if it has some); only the others are looked at part by part."""
    if p.stale is None:
        changed = set(p.history.not_done_with(p.fps.digests()) if len(p.history) else p.dag.nodes)
        stale = {tid for tid in changed if _why(p, tid, explain=False) is not None}
        to_look = _with_outputs(p.spec) - changed
        p.stale = stale | (to_look - _published(p)) if to_look else stale
    return p.stale


def _why(p: Prepared, tid: str, explain: bool) -> str | None:
    """``why_rerun``; without ``explain``, the upstream tasks that changed are not named (so a chain of
    changed tasks is not walked again for each of them)."""
    h = p.history.get(tid)
    if h is None:
        return "never ran"
    if h.state not in DONE_STATES:
        return f"last run ended {h.record['state']}" + (f": {h.record['reason']}" if h.record.get("reason") else "")
    fp = p.fps[tid]
    triggers = p.spec.execution.rerun_on
    if h.fp != fp.value:
        old = Journaled.of(h.record)
        if "spec" in triggers and not _same(old.spec, fp.spec):
            return "its spec changed"
        if "code" in triggers:
            code = _code_change(p, tid, old, h.t)
            if code is not None:
                return code
        if not _same(old.deps, fp.deps):
            if not explain:
                return "its dependencies changed"
            changed = [d for d in p.dag.dependencies(tid) if _why(p, d, explain=False) is not None]
            return "upstream changed: " + ", ".join(changed) if changed else "its dependencies changed"
        if "inputs" in triggers and not _same(old.inputs, fp.inputs):
            return "its input files changed"
        if all(_same(a, b) for a, b in ((old.spec, fp.spec), (old.code, fp.code), (old.inputs, fp.inputs))):
            return "its fingerprint changed"  # its parts agree as far as the record keeps them
    if _has_outputs(p.spec, tid) and tid not in _published(p):
        return "its published outputs are missing"
    return None


@dataclass(frozen=True)
class Journaled:
    """The parts of a task's fingerprint that its success record kept (``Fingerprint.to_dict``): each the
    first hex digits of the part (the whole part, in records of earlier versions; None when missing)."""

    spec: str | None
    deps: str | None
    inputs: str | None
    code: str | None  # None: journaled before code was fingerprinted
    files: Mapping[str, str] | str  # the hashes of the task's own files, or their key in the code sets

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Journaled:
        parts = record.get("parts")
        if isinstance(parts, str):
            fields = parts.split(".")
            if len(fields) not in (4, 5):  # not a record this version reads: every part counts as changed
                return cls(None, None, None, "", "")
            spec, deps, inputs, code = fields[:4]
            return cls(spec, deps, inputs, code, fields[4] if len(fields) == 5 else code)
        return cls(record.get("spec_fp"), record.get("deps_fp"), record.get("inputs_fp"), record.get("code_fp"),
                   record.get("code_files") or {})


def _same(journaled: str | None, now: str) -> bool:
    """Whether a part as journaled (whole, or its first digits) is the part ``now``."""
    return isinstance(journaled, str) and now.startswith(journaled) and (journaled == "") == (now == "")


def _code_change(p: Prepared, tid: str, old: Journaled, since: float) -> str | None:
    fp = p.fps[tid]
    deps = p.dag.dependencies(tid)
    if old.code is None:  # journaled before code was fingerprinted: compare modification times
        if not since or fp.code_mtime <= since:
            return None
        newer = [f.name for f in fp.files if f.mtime > since]
        if newer:
            return "code changed: " + ", ".join(newer)
        ups = [d for d in deps if p.fps[d].code_mtime > since]
        return "upstream changed: " + ", ".join(ups) if ups else None
    if _same(old.code, fp.code):
        return None
    before = old.files if not isinstance(old.files, str) else p.history.code_files(old.files)
    if before is None:
        return "code changed (its files' hashes are not in journal/index)"
    now = fp.hashes
    files = sorted(n for n in before.keys() | now.keys() if before.get(n) != now.get(n))
    if files:
        return "code changed: " + ", ".join(files)
    ups = [d for d in deps if not _same(_journaled_code(p, d), p.fps[d].code)]
    return "upstream changed: " + ", ".join(ups or deps)


def _journaled_code(p: Prepared, tid: str) -> str | None:
    h = p.history.get(tid)
    return None if h is None else Journaled.of(h.record).code


def _with_outputs(spec: JobSpec) -> set[str]:
    """The tasks that declare outputs: per entry when its tasks' outputs are the same."""
    entries = entries_of(spec.tasks)
    if entries is None:
        return {t.id for t in spec.tasks if t.outputs}
    found: set[str] = set()
    for e in entries:
        if e.template is not None and not e.varies("outputs"):
            if e.template.outputs:
                found.update(e.ids)
        else:
            found.update(tid for k, tid in enumerate(e.ids) if e.field("outputs", k))
    return found


def _has_outputs(spec: JobSpec, tid: str) -> bool:
    return bool(spec.tasks.field(spec.position(tid), "outputs") if isinstance(spec.tasks, Tasks)
                else spec.task(tid).outputs)


def _published(p: Prepared) -> set[str]:
    """The tasks that have a published outputs directory (``Layout.published``), found once: one listing
    of ``outputs/`` and one of each of its shards, rather than a look per task."""
    if p.published is None:
        depth = p.layout.place("t").count(os.sep)  # the directories between outputs/ and a task's
        root = p.layout.published("t")
        for _ in range(depth + 1):
            root = os.path.dirname(root)
        dirs = [root]
        for _ in range(depth):
            dirs = [e.path for d in dirs for e in _listing(d) if e.is_dir()]
        p.published = {e.name for d in dirs for e in _listing(d) if e.is_dir()}
    return p.published


def _listing(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as found:
            return list(found)
    except (FileNotFoundError, NotADirectoryError):
        return []


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
            root = p.layout.published(producer)
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


NOT_SELECTED = "not selected by --only"


@dataclass
class RunTable:
    """What a run is about: the scheduler's view of each task it runs (their dependencies and dependents
    among them alone: one skipped counts as done), and how many it skips."""

    runs: dict[str, TaskRun]
    skipped: int


def task_runs(p: Prepared, selected: set[str] | None = None, unplaceable: Mapping[str, str] | None = None) -> RunTable:
    """The tasks to run (not up to date, ``selected`` when given, and neither ``unplaceable`` (task id: why it
    can never fit where the run is) nor depending on one), each as the scheduler sees it; the others are
    skipped, and said so in the run table of ``p.history`` (no object is made for them)."""
    ex = p.spec.execution
    stale = stale_tasks(p)
    wanted = stale if selected is None else stale & selected
    groups: list[tuple[Iterable[str], TaskState, str]] = [
        (filterfalse(stale.__contains__, p.dag.nodes) if stale else p.dag.nodes, TaskState.SKIPPED, UP_TO_DATE),
        (stale - selected if selected is not None else (), TaskState.SKIPPED, NOT_SELECTED)]
    if unplaceable:
        notes = unplaceable_notes(p, wanted, unplaceable)
        wanted = wanted - notes.keys()
        by_note: dict[str, list[str]] = {}
        for tid in sorted(notes):
            by_note.setdefault(notes[tid], []).append(tid)
        groups += [(ids, TaskState.SKIPPED, note) for note, ids in by_note.items()]
    chosen = sorted(wanted)  # in the order of the DAG's nodes (by id)
    p.history.plan_run(p.run_id, [*groups, (chosen, TaskState.PENDING, "")])
    runs: dict[str, TaskRun] = dict.fromkeys(chosen)  # type: ignore[assignment]  # made below, once the set is known
    weights = p.dag.bottom_levels() if runs else {}
    for tid in runs:
        t = p.spec.task(tid)
        h = p.history.get(tid)
        before = h.attempts if h else 0
        runs[tid] = TaskRun(id=tid, kind=t.kind, priority=weights[tid],
                            retries=ex.retries if t.retries is None else t.retries, shape=t.resources,
                            deps=_among(p.dag.dependencies(tid), runs), dependents=_among(p.dag.dependents(tid), runs),
                            attempts=before, attempts_before=before)
    return RunTable(runs, len(p.dag.nodes) - len(runs))


def unplaceable_notes(p: Prepared, wanted: set[str], unplaceable: Mapping[str, str]) -> dict[str, str]:
    """Why each of the ``wanted`` tasks that can never fit (``unplaceable``: task id: why), or depends on
    one, is skipped."""
    cut = {tid for tid in wanted if tid in unplaceable}
    notes = {tid: f"can never fit here: {unplaceable[tid]}" for tid in cut}
    notes.update(dict.fromkeys(p.dag.downstream(cut) & wanted, "depends on a task that can never fit here"))
    return notes


def _among(ids: tuple[str, ...], runs: dict[str, TaskRun]) -> tuple[str, ...]:
    if not ids or all(d in runs for d in ids):
        return ids
    return tuple(d for d in ids if d in runs)
