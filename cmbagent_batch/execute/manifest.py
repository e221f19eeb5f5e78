"""What a run writes about its tasks: the state journal's records (``Recorder``) and ``run.json`` (the
manifest: written as the run starts and again when it ends, with the Slurm jobs it is part of)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from cmbagent_batch import __version__
from cmbagent_batch.execute.prepare import Prepared
from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.rundir.history import INDEX
from cmbagent_batch.rundir.journal import Journal
from cmbagent_batch.states import StopReason, Tally, TaskState


class Recorder:
    """The scheduler's ``record``: each state change as a record of rank 0's state journal, with what the
    outcome says (a success's fingerprint and measures; a failure's error).

    A record leaves out what a reader finds without it (``rundir/runview.py``): a work directory where the
    layout puts it, the runner's own host, rank 0, and a success's measures that are 0 (CPU seconds, work
    and output bytes). The sets of code files that success records will name by key (``Fingerprint.to_dict``)
    and that the journals' index does not keep yet are added to it (the run writes it before its first task)."""

    def __init__(self, p: Prepared, journal: Journal) -> None:
        self._p = p
        self._run_id = p.run_id
        self._append = journal.append
        self._host = socket.gethostname()
        self._work_dir = p.layout.work_dir
        for code, files in p.fps.code_sets().items():
            p.history.code_sets.setdefault(code, files)

    def __call__(self, r: TaskRun, extra: dict[str, Any]) -> None:
        # Run twice per task on the scheduler thread: the common records (a start, a success) are made
        # with as few steps as give the same record. ``_value_`` is the member's value, without the
        # descriptor behind ``.value``.
        state = r.state
        rec: dict[str, Any] = {"t": time.time(), "run": self._run_id, "task": r.id, "state": state._value_, **extra}
        o = r.outcome
        fp = r.fp_record
        if state is not _RUNNING:
            r.fp_record = None
        if state is _SUCCEEDED and o is not None:
            rec.update(fp or self._p.fps.record(r.id))
            rec["wall_s"] = round(o.wall_s, 6)
            if cpu := round(o.cpu_s, 6):
                rec["cpu_s"] = cpu
            rec["peak_rss_mb"] = round(o.peak_rss_mb, 3)
            if o.work_bytes:
                rec["work_bytes"] = o.work_bytes
            if o.output_bytes:
                rec["output_bytes"] = o.output_bytes
            if o.rank is not None:
                rec.update(rank=o.rank, host=o.host, work_dir=o.work_dir)
        elif o is not None and not o.ok and state is not _RUNNING:
            rec.update(error=o.error, exit_code=o.exit_code, timed_out=o.timed_out, wall_s=round(o.wall_s, 6),
                       work_bytes=o.work_bytes)
            if o.rank is not None:
                rec.update(rank=o.rank, host=o.host, work_dir=o.work_dir)
            if o.traceback:
                rec["traceback"] = o.traceback
        if r.placement is not None and "placement" not in rec and state is not _RUNNING:
            rec.update(placement=r.placement.record(), launch=r.launch)  # an end says where it ran
            if o is not None and o.steps:  # and the Slurm job steps its $CMBAGENT_LAUNCH started
                rec["steps"] = list(o.steps)
        if rec.get("host") == self._host:
            del rec["host"]
        rank = rec.get("rank", 0)
        if rank == 0:  # read as 0 when left out
            rec.pop("rank", None)
        # an empty one (a start on a rank, which rank 0 does not place) is never the layout's
        if (work_dir := rec.get("work_dir")) and work_dir == self._work_dir(max(rank, 0), r.id):
            del rec["work_dir"]
        self._append(rec)


_RUNNING, _SUCCEEDED = TaskState.RUNNING, TaskState.SUCCEEDED


FORMAT = 2  # 1: with a "tasks" entry per task; 2: a bounded summary (the journals hold each task)


def dag_digest(p: Prepared) -> str:
    """sha256 of the DAG's nodes and edges, streamed (one line per node, then per edge)."""
    h = hashlib.sha256()
    for tid in p.dag.nodes:
        h.update(tid.encode() + b"\n")
    for e in p.dag.edges:
        h.update(f"{e.src}\0{e.dst}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class RunSummary:
    """What run.json says of a run, besides the job's and the prepared run's facts."""

    run_id: str
    dag_sha256: str
    started: float
    workers: int
    backend: tuple[str, int] = ("local", 1)  # name, processes
    ended: float | None = None
    exit_code: int | None = None
    stop: StopReason | None = None
    ledger: dict[str, Any] | None = None
    runner_cpu_s: float | None = None  # user + system CPU seconds of this process, at the end
    tasks_run: int = 0  # tasks the run handed to the scheduler (the others were skipped)
    inventory: str | None = None  # what it booked, when its tasks have shapes to place


def manifest(p: Prepared, run: RunSummary, counts: Tally) -> dict[str, Any]:
    """run.json: a summary of bounded size, whatever the number of tasks (``status`` and readers of a
    task's detail read the journals, through ``rundir/history.py``)."""
    def iso(t: float | None) -> str | None:
        return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    return {
        "format": FORMAT,
        "run_id": run.run_id,
        "cmbagent_batch": __version__,
        "job": p.spec.job.name,
        "spec": {"path": os.path.abspath(p.spec.path), "sha256": p.spec.sha256},
        "dag_sha256": run.dag_sha256,
        "backend": run.backend[0],
        "ranks": run.backend[1],
        "workers": run.workers,
        "host": socket.gethostname(),
        "started": iso(run.started),
        "ended": iso(run.ended),
        "status": "running" if run.ended is None else (
            "interrupted" if run.stop is not None and run.stop.interrupts else "finished"),
        "stop_reason": None if run.stop is None else run.stop.value,
        "exit_code": run.exit_code,
        "tasks_total": counts.total,
        "counts": counts.to_json(),
        "journal": {"dir": "journal", "index": f"journal/{INDEX}"},
        "inventory": run.inventory,
        "runner": None if run.runner_cpu_s is None else {
            "cpu_s": round(run.runner_cpu_s, 3), "tasks_run": run.tasks_run,
            "us_per_task": round(1e6 * run.runner_cpu_s / run.tasks_run, 1) if run.tasks_run else None},
        "analysis": p.analysis,
        "budget_usd": p.spec.job.budget_usd,
        "ledger": run.ledger,
        "slurm": _slurm(p.run_dir),
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
