"""The MPI backend's side of a run: pools over worker ranks for the scheduler, and what a worker rank does
with an attempt before and after running it.

Rank 0 runs the scheduler; ``RankPools`` gives it one executor, ``cmbagent_batch.mpi.RankExecutor``, whose
calls run on ranks 1..N-1. A call is ``on_rank`` (one attempt) or ``batch_on_rank`` (several tiny ones, one
round trip): on the worker it moves the attempt to that rank's work directory
(``RUN_DIR/ranks/rank-NNNN/tasks/TASK``), runs it, and appends the attempt's end to that rank's state
journal (``RUN_DIR/journal/rank-NNNN.jsonl``) before answering, so what a worker finished survives rank 0
being killed. The outcome says which rank and host ran it.

A worker rank runs ``execution.tasks_per_rank`` attempts at once, as the local thread pool does: it serves
with ``PREPARED`` more threads than that, whose attempts make their work directory and log files and then
wait at the rank's gate (``pools.Slots``) for a slot, the most urgent first (the task's priority travels
with the call). Rank 0 sends each worker up to ``CALLS_AHEAD`` calls beyond its threads, and queues more,
most urgent first, so that a slot that frees starts a prepared attempt at once; an attempt counts as
running from when it is sent (what waits in rank 0's queue is not running). How many a worker holds
beyond its slots follows the pace (``mpi.slots.Pace``): about ``COVER`` seconds of work, at least one
call, so that short tasks are sent far ahead and a long task does not keep many waiting behind it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor
from typing import Any

from cmbagent_batch.attempt import run_attempt, run_attempts
from cmbagent_batch.journal import encode
from cmbagent_batch.pools import Slots
from cmbagent_batch.rundir import journal_path, work_dir
from cmbagent_batch.tasks.base import Outcome, TaskContext
from cmbagent_batch.tasks.shell import terminate_all

PREPARED = 12  # attempts a worker rank prepares ahead of its slots, at most
CALLS_AHEAD = 24  # calls rank 0 sends a worker beyond its threads, at most
COVER = 0.5  # seconds of work, at the workers' recent pace, that a worker holds beyond its slots
PREFETCH_PER_SLOT = 12  # attempts the scheduler hands rank 0's executor per slot, beyond those running

_GATE = 8  # where an attempt's gate is in its arguments (``run_attempt``'s, see ``run.make_launch``)

_journals: dict[tuple[str, int], _RankJournal] = {}
_journals_lock = threading.Lock()
_place: dict[str, Any] = {}


def worker_threads(tasks_per_rank: int) -> int:
    """The threads a worker rank serves with, and the slots per rank of rank 0's executor."""
    return tasks_per_rank + PREPARED


class RankPools:
    """The scheduler's pools when tasks run on MPI worker ranks (the ``LocalPools`` interface)."""

    def __init__(self, executor: Any, tasks_per_rank: int) -> None:
        self.executor = executor
        self.workers = tasks_per_rank * len(executor.workers)
        # Beyond what the workers hold, queued on rank 0, so that a worker never waits for rank 0's
        # scheduler (which shares the cores with everything else) for its next attempt.
        self.prefetch = PREFETCH_PER_SLOT * self.workers
        self._by_priority = _ByPriority(executor)

    def executor_for(self, kind: str) -> Executor:
        return self._by_priority

    def gate(self, kind: str, on_start: Callable[[], None]) -> _Sent:
        return _Sent(on_start)

    def batches(self, kind: str) -> bool:
        return True  # a round trip to another rank: tiny tasks go in batches

    def prefetch_kinds(self) -> frozenset[str]:
        return frozenset({"shell", "python", "agent"})

    def replace_broken(self, executor: Executor) -> None:
        pass

    def hold(self) -> None:
        self.executor.hold_tasks()

    def terminate_running(self, grace: float) -> None:
        self.executor.stop_tasks()

    def shutdown(self, wait: bool = True) -> None:
        pass  # the executor is shut down by whoever made it (``mpi.run_in_world``)


class _Sent:
    """Rank 0's side of a single attempt's gate: the attempt counts as started (``on_start``) when rank 0
    sends it to a worker, not while it waits in rank 0's queue. The worker's own gate (``_moved``) is
    what holds it there until a slot is free. It never leaves rank 0 (``_ByPriority.submit`` takes it
    out of the call's arguments) and nothing enters or leaves it: only the scheduler's ``settle``.
    Attempts sent in a batch have no gate: they count as running from the hand-over."""

    def __init__(self, on_start: Callable[[], None]) -> None:
        self.on_start = on_start

    def settle(self) -> None:
        pass  # the worker gave the slot back itself (``_gated``)


class _ByPriority(Executor):
    """Rank 0's executor as the scheduler sees it: an attempt is submitted with its task's priority (the
    ``priority`` of the ``on_rank`` call; a batch's highest), so the most urgent waiting one goes first,
    and says it started when it is sent to a worker (its ``_Sent`` gate, which stays on rank 0)."""

    def __init__(self, executor: Any) -> None:
        self._executor = executor

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        on_sent = None
        if len(args) > _GATE and isinstance(args[_GATE], _Sent):
            on_sent = args[_GATE].on_start
            args = (*args[:_GATE], None, *args[_GATE + 1:])
        return self._executor.submit_call(fn, args, kwargs, priority=_priority(fn, args), on_sent=on_sent)


