"""What a run writes about its tasks: the state journal's records (``Recorder``) and ``run.json`` (the
manifest: written as the run starts and again when it ends, with the Slurm jobs it is part of)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from cmbagent_batch import __version__
from cmbagent_batch.execute.prepare import Prepared
from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.plan.analysis.cache import digest
from cmbagent_batch.rundir.journal import Journal
from cmbagent_batch.rundir.layout import work_dir
from cmbagent_batch.states import StopReason, Tally, TaskState


class Recorder:
    """The scheduler's ``record``: each state change as a record of rank 0's state journal, with what the
    outcome says (a success's fingerprints and measures; a failure's error)."""

    def __init__(self, p: Prepared, journal: Journal) -> None:
        self._p = p
        self._journal = journal

    def __call__(self, r: TaskRun, extra: dict[str, Any]) -> None:
        rec: dict[str, Any] = {"t": time.time(), "run": self._p.run_id, "task": r.id, "state": r.state.value, **extra}
        o = r.outcome
        if r.state is TaskState.SUCCEEDED and o is not None:
            rec.update(self._p.fps[r.id].to_dict(), wall_s=round(o.wall_s, 6), cpu_s=round(o.cpu_s, 6),
                       peak_rss_mb=round(o.peak_rss_mb, 3), work_bytes=o.work_bytes, output_bytes=o.output_bytes)
            if o.rank is not None:
                rec.update(rank=o.rank, host=o.host, work_dir=o.work_dir)
        elif o is not None and not o.ok and r.state is not TaskState.RUNNING:
            rec.update(error=o.error, exit_code=o.exit_code, timed_out=o.timed_out, work_bytes=o.work_bytes)
            if o.rank is not None:
                rec.update(rank=o.rank, host=o.host, work_dir=o.work_dir)
            if o.traceback:
                rec["traceback"] = o.traceback
        self._journal.append(rec)


def manifest(p: Prepared, run_id: str, started: float, ended: float | None, runs: dict[str, TaskRun],
              workers: int, exit_code: int | None = None, stop: StopReason | None = None,
              ledger: dict[str, Any] | None = None, backend: tuple[str, int] = ("local", 1)) -> dict[str, Any]:
    def iso(t: float | None) -> str | None:
        return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    host = socket.gethostname()
    tasks_dir = work_dir(p.run_dir, 0, "")
    # A task with nothing measured yet: in the manifest written as the run starts (10^4 tasks, on the
    # way to the first launch), only what the schema requires; at the end, every field.
    blank: dict[str, Any] = {"rank": 0} if ended is None else {
        "rank": 0, "host": host, "wall_s": None, "cpu_s": None, "peak_rss_mb": None, "work_bytes": None,
        "output_bytes": None, "reason": None}
    tasks: dict[str, dict[str, Any]] = {}
    for tid, r in sorted(runs.items()):
        h = p.history.get(tid)
        last: dict[str, Any] = h.record if (h and r.state is TaskState.SKIPPED) else {}
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
        "status": "running" if ended is None else ("interrupted" if stop is not None and stop.interrupts else "finished"),
        "stop_reason": None if stop is None else stop.value,
        "exit_code": exit_code,
        "counts": Tally.of(r.state for r in runs.values()).to_json(),
        "analysis": p.analysis,
        "budget_usd": p.spec.job.budget_usd,
        "ledger": ledger,
        "slurm": _slurm(p.run_dir),
        "tasks": tasks,
    }


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
