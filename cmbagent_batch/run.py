"""``cmbagent-batch run``: a job from spec to run directory, resumable.

Builds the DAG (with the same cached analysis as ``plan``), replays the run directory's journals,
skips tasks that succeeded with the same fingerprint, schedules the rest on local pools, and writes
``run.json``. Signals stop launching, end running attempts and leave a state the next run resumes from;
SIGUSR1 (Slurm's warning before the walltime) may first let the running attempts finish
(``walltime_grace``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from cmbagent_batch import __version__, gcpause
from cmbagent_batch.analysis.cache import Cache, digest
from cmbagent_batch.analysis.deps import analyse
from cmbagent_batch.analysis.files import input_sources
from cmbagent_batch.attempt import run_attempt, run_attempts
from cmbagent_batch.config import Config
from cmbagent_batch.costs import analysis_recorder, job_budget_spent, merge_ledger
from cmbagent_batch.dag import Dag
from cmbagent_batch.fingerprint import Fingerprints, fingerprints
from cmbagent_batch.journal import Journal, TaskHistory, replay
from cmbagent_batch.local_model import LocalModel
from cmbagent_batch.plan import build_dag
from cmbagent_batch.pools import LocalPools
from cmbagent_batch.rank_pools import RankPools, batch_on_rank, on_rank
from cmbagent_batch.rundir import (
    journal_path,
    journal_paths,
    resolve_run_dir,
    server_logs,
    work_dir,
    write_json_atomic,
)
from cmbagent_batch.scheduler import (
    DrainEvent,
    Launch,
    Limits,
    Options,
    Scheduler,
    TaskRun,
    default_workers,
)
from cmbagent_batch.spec.model import JobSpec, TaskSpec, thaw
from cmbagent_batch.states import FAILED_STATES, TaskState
from cmbagent_batch.tasks.base import Payload, TaskContext

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138}


@dataclass
class Prepared:
    """Everything the run needs, computed before anything is launched (also used by ``status``)."""

    spec: JobSpec
    dag: Dag
    run_dir: str
    fps: Fingerprints
    history: dict[str, TaskHistory]
    sources: dict[str, list[tuple[str, list[tuple[str, str]]]]]
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
    """None when the task is up to date; else why it runs (for the run and ``status --explain``)."""
    h = p.history.get(tid)
    if h is None:
        return "never ran"
    if h.state not in (TaskState.SUCCEEDED.value, TaskState.SKIPPED.value):
        return f"last run ended {h.state}" + (f": {h.record['reason']}" if h.record.get("reason") else "")
    fp = p.fps[tid]
    old = h.record
    if old.get("fp") == fp.value:
        if not os.path.isdir(os.path.join(p.run_dir, "outputs", tid)) and p.spec.task(tid).outputs:
            return "its published outputs are missing"
        return None
    if old.get("spec_fp") != fp.spec:
        return "its spec changed"
    if old.get("deps_fp") != fp.deps:
        changed = [d for d in p.dag.dependencies(tid) if why_rerun(p, d) is not None]
        return "upstream changed: " + ", ".join(changed) if changed else "its dependencies changed"
    return "its input files changed"


def _links(p: Prepared, tid: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Input files to link into the task's work directory, (source, relative destination), and what
    is missing. An input no task writes comes from the spec file's directory."""
    import fnmatch
    import glob

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


def _payload(spec: JobSpec, task: TaskSpec, base: str, run_id: str) -> Payload:
    return Payload(id=task.id, kind=task.kind, run=task.run, call=task.call, args=thaw(task.args),
                   env=dict(task.env), outputs=task.outputs, timeout=task.timeout or spec.execution.task_timeout,
                   python_path=(base,), agent=_agent_request(spec, task, run_id) if task.kind == "agent" else None)


def _agent_request(spec: JobSpec, task: TaskSpec, run_id: str) -> dict[str, Any]:
    """What the agent process needs to know (tasks/agent.py adds the attempt's place, and the URL of a
    local model's server); no secret."""
    m = spec.llm.models[task.model or ""]
    assert m.price is not None  # the loader prices every model
    model = {"name": m.name, "model": m.model, "base_url": m.base_url, "api_key_env": m.api_key_env,
             "timeout": m.timeout, "max_retries": m.max_retries, "price": dataclasses.asdict(m.price),
             "price_table": m.price_table}
    if m.provider == "local":
        model["local"] = dataclasses.asdict(LocalModel.from_spec(m, spec.path))  # the agent side keys on it
    return {
        "job": spec.job.name, "run_id": run_id, "agent": task.agent, "instructions": task.instructions,
        "inputs": list(task.inputs), "max_turns": task.max_turns, "code_execution": task.code_execution,
        "model": model, "budget": {"job_usd": spec.job.budget_usd, "task_usd": task.budget_usd},
    }