def _priority(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    if fn is batch_on_rank:
        return max((_priority(member, a) for member, a in args[0]), default=0.0)
    return float(getattr(fn, "keywords", {}).get("priority", 0.0))


def set_place(rank: int, tasks_per_rank: int) -> None:
    """Called once on each worker rank, before it serves: where its attempts run, its gate of
    ``tasks_per_rank`` slots, and the environment its shell and agent tasks start from (this rank's own,
    as it is now: the local backend too takes the runner's environment once, at the start of the run):
    copying ``os.environ`` for every attempt took about 20 us under mpiexec, 2 to 3% of a worker's own
    time per tiny shell task."""
    _place.update(rank=rank, host=socket.gethostname(), env=dict(os.environ),
                  slots=Slots(tasks_per_rank, keep_order=False))


def stop_tasks(grace: float) -> Callable[[], None]:
    """A worker's ``on_stop``: nothing more starts here, and the process groups of its running attempts
    (shell and agent) are terminated."""
    def stop() -> None:
        hold_tasks()
        threading.Thread(target=terminate_all, args=(grace,), daemon=True).start()

    return stop


def hold_tasks() -> None:
    """A worker's ``on_hold``: the attempts waiting at (or on their way to) this rank's gate never start;
    each comes back to rank 0 as not started. A hold is for the rest of the run (a drain ends it)."""
    _place["slots"].stop()


def on_rank(*args: Any, record: dict[str, Any], made: bool = False, priority: float = 0.0) -> Outcome:
    """``run_attempt`` on this worker rank, behind its gate; ``record``: what the journal says of a success
    (fingerprint); ``priority``: its place in the line at the gate. Raises ``CancelledError`` when a stop
    or a hold kept it from starting (nothing is journaled: it did not run)."""
    args = _moved(args, priority)
    outcome = _gated(*args, made=made)
    if _refused(args):
        raise CancelledError("held back at its rank's gate: the run is stopping")
    return _finished(args[1], outcome, record)


def batch_on_rank(calls: list[tuple[Callable[..., Outcome], tuple[Any, ...]]]) -> list[Outcome]:
    """Several tiny attempts in one round trip (``run_attempts``, their directories made in one burst); those
    a stop or a hold kept from starting are not journaled."""
    moved = [(_gated, _moved(args, _priority(fn, args))) for fn, args in calls]
    records = [fn.keywords["record"] for fn, _args in calls]  # on_rank partials (see run.execute)
    outcomes = run_attempts(moved)
    return [o if _refused(args) else _finished(args[1], o, rec)
            for (_fn, args), o, rec in zip(moved, outcomes, records)]


def _gated(*args: Any, made: bool = False) -> Outcome:
    """``run_attempt``, then give back at once the slot a failure keeps (the local scheduler gives it back
    once it has seen the failure; here nothing waits for rank 0)."""
    try:
        return run_attempt(*args, made=made)
    finally:
        args[_GATE].settle()


def _refused(args: tuple[Any, ...]) -> bool:
    """Whether a stop or a hold kept the attempt from starting."""
    return bool(args[_GATE].refused)


def _moved(args: tuple[Any, ...], priority: float) -> tuple[Any, ...]:
    """The attempt's arguments with its context moved to this rank's work directory, and its gate."""
    payload, ctx = args[0], args[1]
    rank, host = _place["rank"], _place["host"]
    ctx = dataclasses.replace(ctx, rank=rank, host=host, work_dir=work_dir(ctx.run_dir, rank, ctx.task_id))
    env = _place["env"] if payload.kind != "python" else args[3]
    return (payload, ctx, args[2], env, *args[4:_GATE], _place["slots"].gate(_nothing, priority))


def _nothing() -> None:
    pass  # a worker's attempt counts as running from when rank 0 sent it (``_Sent``)


def _finished(ctx: TaskContext, outcome: Outcome, record: dict[str, Any]) -> Outcome:
    outcome = dataclasses.replace(outcome, rank=ctx.rank, host=ctx.host, work_dir=ctx.work_dir)
    rec: dict[str, Any] = {"t": time.time(), "run": record.get("run"), "task": ctx.task_id,
                           "state": "succeeded" if outcome.ok else "failed", "attempt": ctx.attempt,
                           "rank": ctx.rank, "host": ctx.host, "by": "worker"}
    if outcome.ok:
        rec.update({k: v for k, v in record.items() if k != "run"}, wall_s=round(outcome.wall_s, 6),
                   cpu_s=round(outcome.cpu_s, 6), peak_rss_mb=round(outcome.peak_rss_mb, 3),
                   work_bytes=outcome.work_bytes, output_bytes=outcome.output_bytes)
    else:
        rec.update(error=outcome.error, exit_code=outcome.exit_code, timed_out=outcome.timed_out,
                   work_dir=ctx.work_dir, traceback=outcome.traceback)
    _journal(ctx.run_dir, ctx.rank).append(rec)
    return outcome


class _RankJournal:
    """This rank's state journal, appended by several attempt threads: one ``write`` per record on an
    ``O_APPEND`` descriptor (written before rank 0 hears of the end, so a kill loses nothing it was told),
    fsynced at most once a second and at the end."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._synced = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        line = encode(record) + b"\n"
        with self._lock:
            os.write(self._fd, line)
            if time.monotonic() - self._synced >= 1.0:
                os.fsync(self._fd)
                self._synced = time.monotonic()

    def close(self) -> None:
        with self._lock:
            os.fsync(self._fd)
            os.close(self._fd)


def _journal(run_dir: str, rank: int) -> _RankJournal:
    with _journals_lock:
        journal = _journals.get((run_dir, rank))
        if journal is None:
            journal = _journals[(run_dir, rank)] = _RankJournal(journal_path(run_dir, rank))
        return journal


def close_journals() -> None:
    """At the end of a worker's service: everything it journaled is written and fsynced."""
    with _journals_lock:
        for journal in _journals.values():
            journal.close()
        _journals.clear()
