"""The MPI backend's side of a run: pools over worker ranks for the scheduler, and what a worker rank does
with an attempt before and after running it.

Rank 0 runs the scheduler; ``RankPools`` gives it one executor, ``backends.mpi.RankExecutor``, whose calls
run on ranks 1..N-1. A call is ``on_rank`` (one ``Attempt``) or ``batch_on_rank`` (several tiny ones, one
round trip): on the worker, that rank's ``RankWorker`` moves the attempt to the rank's work directory
(``RUN_DIR/ranks/rank-NNNN/tasks/TASK``), runs it, and appends the attempt's end to that rank's state
journal (``RUN_DIR/journal/rank-NNNN.jsonl``) before answering, so what a worker finished survives rank 0
being killed. The outcome says which rank and host ran it.

A worker rank runs ``execution.tasks_per_rank`` attempts at once, as the local thread pool does: it serves
with ``PREPARED`` more threads than that, whose attempts make their work directory and log files and then
wait at the rank's gate (``backends.slots.Slots``) for a slot, the most urgent first (the attempt carries
its task's priority). Rank 0 sends each worker up to ``CALLS_AHEAD`` calls beyond its threads, and queues more,
most urgent first, so that a slot that frees starts a prepared attempt at once. A call counts as running
when its attempt (a batch: the first) gets a slot on its worker, which tells rank 0 so
(``mpi.worker.start_reporter``); until then it is queued. How many a worker holds
beyond its slots follows the pace (``mpi.slots.Pace``): about ``COVER`` seconds of work, at least one
call, so that short tasks are sent far ahead and a long task does not keep many waiting behind it.

**A job that books its inventory** (tasks with shapes, ``execute.placing``) is placed by rank 0: each
worker says which node it is on and what that node has (its hello, ``node_hello``), rank 0 books each
task on a node and sends it to the least loaded worker of that node (``RankExecutor.route``). A worker
then runs what it is sent at once: its gate admits as many attempts as its node has CPUs (a task books
at least one), rank 0 sends no more than it booked, and nothing is sent ahead.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Executor, Future
from typing import TYPE_CHECKING, Any

from cmbagent_batch import watchdog
from cmbagent_batch.attempt import Attempt, Gate, Outcome, TaskContext
from cmbagent_batch.backends.mpi.executor import RankExecutor
from cmbagent_batch.backends.mpi.worker import start_reporter
from cmbagent_batch.backends.processes import WorkerProcesses
from cmbagent_batch.backends.slots import SlotGate, Slots, StartNotice
from cmbagent_batch.place.inventory import Node
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS, JsonlWriter
from cmbagent_batch.rundir.layout import Layout, hold_tasks_lock, journal_path
from cmbagent_batch.states import OutcomeReason, TaskState
from cmbagent_batch.tasks.runner import run_attempt
from cmbagent_batch.tasks.shell import terminate_all

if TYPE_CHECKING:
    from cmbagent_batch.spec.model import ExecutionSpec

PREPARED = 12  # attempts a worker rank prepares ahead of its slots, at most
CALLS_AHEAD = 24  # calls rank 0 sends a worker beyond its threads, at most
COVER = 0.5  # seconds of work, at the workers' recent pace, that a worker holds beyond its slots
PREFETCH_PER_SLOT = 12  # attempts the scheduler hands rank 0's executor per slot, beyond those running
# A call to a worker rank costs rank 0 about 0.2 ms of CPU (its future, pickling, a message each way, the
# start's notice and the wake-ups) and a round trip of milliseconds: tiny tasks go in batches of this much
# work, a tenth of what a worker holds ahead (``COVER``).
BATCH_SECONDS = 0.05


def worker_threads(tasks_per_rank: int) -> int:
    """The threads a worker rank serves with, and the slots per rank of rank 0's executor."""
    return tasks_per_rank + PREPARED


def rank_executor(comm: Any, ex: ExecutionSpec, books: bool = False) -> RankExecutor:
    """Rank 0's executor over the worker ranks of ``comm`` (an mpi4py communicator), sized from ``ex``. A
    worker holding twice ``tasks_per_rank`` calls has one waiting behind each it runs: it is full. When
    the job ``books`` its inventory, only the booking limits what is sent (``BOOKED_SLOTS``)."""
    if books:
        return RankExecutor(comm, BOOKED_SLOTS, ahead=0, least=BOOKED_SLOTS, cover=0.0, full=0)
    return RankExecutor(comm, worker_threads(ex.tasks_per_rank), ahead=CALLS_AHEAD, least=ex.tasks_per_rank + 1,
                        cover=COVER, full=2 * ex.tasks_per_rank)