def execute(p: Prepared, warn: Callable[[str], None], progress: Callable[[Scheduler], None],
            selected: set[str] | None = None, ranks: Any = None,
            walltime_grace: float = 0.0, walltime_file: str | None = None) -> tuple[int, Scheduler]:
    """Run what is not up to date (of ``selected``, when given); return the exit code and the scheduler.
    ``ranks``: an ``mpi.RankExecutor`` (MPI backend: tasks run on the worker ranks), else local pools.
    ``walltime_grace``: after SIGUSR1, seconds the running attempts may go on before they are terminated.
    ``walltime_file``: a file whose appearance means the same as SIGUSR1."""
    spec, ex = p.spec, p.spec.execution
    rank_pools = RankPools(ranks, ex.tasks_per_rank) if ranks is not None else None
    workers = rank_pools.workers if rank_pools is not None else ex.max_workers or default_workers(ex.max_memory_mb)
    if ex.mode == "sequential":
        workers = 1
    host = socket.gethostname()
    base = os.path.dirname(os.path.abspath(spec.path))
    journal = Journal(journal_path(p.run_dir, 0))
    run_id = p.run_id
    runs: dict[str, TaskRun] = {}
    weights = p.dag.bottom_levels()
    tasks = {t.id: t for t in spec.tasks}
    for tid in p.dag.nodes:
        t = tasks[tid]
        h = p.history.get(tid)
        before = h.attempts if h else 0
        r = TaskRun(id=tid, kind=t.kind, priority=weights[tid], retries=ex.retries if t.retries is None else t.retries,
                    cpus=t.resources.cpus, memory_mb=float(t.resources.memory_mb or 0), deps=p.dag.dependencies(tid),
                    dependents=p.dag.dependents(tid), attempts=before, extra={"attempts_before": before})
        if why_rerun(p, tid) is None:
            r.state = TaskState.SKIPPED
            r.reason = "succeeded in an earlier run; unchanged"
        elif selected is not None and tid not in selected:
            r.state = TaskState.SKIPPED
            r.reason = "not selected by --only"
        runs[tid] = r

    def record(r: TaskRun, extra: dict[str, Any]) -> None:
        rec: dict[str, Any] = {"t": time.time(), "run": run_id, "task": r.id, "state": r.state.value, **extra}
        if r.state is TaskState.SUCCEEDED and r.outcome is not None:
            o = r.outcome
            rec.update(p.fps[r.id].to_dict(), wall_s=round(o.wall_s, 6), cpu_s=round(o.cpu_s, 6),
                       peak_rss_mb=round(o.peak_rss_mb, 3), work_bytes=o.work_bytes, output_bytes=o.output_bytes)
            if o.rank is not None:
                rec.update(rank=o.rank, host=o.host, work_dir=o.work_dir)
        elif r.outcome is not None and not r.outcome.ok and r.state is not TaskState.RUNNING:
            rec.update(error=r.outcome.error, exit_code=r.outcome.exit_code, timed_out=r.outcome.timed_out,
                       work_bytes=r.outcome.work_bytes)
            if r.outcome.rank is not None:
                rec.update(rank=r.outcome.rank, host=r.outcome.host, work_dir=r.outcome.work_dir)
            if r.outcome.traceback:
                rec["traceback"] = r.outcome.traceback
        journal.append(rec)

    tasks_dir = work_dir(p.run_dir, 0, "")
    payloads: dict[str, Payload] = {}

    def make_launch(r: TaskRun, gate: Any) -> Launch:
        t = tasks[r.id]
        # Under MPI the worker that gets the attempt sets its place (rank -1: not known on rank 0).
        place = (tasks_dir + r.id, 0, host) if ranks is None else ("", -1, "")
        ctx = TaskContext(task_id=r.id, run_dir=p.run_dir, work_dir=place[0], rank=place[1],
                          attempt=r.attempts, host=place[2], matrix=thaw(t.matrix) if t.matrix else {})
        chdir = ex.use_process_pool and t.kind == "python" and ranks is None
        links, missing = _links(p, r.id)
        # python workers inherit the environment; under MPI a worker rank uses its own (its rank, node)
        env = base_env if t.kind != "python" and ranks is None else {}
        payload = payloads.get(r.id) or payloads.setdefault(r.id, _payload(spec, t, base, run_id))
        args = (payload, ctx, links, env, chdir, ex.keep, ex.kill_grace, missing, gate)
        if ranks is not None:  # the worker rank journals a success with its fingerprint
            record = {"run": run_id, **p.fps[r.id].to_dict()}
            return Launch(functools.partial(on_rank, record=record, priority=r.priority), args, ctx)
        return Launch(run_attempt, args, ctx)

    base_env = dict(os.environ)
    pools: Any = LocalPools(workers, ex.use_process_pool) if rank_pools is None else rank_pools
    import psutil

    total_mb = psutil.virtual_memory().total / 2**20
    limits = Limits(max_workers=workers, cpus=max(workers, os.cpu_count() or 1),
                    memory_mb=total_mb * ex.memory_safety_fraction, memory_safety_fraction=ex.memory_safety_fraction,
                    memory_in_use=_memory_in_use if ranks is None else (lambda: 0.0),  # not rank 0's node
                    prefetch_kinds=frozenset() if ex.mode == "sequential" else pools.prefetch_kinds(),
                    prefetch=pools.prefetch)
    options = Options(keep_going=ex.keep_going, retries=ex.retries, retry_backoff=ex.retry_backoff,
                      kill_grace=ex.kill_grace)
    sched = Scheduler(runs, pools, limits, options, make_launch, record, tick=progress, commit=journal.flush,
                      batch=run_attempts if ranks is None else batch_on_rank, on_drain=_say_drain)
    started = time.time()
    backend = ("local", 1) if ranks is None else ("mpi", len(ranks.workers) + 1)
    manifest = _manifest(p, run_id, started, None, runs, workers, backend=backend)
    write_json_atomic(os.path.join(p.run_dir, "run.json"), manifest)
    gcpause.freeze_survivors()
    previous = _install_signals(sched, walltime_grace)
    watching = _watch(walltime_file, lambda: sched.request_stop("SIGUSR1", drain=walltime_grace))
    try:
        sched.run()
    finally:
        watching.set()
        _restore_signals(previous)
        pools.shutdown(wait=sched.abandoned == 0)
        journal.close()
    code = _exit_code(sched)
    ledger = merge_ledger(p.run_dir, warn)
    write_json_atomic(os.path.join(p.run_dir, "run.json"), _manifest(p, run_id, started, time.time(), runs, workers,
                                                                       exit_code=code,
                                                                       stop=sched.stop_reason if _cut_short(sched) else None,
                                                                       ledger=ledger, backend=backend))
    return code, sched


