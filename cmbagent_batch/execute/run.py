"""``cmbagent-batch run``: a job from spec to run directory, resumable.

Prepares the run (``prepare``: the DAG with the same cached analysis as ``plan``, the journals replayed),
skips tasks that succeeded with the same fingerprint, schedules the rest on the backend's pools
(``backends.make_backend``: local pools or MPI worker ranks), and writes ``run.json``. Stops (signals,
the walltime file, fail-fast) are ``stop``'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cmbagent_batch.backends import make_backend
from cmbagent_batch.errors import DiskFullError, ExitCode
from cmbagent_batch.execute.launch import Launcher
from cmbagent_batch.execute.manifest import Recorder, RunSummary, dag_digest, manifest
from cmbagent_batch.execute.placing import Placing
from cmbagent_batch.execute.prepare import Prepared, task_runs
from cmbagent_batch.execute.runs import Limits, Options
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.execute.stop import exit_code, say_drain, stop_sources, stop_that_counts
from cmbagent_batch.execute.tracing import Traced, open_trace
from cmbagent_batch.ledger.costs import merge_ledger
from cmbagent_batch.place.launch import where_for
from cmbagent_batch.rundir.atomic import write_json_atomic
from cmbagent_batch.rundir.history import INDEX, StaleIndex
from cmbagent_batch.rundir.journal import Journal
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS
from cmbagent_batch.rundir.layout import journal_dir, journal_path, journal_paths
from cmbagent_batch.spec import gcpause
from cmbagent_batch.states import Tally, TaskState

if TYPE_CHECKING:
    from cmbagent_batch.backends.mpi.executor import RankExecutor


def execute(p: Prepared, warn: Callable[[str], None], progress: Callable[[Scheduler], None],
            selected: set[str] | None = None, ranks: RankExecutor | None = None,
            walltime_grace: float = 0.0, walltime_file: str | None = None,
            placing: Placing | None = None) -> tuple[int, Scheduler]:
    """Run what is not up to date (of ``selected``, when given); return the exit code and the scheduler.
    ``ranks``: rank 0's executor over the MPI worker ranks (tasks run there), else local pools.
    ``walltime_grace``: after SIGUSR1, seconds the running attempts may go on before they are terminated.
    ``walltime_file``: a file whose appearance means the same as SIGUSR1.
    ``placing``: the inventory, its booking and the tasks skipped as they can never fit, for a job whose
    tasks have shapes (``placing.booking_for``)."""
    ex = p.spec.execution
    inventory, booking = (placing.inventory, placing.booking) if placing else (None, None)
    if ranks is not None and placing is not None:
        ranks.route(dict(placing.routes))
    backend = make_backend(ex, ranks, booking.total_cpus if booking else None)
    pools, workers = backend.pools, backend.workers
    table = task_runs(p, selected, placing.skipped if placing else None)
    runs = table.runs
    for left in p.layout.leftovers():
        warn(f"{left} holds what a python task left when an earlier run was killed (which task is not "
             "recorded; the task runs again): it is kept as it is, to look at or remove")
    journal = Journal(journal_path(p.run_dir, 0))
    import psutil

    total_mb = psutil.virtual_memory().total / 2**20
    limits = Limits(max_workers=workers, cpus=max(workers, os.cpu_count() or 1),
                    memory_mb=total_mb * ex.memory_safety_fraction, memory_safety_fraction=ex.memory_safety_fraction,
                    memory_in_use=backend.memory_in_use, prefetch_kinds=backend.prefetch_kinds,
                    prefetch=0 if booking else pools.prefetch, booking=booking, backfill_s=ex.backfill_s)
    options = Options(keep_going=ex.keep_going, retries=ex.retries, retry_backoff=ex.retry_backoff,
                      kill_grace=ex.kill_grace)
    launcher = Launcher(p, on_ranks=ranks is not None, where=where_for(inventory.source) if inventory else None)
    traced = Traced(Recorder(p, journal), journal.flush, open_trace(p.run_dir, warn), p.run_id)
    sched = Scheduler(runs, pools, limits, options, launcher, traced,
                      tick=progress, commit=traced.commit, on_drain=say_drain, skipped=table.skipped,
                      write_through=lambda: journal.flush(wait=True))
    journal.on_full = lambda exc: sched.stop_on_full_disk(_what(exc))
    summary = RunSummary(p.run_id, dag_digest(p), time.time(), workers, (backend.name, backend.processes),
                         tasks_run=len(runs), inventory=inventory.describe() if inventory else None)
    run_json = os.path.join(p.run_dir, "run.json")
    try:
        p.history.write_index(journal_dir(p.run_dir))  # the run's table: what status reads if this run is killed
        write_json_atomic(run_json, manifest(p, summary, Tally.from_counts(  # every task it runs starts pending
            {TaskState.PENDING: len(runs), TaskState.SKIPPED: table.skipped})))
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        journal.close()
        traced.close(warn)
        raise DiskFullError(f"{disk_full_advice(p.run_dir, _what(exc, run_json))}") from None
    gcpause.freeze_survivors()
    try:
        with stop_sources(sched.request_stop, walltime_grace, walltime_file):
            sched.run()
    finally:
        pools.shutdown(wait=sched.abandoned == 0)
        if runs:  # what tasks that wrote nothing left: no inode stays per task
            p.layout.remove_empty_shards()
        try:
            journal.close()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            sched.disk_full = sched.disk_full or _what(exc)
            warn(f"the last state changes could not be journaled ({_what(exc)}): the tasks they record run again")
        traced.close(warn)
    code = exit_code(sched.stop_reason, sched.counts)
    if sched.disk_full is not None and not code:  # records lost: the tasks they record run again
        code = ExitCode.FAILED
    ledger = merge_ledger(p.run_dir, warn)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = dataclasses.replace(summary, ended=time.time(), exit_code=code, ledger=ledger,
                                  stop=stop_that_counts(sched.stop_reason, sched.counts),
                                  runner_cpu_s=usage.ru_utime + usage.ru_stime)
    try:
        keep_index(p, warn)
        write_json_atomic(run_json, manifest(p, summary, Tally.from_counts(sched.counts)))
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        sched.disk_full = sched.disk_full or _what(exc, run_json)  # the journal holds the states; status reads it
        code = code or ExitCode.FAILED
    return code, sched


def keep_index(p: Prepared, warn: Callable[[str], None]) -> None:
    """Fold what the run journaled into its history and keep it as the journals' index, so the next
    reader (status, a rerun) parses none of it again."""
    covered = dict(p.history.covered)
    try:
        p.history.read_tails(journal_paths(p.run_dir), warn)
    except StaleIndex as exc:  # a journal shorter than when the run started: the next reader reads them all
        warn(f"the journals changed under the run ({exc}); their index is not kept")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(journal_dir(p.run_dir), INDEX))
        return
    if p.history.covered != covered:  # else the index the run wrote as it started holds it all
        p.history.write_index(journal_dir(p.run_dir))


def _what(exc: OSError, path: str | None = None) -> str:
    return f"{exc.filename or path or 'a file'}: {exc.strerror or exc}"


def disk_full_advice(run_dir: str, what: str) -> str:
    """What to say when the run directory's file system is full: which file system, what failed, and how
    to continue."""
    mount = os.path.abspath(run_dir)
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    return (f"the file system holding {run_dir} (mounted at {mount}) is full or over its quota ({what}); "
            "nothing new was started and the journal keeps every task that ended. Free space (or ask for "
            "more quota), then run the same command again: it continues where this run stopped")