# Calls rank 0 may have in flight on one worker of a job that books its inventory: more than any node's
# CPUs, so that the booking alone says what runs where.
BOOKED_SLOTS = 1 << 20


def node_hello(node: Node) -> str:
    """What a worker of a job that books says of its node after its host (``hello_node`` reads it)."""
    return json.dumps({"name": node.name, "cpus": node.cpus, "gpus": list(node.gpus), "memory_mb": node.memory_mb})


def hello_node(about: str) -> Node | None:
    """The node a worker's hello names (``node_hello``); None when it names none (the job books nothing)."""
    if not about:
        return None
    d = json.loads(about)
    return Node(d["name"], d["cpus"], tuple(d["gpus"]), d["memory_mb"])


def serve_worker_rank(comm: Any, rank: int, ex: ExecutionSpec, node: Node | None = None) -> None:
    """A worker rank's whole part in a run: run what rank 0 sends until it says the run is over, then
    make sure everything this rank journaled is on disk. ``node``: where this rank runs, for a job that
    books its inventory (rank 0 places tasks by it; this rank then runs up to its CPUs' worth at once)."""
    from cmbagent_batch.backends.mpi.worker import serve

    per_rank = ex.tasks_per_rank if node is None else max(ex.tasks_per_rank, node.cpus)
    this = install(rank, per_rank)
    stop = this.stopper(ex.kill_grace)
    # Rank 0 decides; on SIGINT and SIGTERM this rank only ends its tasks. srun passes Slurm's walltime
    # warning (SIGUSR1) to every rank: here it does nothing, as a hold or a stop comes from rank 0 (a
    # handler that does nothing, not SIG_IGN, which the tasks would inherit).
    on_signal: dict[int, Callable[[], None]] = {signal.SIGINT: stop, signal.SIGTERM: stop,
                                                signal.SIGUSR1: _nothing}
    try:
        serve(comm, worker_threads(per_rank), on_stop=stop, on_hold=this.hold, on_signal=on_signal,
              about="" if node is None else node_hello(node))
    finally:
        this.close()


# --- rank 0 -----------------------------------------------------------------------------------------


class RankPools:
    """The scheduler's pools when tasks run on MPI worker ranks (the ``LocalPools`` interface)."""

    def __init__(self, executor: RankExecutor, tasks_per_rank: int, booked_cpus: int | None = None) -> None:
        self.executor = executor
        # booked: as many at once as the inventory has CPUs (each task books one at least)
        self.workers = tasks_per_rank * len(executor.workers) if booked_cpus is None else booked_cpus
        # Beyond what the workers hold, queued on rank 0, so that a worker never waits for rank 0's
        # scheduler (which shares the cores with everything else) for its next attempt.
        self.prefetch = PREFETCH_PER_SLOT * self.workers

    def executor_for(self, kind: str) -> Executor:
        return self.executor

    def gate(self, kind: str, on_start: Callable[[], None]) -> Gate:
        return StartNotice(on_start)

    def submit(self, executor: Executor, attempts: Sequence[Attempt], gate: Gate | None) -> Future[Any]:
        """Queue one attempt (``on_rank``) or a batch (``batch_on_rank``) on rank 0's executor, the most
        urgent first (a batch as its most urgent member). It counts as started when its worker says its
        attempt (a batch: the first) got a slot there (the gate, a ``StartNotice``, stays here). A placed
        attempt goes to a worker of the node it was placed on (its ``ctx.host``, set on rank 0 for that)."""
        call, args = (on_rank, (attempts[0],)) if len(attempts) == 1 else (batch_on_rank, (attempts,))
        return self.executor.submit_call(call, args, priority=max(a.priority for a in attempts),
                                         on_started=gate.on_start if isinstance(gate, StartNotice) else None,
                                         node=attempts[0].ctx.host or None)

    def batches(self, kind: str) -> float:
        return BATCH_SECONDS

    def prefetch_kinds(self) -> frozenset[str]:
        return frozenset({"shell", "python", "agent"})

    def hold(self) -> None:
        self.executor.hold_tasks()

    def terminate_running(self, grace: float) -> None:
        self.executor.stop_tasks()

    def shutdown(self, wait: bool = True) -> None:
        pass  # the executor is shut down by whoever made it (``mpi.run_in_world``)


# --- a worker rank ----------------------------------------------------------------------------------