def _watch(path: str | None, warned: Callable[[], None]) -> threading.Event:
    """Call ``warned`` once ``path`` exists (polled every 0.5 s, on a thread of its own) until the returned
    event is set. A job script's way to pass on Slurm's walltime warning to rank 0 alone: through srun, a
    signal reaches every process of the job step, the tasks' own included."""
    done = threading.Event()
    if path is None:
        return done

    def poll() -> None:
        while not done.wait(0.5):
            if os.path.exists(path):
                warned()
                return

    threading.Thread(target=poll, name="walltime-file", daemon=True).start()
    return done


def _slurm(run_dir: str) -> dict[str, Any] | None:
    """The Slurm jobs of this run directory (``submit``'s record) and the one this run is part of."""
    from cmbagent_batch.slurm import jobs

    try:
        summary = jobs.summary(jobs.load(run_dir))
    except (OSError, ValueError):
        summary = None
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return summary
    if summary is None:  # started by hand inside an allocation
        summary = {"job_id": job_id, "requeues": 0, "requeue_max": None, "script": None, "jobs": [job_id], "events": []}
    summary["this_run"] = {"job_id": job_id, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                           "step_id": os.environ.get("SLURM_STEP_ID"), "nodes": os.environ.get("SLURM_JOB_NODELIST")}
    return summary


def _memory_in_use() -> float:
    import psutil

    return float(psutil.virtual_memory().percent) / 100.0


def _exit_code(sched: Scheduler) -> int:
    if sched.stop_reason in EXIT_CODES and _cut_short(sched):
        return EXIT_CODES[sched.stop_reason]
    bad = sum(sched.counts[s] for s in FAILED_STATES | {TaskState.CANCELLED, TaskState.INTERRUPTED})
    return 1 if bad else 0


def _cut_short(sched: Scheduler) -> bool:
    """Whether a stop left tasks undone: one that came as the last tasks were ending (a walltime warning
    whose drain saw them finish) ends the run as if none had come."""
    return any(n for s, n in sched.counts.items() if s not in (TaskState.SUCCEEDED, TaskState.SKIPPED))