class RankWorker:
    """What a worker rank does with the attempts rank 0 sends it: move each to this rank's work directory
    and environment, run it behind this rank's gate, journal its end, say where it ran.

    One per worker process, made by ``install`` before the rank serves. Rank 0 sends calls of the
    module-level functions ``on_rank`` and ``batch_on_rank``, which find this process's worker with
    ``worker()``: a call crosses by pickle, and a bound method would carry its object (slots, locks, open
    journals), which cannot be pickled and must not be copied; a function is pickled by name alone.
    """

    def __init__(self, rank: int, tasks_per_rank: int) -> None:
        # The environment shell and agent tasks start from: this rank's own, as it is now (the local
        # backend too takes the runner's environment once, at the start of the run); copying
        # ``os.environ`` for every attempt took about 20 us under mpiexec, 2 to 3% of a worker's own time
        # per tiny shell task.
        self.rank = rank
        self.host = socket.gethostname()
        self.env = dict(os.environ)
        self.slots = Slots(tasks_per_rank, keep_order=False)
        # python tasks (``isolation: process``): in worker processes of this rank, which take its slots too
        self.processes = WorkerProcesses(tasks_per_rank, self.slots)
        self._journals: dict[str, JsonlWriter] = {}  # run directory -> this rank's journal in it
        self._journals_lock = threading.Lock()
        self._dog: watchdog.Watchdog | None = None  # started with the rank's first task
        self._tasks_lock: int | None = None  # its shared lock on RUN_DIR/.tasks.lock

    def run(self, attempt: Attempt) -> Outcome:
        """``run_attempt`` behind this rank's gate, at the attempt's place in line (its priority). Raises
        ``CancelledError`` when a stop or a hold kept it from starting (nothing is journaled: it did not
        run)."""
        moved = self._moved(attempt)
        started = start_reporter()
        if moved.chdir:
            outcome = self.processes.submit_attempts([moved], moved.priority, True, started).result()
            if outcome.reason is OutcomeReason.NOT_STARTED:
                raise CancelledError("held back: the run is stopping")
            return self._finished(moved, outcome)
        gate = self._gate(moved, started)
        outcome = self._gated(moved, gate)
        if gate.refused:
            raise CancelledError("held back at its rank's gate: the run is stopping")
        return self._finished(moved, outcome)

    def run_batch(self, attempts: Sequence[Attempt]) -> list[Outcome]:
        """Several tiny attempts in one round trip, one after the other; those a stop or a
        hold kept from starting are not journaled. Rank 0 hears when the first starts."""
        started = start_reporter()
        if attempts and attempts[0].chdir:  # python tasks in worker processes (a batch is of one kind)
            sent = [self._moved(a) for a in attempts]
            ran = self.processes.submit_attempts(sent, max(a.priority for a in sent), on_start=started).result()
            return [o if o.reason is OutcomeReason.NOT_STARTED else self._finished(a, o) for a, o in zip(sent, ran)]
        moved = [(a, self._gate(a, started)) for a in map(self._moved, attempts)]
        outcomes = [self._gated(a, gate) for a, gate in moved]
        return [o if gate.refused else self._finished(a, o) for (a, gate), o in zip(moved, outcomes)]

    def hold(self) -> None:
        """The worker's ``on_hold``: the attempts waiting at (or on their way to) this rank's gate never
        start; each comes back to rank 0 as not started. A hold is for the rest of the run."""
        self.slots.stop()
        self.processes.hold()

    def stopper(self, grace: float) -> Callable[[], None]:
        """The worker's ``on_stop``: nothing more starts here, and the process groups of its running
        attempts (shell and agent) are terminated."""
        def stop() -> None:
            self.hold()
            self.processes.terminate(grace)
            threading.Thread(target=terminate_all, args=(grace,), daemon=True).start()

        return stop

    def close(self) -> None:
        """At the end of the worker's service: its worker processes end, and everything it journaled is
        written and fsynced."""
        self.processes.shutdown(wait=True, cancel_futures=True)
        with self._journals_lock:
            for journal in self._journals.values():
                journal.close()
            self._journals.clear()
            if self._dog is not None:
                ending = self._dog.close()  # tasks left running: the watchdog ends them, then unlocks
                if self._tasks_lock is not None:
                    if not ending:
                        fcntl.flock(self._tasks_lock, fcntl.LOCK_UN)
                    os.close(self._tasks_lock)
                    self._tasks_lock = None
                self._dog = None

    def _moved(self, attempt: Attempt) -> Attempt:
        """The attempt with its context moved to this rank's work directory (and, but for python tasks,
        this rank's environment)."""
        if self._dog is None:
            self._watch(attempt.ctx.run_dir, attempt.kill_grace)
        ctx = attempt.ctx
        ctx = TaskContext(ctx.task_id, ctx.run_dir, Layout(ctx.run_dir, ctx.sharding).work_dir(self.rank, ctx.task_id),
                          self.rank, ctx.attempt, self.host, ctx.matrix, ctx.sharding, ctx.launch)
        env = self.env if attempt.payload.kind != "python" else attempt.env
        return Attempt(attempt.payload, ctx, attempt.links, env, attempt.chdir, attempt.keep, attempt.kill_grace,
                       attempt.missing, attempt.priority, attempt.journal)

    def _watch(self, run_dir: str, grace: float) -> None:
        """Before this rank's first task: its watchdog, holding a shared lock on RUN_DIR/.tasks.lock, so
        that the rank's tasks end with it however it dies, and a new run waits until they have."""
        with self._journals_lock:
            if self._dog is not None:
                return
            try:
                self._tasks_lock = hold_tasks_lock(run_dir)
            except OSError as exc:
                print(f"cmbagent-batch: rank {self.rank}: warning: cannot lock {run_dir}/.tasks.lock "
                      f"({exc.strerror or exc}): a rerun will not wait for this rank's tasks", file=sys.stderr)
            self._dog = watchdog.start(grace, keep_fds=() if self._tasks_lock is None else (self._tasks_lock,))

    def _gate(self, attempt: Attempt, on_start: Callable[[], None]) -> SlotGate:
        """Its place in line for this rank's slots (an attempt run in this process)."""
        return self.slots.gate(on_start, attempt.priority)

    @staticmethod
    def _gated(attempt: Attempt, gate: SlotGate) -> Outcome:
        """``run_attempt``, then give back at once the slot a failure keeps (the local scheduler gives it
        back once it has seen the failure; here nothing waits for rank 0)."""
        try:
            return run_attempt(attempt, gate)
        finally:
            gate.settle()

    def _finished(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        ctx = attempt.ctx
        outcome = dataclasses.replace(outcome, rank=ctx.rank, host=ctx.host, work_dir=ctx.work_dir)
        journal = attempt.journal or {}
        state = TaskState.SUCCEEDED if outcome.ok else TaskState.FAILED
        rec: dict[str, Any] = {"t": time.time(), "run": journal.get("run"), "task": ctx.task_id,
                               "state": state.value, "attempt": ctx.attempt, "rank": ctx.rank, "host": ctx.host,
                               "by": "worker"}
        if outcome.ok:
            rec.update({k: v for k, v in journal.items() if k != "run"}, wall_s=round(outcome.wall_s, 6),
                       cpu_s=round(outcome.cpu_s, 6), peak_rss_mb=round(outcome.peak_rss_mb, 3),
                       work_bytes=outcome.work_bytes, output_bytes=outcome.output_bytes)
        else:
            rec.update(error=outcome.error, exit_code=outcome.exit_code, timed_out=outcome.timed_out,
                       work_dir=ctx.work_dir, traceback=outcome.traceback)
        if outcome.steps:  # the Slurm job steps its $CMBAGENT_LAUNCH started
            rec["steps"] = list(outcome.steps)
        try:
            self._journal(ctx.run_dir).append(rec)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            # Rank 0 journals the end too (its journal keeps a reserve for this); a failed attempt that met
            # the full disk stops the run there.
            if not outcome.ok and outcome.reason is None:
                outcome = dataclasses.replace(outcome, reason=OutcomeReason.DISK_FULL)
        return outcome

    def _journal(self, run_dir: str) -> JsonlWriter:
        with self._journals_lock:
            journal = self._journals.get(run_dir)
            if journal is None:
                journal = self._journals[run_dir] = JsonlWriter(journal_path(run_dir, self.rank))
            return journal


_worker: RankWorker | None = None  # this process's, when it is a worker rank (``install``)


def install(rank: int, tasks_per_rank: int) -> RankWorker:
    """Called once on each worker rank, before it serves: make the rank's ``RankWorker``, which the calls
    rank 0 sends find (``on_rank``, ``batch_on_rank``)."""
    global _worker
    _worker = RankWorker(rank, tasks_per_rank)
    return _worker


def worker() -> RankWorker:
    """This worker rank's ``RankWorker`` (``install`` made it)."""
    if _worker is None:
        raise RuntimeError("not a worker rank: cmbagent_batch.backends.ranks.install was not called")
    return _worker


def on_rank(attempt: Attempt) -> Outcome:
    """One attempt, run by this worker rank (``RankWorker.run``)."""
    return worker().run(attempt)


def batch_on_rank(attempts: Sequence[Attempt]) -> list[Outcome]:
    """Several tiny attempts, run by this worker rank (``RankWorker.run_batch``)."""
    return worker().run_batch(attempts)


def _nothing() -> None:
    pass