def _install_signals(sched: Scheduler, walltime_grace: float) -> dict[int, Any]:
    """SIGINT and SIGTERM end the running attempts at once; so does SIGUSR1, Slurm's warning before the
    walltime, unless ``walltime_grace`` lets them finish first. A later signal ends them at once."""
    def stop(name: str, drain: float) -> Callable[[int, Any], None]:
        return lambda signum, frame: sched.request_stop(name, drain=drain)

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, stop(name, walltime_grace if name == "SIGUSR1" else 0.0))
    return previous


def drain_message(event: DrainEvent) -> str:
    """What the user reads when a stop with a drain holds new tasks back, and when it ends the rest."""
    what = f"{event.reason} (walltime warning)" if event.reason == "SIGUSR1" else event.reason
    n, one = event.running, event.running == 1
    tasks = f"{n} running task{'' if one else 's'}"
    if event.what == "hold":
        return (f"cmbagent-batch: {what}: no new task starts; {tasks} get{'s' if one else ''} up to "
                f"{event.seconds:g} s to finish")
    if event.what == "deadline":
        return (f"cmbagent-batch: {what}: {n} task{'' if one else 's'} still running after {event.seconds:g} s: "
                f"terminating {'it' if one else 'them'}")
    return f"cmbagent-batch: {what} during the walltime grace: terminating the {tasks} now"


def _say_drain(event: DrainEvent) -> None:
    """Called on the scheduler thread (printing in a signal handler could deadlock on stderr's lock)."""
    erase = "\r\033[K" if sys.stderr.isatty() else ""  # a progress bar drawn on the line
    print(erase + drain_message(event), file=sys.stderr, flush=True)


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _manifest(p: Prepared, run_id: str, started: float, ended: float | None, runs: dict[str, TaskRun],
              workers: int, exit_code: int | None = None, stop: str | None = None,
              ledger: dict[str, Any] | None = None, backend: tuple[str, int] = ("local", 1)) -> dict[str, Any]:
    def iso(t: float | None) -> str | None:
        return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    host = socket.gethostname()
    tasks_dir = work_dir(p.run_dir, 0, "")
    # A task with nothing measured yet: in the manifest written as the run starts (10^4 tasks, on the
    # way to the first launch), only what the schema requires; at the end, every field.
    blank = {"rank": 0} if ended is None else {
        "rank": 0, "host": host, "wall_s": None, "cpu_s": None, "peak_rss_mb": None, "work_bytes": None,
        "output_bytes": None, "reason": None}
    tasks = {}
    for tid, r in sorted(runs.items()):
        h = p.history.get(tid)
        last = h.record if (h and r.state is TaskState.SKIPPED) else {}
        o = r.outcome
        if o is None and not last:
            entry = blank.copy()
            entry.update(state=r.state.value, attempts=r.attempts, work_dir=tasks_dir + tid)
            if r.reason or ended is not None:
                entry.update(reason=r.reason or None, fingerprint=p.fps[tid].value)
            tasks[tid] = entry
            continue
        tasks[tid] = {
            "state": r.state.value,
            "attempts": r.attempts,
            "rank": o.rank if o and o.rank is not None else last.get("rank", 0),
            "host": o.host if o and o.host else last.get("host", host),
            "wall_s": round(o.wall_s, 6) if o else last.get("wall_s"),
            "cpu_s": round(o.cpu_s, 6) if o else last.get("cpu_s"),
            "peak_rss_mb": round(o.peak_rss_mb, 3) if o else last.get("peak_rss_mb"),
            "work_dir": o.work_dir if o and o.work_dir else last.get("work_dir", tasks_dir + tid),
            # measured by the worker when the attempt ended (after retention)
            "work_bytes": o.work_bytes if o else last.get("work_bytes"),
            "output_bytes": o.output_bytes if o else last.get("output_bytes"),
            "reason": r.reason or None,
            "fingerprint": p.fps[tid].value,
        }
    counts: dict[str, int] = {}
    for t in tasks.values():
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {
        "format": 1,
        "run_id": run_id,
        "cmbagent_batch": __version__,
        "job": p.spec.job.name,
        "spec": {"path": os.path.abspath(p.spec.path), "sha256": p.spec.sha256},
        "dag_sha256": digest([[e.src, e.dst] for e in p.dag.edges] + [list(p.dag.nodes)]),
        "backend": backend[0],
        "ranks": backend[1],
        "workers": workers,
        "started": iso(started),
        "ended": iso(ended),
        "status": "running" if ended is None else ("interrupted" if stop in EXIT_CODES else "finished"),
        "stop_reason": stop,
        "exit_code": exit_code,
        "counts": dict(sorted(counts.items())),
        "analysis": p.analysis,
        "budget_usd": p.spec.job.budget_usd,
        "ledger": ledger,
        "slurm": _slurm(p.run_dir),
        "tasks": tasks,
    }

