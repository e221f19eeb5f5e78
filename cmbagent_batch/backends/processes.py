"""Worker processes for python tasks: ``WorkerProcesses`` runs whole attempts (one, or a batch of tiny
ones) in processes of its own, so that a segfault, a thread-unsafe library, ``os.chdir`` or a call that
never returns touches nothing but the attempt that did it.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one of its workers dies: every call in
it fails, and which one killed it is unknown. Here each worker process has its own pipe and its own
thread in the parent, which watches the pipe and the process itself. A worker writes, in memory it shares
with the parent, which attempt of its call it is running, and reports the outcomes in lists (a message
per tiny attempt would cost the runner about as much as the rest of the attempt). So when a worker dies,
the attempt it was running fails with the signal named (``worker died: SIGSEGV``); the attempts of its
batch that it ended after its last report, and those it had not started, run on a fresh worker; no other
worker notices.

Timeouts: a worker interrupts a python call at its ``timeout`` (SIGALRM, see ``tasks.python``) and writes
in the shared memory when the call is due to end, ``kill_grace`` included. A call stuck in C code, or one
that ignores SIGALRM, never returns to Python: the parent kills its worker then.

A worker process leads its own process group (what a python task starts ends with it), outside the
terminal's: Ctrl-C reaches the runner, which decides what ends. Under MPI it leaves the launcher's
variables (``PMI_*``) behind: it is not one of the job's MPI processes.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import multiprocessing
import multiprocessing.util  # before the atexit hook below, which must run before its exit handler
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from cmbagent_batch import watchdog
from cmbagent_batch.attempt import Attempt, Outcome, Stopped
from cmbagent_batch.backends.slots import Slots
from cmbagent_batch.rundir.layout import Layout
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.places import adopt_scratch
from cmbagent_batch.tasks.python import watch_timeouts
from cmbagent_batch.tasks.runner import run_attempt
from cmbagent_batch.tasks.workdir import tree_size

REPORT_EVERY = 0.01  # seconds: how long a worker may keep the outcomes of tiny attempts before reporting them
WATCH_EVERY = 0.25  # seconds: how often the parent looks at a running call's deadline
_MPI_JOB_VARIABLES = ("PMI_", "PMIX_", "PMI2_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDI_", "OMPI_")
# The shared memory of one worker: which attempt of its call (-1: none yet; 2i+1: attempt i runs; 2i+2:
# attempt i has ended) and when the running call must be over (monotonic seconds; 0.0: no deadline).
_PROGRESS, _DUE = 0, 1


@dataclass(order=True)
class _Call:
    key: tuple[float, int]  # (-priority, order handed over): the most urgent first, then first come
    attempts: Sequence[Attempt] = field(compare=False)
    future: Future[Any] = field(compare=False)
    single: bool = field(compare=False)  # the future's result is the one outcome, not a list
    on_start: Callable[[], None] | None = field(compare=False, default=None)  # called as a worker begins it


class WorkerProcesses(Executor):
    """``workers`` processes, each running one attempt at a time; ``submit_attempts`` hands over one
    attempt or a batch, the most urgent first. With ``slots`` (an MPI worker rank's), a worker takes one
    of them for each call, so python and shell tasks together keep to the rank's ``tasks_per_rank``.

    ``hold``: nothing more starts (the calls waiting here are cancelled; a batch running ends its
    attempts not started as ``NOT_STARTED``), what runs goes on. ``terminate``: ``hold``, and the workers
    running an attempt are ended (SIGTERM to their process group, SIGKILL ``grace`` seconds later); their
    attempts end "terminated by the runner".
    """

    def __init__(self, workers: int, slots: Slots | None = None) -> None:
        self.workers = workers
        self._slots = slots
        self._context = multiprocessing.get_context("forkserver")  # not fork: the runner has threads
        self._held: Any = None  # shared with the workers (a byte, no lock: a worker may die at any moment)
        self._holding = False
        self._lock = threading.Condition()
        self._queue: list[_Call] = []
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, _Worker] = {}  # thread index -> the worker running a call
        self._worker: dict[int, _Worker | None] = {}  # thread index -> its worker process (None: none yet)
        self._closed = False
        self._terminating = False

    def submit_attempts(self, attempts: Sequence[Attempt], priority: float = 0.0, single: bool = False,
                        on_start: Callable[[], None] | None = None) -> Future[Any]:
        """Run ``attempts`` one after the other on one worker; the future's result is their outcomes (the
        outcome when ``single``). It is cancelled if a hold or a stop comes before a worker takes it.
        ``on_start`` is called (on a thread of this pool) when a worker process begins the first."""
        future: Future[Any] = Future()
        with self._lock:
            if self._holding:  # nothing starts after a hold
                future.cancel()
                return future
            if self._closed:
                raise RuntimeError("cannot run attempts after shutdown")
            if len(self._threads) < self.workers:
                self._start_threads()
            heapq.heappush(self._queue, _Call((-priority, next(self._order)), attempts, future, single, on_start))
            self._lock.notify()
        return future

    def hold(self) -> None:
        with self._lock:
            self._holding = True
            if self._held is not None:
                self._held.value = 1
            queued, self._queue = self._queue, []
        for call in queued:
            call.future.cancel()

    def terminate(self, grace: float) -> None:
        self._terminating = True
        self.hold()
        with self._lock:
            running = list(self._running.values())
        for w in running:
            w.signal(signal.SIGTERM)
        if running:
            timer = threading.Timer(grace, _kill_all, args=(running,))
            timer.daemon = True
            timer.start()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                queued, self._queue = self._queue, []
                for call in queued:
                    call.future.cancel()
            self._lock.notify_all()
        if wait:
            for t in self._threads:
                t.join()

    # --- one thread per worker process -------------------------------------------------------------

    def _start_threads(self) -> None:
        for i in range(len(self._threads), self.workers):
            t = threading.Thread(target=self._serve, args=(i,), name=f"python-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _next(self) -> _Call | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            return heapq.heappop(self._queue) if self._queue else None

    def _serve(self, index: int) -> None:
        try:
            while (call := self._next()) is not None:
                if not call.future.set_running_or_notify_cancel():
                    continue
                try:
                    gate = self._slots.gate(_nothing, -call.key[0]) if self._slots is not None else None
                    if gate is not None:
                        gate.enter()
                    try:
                        outcomes = self._run(index, call.attempts, call.on_start)
                    finally:
                        if gate is not None:
                            gate.leave(True)
                except Stopped:
                    call.future.set_exception(CancelledError("held back: the run is stopping"))
                except BaseException as exc:  # noqa: BLE001 - e.g. an attempt that cannot be pickled
                    call.future.set_exception(exc)
                else:
                    call.future.set_result(outcomes[0] if call.single else outcomes)
        finally:
            worker = self._worker.pop(index, None)
            if worker is not None:
                worker.close()

    def _run(self, index: int, attempts: Sequence[Attempt], on_start: Callable[[], None] | None = None,
             ) -> list[Outcome]:
        """Run ``attempts`` on this thread's worker (a fresh one after a death), one outcome each;
        ``on_start`` is called as the worker is sent the first."""
        outcomes: list[Outcome] = []
        while len(outcomes) < len(attempts):
            rest = attempts[len(outcomes):]
            if self._holding:
                outcomes += [Outcome.because(OutcomeReason.NOT_STARTED)] * len(rest)
                break
            worker = self._worker.get(index)
            fresh = worker is None or not worker.alive()
            if worker is not None and fresh:
                worker.close()
            try:
                worker = self._start_worker() if fresh else worker
            except Exception as exc:  # noqa: BLE001 - e.g. the forkserver cannot start (OSError)
                outcomes += [Outcome(ok=False, error=f"cannot start a worker process for python tasks: {exc}")] * len(rest)
                break
            assert worker is not None
            self._worker[index] = worker
            with self._lock:
                self._running[index] = worker
            if on_start is not None:
                on_start()
                on_start = None
            try:
                ran = worker.run(rest)
            finally:
                with self._lock:
                    self._running.pop(index, None)
            outcomes += ran.outcomes
            if not ran.gone:
                continue
            self._worker[index] = None
            worker.close()
            if ran.running is None:  # it died between attempts: those it did not report run on a fresh one
                if fresh and not ran.started:  # a new worker that dies before its first attempt will not do better
                    error = f"a worker process for python tasks died as it started: {worker.death()}"
                    outcomes += [Outcome(ok=False, error=error)] * len(rest)
                continue
            # Those it ended after its last report run again on a fresh worker; the one it was running failed.
            casualty = self._casualty(worker, rest[ran.running])
            outcomes += self._run(index, rest[len(ran.outcomes):ran.running])
            outcomes.append(casualty)
        return outcomes

    def _start_worker(self) -> _Worker:
        with self._lock:
            if self._held is None:
                self._held = self._context.RawValue("b", 1 if self._holding else 0)
        return _Worker.start(self._context, self._held)

    def _casualty(self, worker: _Worker, attempt: Attempt) -> Outcome:
        """The outcome of the attempt a worker died running; what it left in the worker's scratch directory
        becomes its work directory."""
        wall = time.monotonic() - worker.reported_at
        ctx = attempt.ctx
        with contextlib.suppress(OSError):  # then it stays there, said at the next run's start
            adopt_scratch(Layout(ctx.run_dir, ctx.sharding).scratch(ctx.rank, worker.process.pid), ctx)
        work_bytes = tree_size(ctx.work_dir)
        if self._terminating:
            return Outcome.because(OutcomeReason.TERMINATED_BY_RUNNER, wall_s=wall, work_bytes=work_bytes)
        timeout = attempt.payload.timeout
        if worker.killed_for_timeout and timeout is not None:
            return Outcome(ok=False, timed_out=True, wall_s=wall, work_bytes=work_bytes,
                           error=f"timed out after {timeout:g} s (the call did not return to Python: its worker "
                                 f"process was killed {attempt.kill_grace:g} s later)")
        return Outcome(ok=False, error=f"worker died: {worker.death()}", wall_s=wall, work_bytes=work_bytes,
                       exit_code=worker.exitcode(), worker_died=True, reason=OutcomeReason.WORKER_DIED)


@dataclass
class _Ran:
    """What came back of a call to one worker."""

    outcomes: list[Outcome]
    gone: bool = False  # the worker died, or was killed
    running: int | None = None  # the attempt it was running then (an index in the call)
    started: bool = True  # it started an attempt of the call


_live: set[_Worker] = set()  # workers not closed yet: ended at exit, before multiprocessing joins them
# A forkserver child's exit status is read once from its sentinel, and ``Process.start`` reads those of
# every other child (``multiprocessing.process._cleanup``): two threads reading one at once leave one of
# them with 255 instead of, say, -9 (SIGKILL). Starts, joins and exit codes go one thread at a time.
_reaping = threading.Lock()


class _Worker:
    """One worker process, seen from its thread in the parent."""

    def __init__(self, process: Any, conn: Connection, shared: Any) -> None:
        self.process = process
        self.conn = conn
        self.shared = shared
        self.reported_at = 0.0  # monotonic: when it last reported
        self.killed_for_timeout = False

    @classmethod
    def start(cls, context: Any, held: Any) -> _Worker:
        parent, child = context.Pipe()
        shared = context.RawArray("d", 2)
        # Not a daemon: a python task may start processes of its own (multiprocessing.Pool, ...).
        process = context.Process(target=_serve_calls, args=(child, held, shared), name="python-worker")
        with _reaping:
            process.start()
        child.close()
        watchdog.track(process.pid)  # it leads its own group: ended by the watchdog if this process dies
        worker = cls(process, parent, shared)
        _live.add(worker)
        return worker

    def alive(self) -> bool:
        return not wait([self.process.sentinel], 0)

    def run(self, attempts: Sequence[Attempt]) -> _Ran:
        """Send the attempts and collect their outcomes as the worker reports them, until all are in or
        it is gone (dead, or killed because a call overran its deadline)."""
        self.shared[_PROGRESS] = -1.0
        self.shared[_DUE] = 0.0
        try:
            self.conn.send(list(attempts))
        except OSError:  # it died between calls (say, the OOM killer while idle): none started
            return self._gone([], attempts)
        self.reported_at = time.monotonic()
        timed = any(a.payload.timeout is not None for a in attempts)
        outcomes: list[Outcome] = []
        while len(outcomes) < len(attempts):
            ready = wait([self.conn, self.process.sentinel], WATCH_EVERY if timed else None)
            if not ready:
                due = self.shared[_DUE]
                if due and time.monotonic() > due:
                    self.killed_for_timeout = True
                    return self._gone(outcomes, attempts)
                continue
            if self.conn in ready:
                try:
                    outcomes += self.conn.recv()
                    self.reported_at = time.monotonic()
                    continue
                except (EOFError, OSError):
                    pass
            return self._gone(outcomes, attempts)
        return _Ran(outcomes)

    def _gone(self, outcomes: list[Outcome], attempts: Sequence[Attempt]) -> _Ran:
        """It died or must die: end its process group (what its tasks started too), read what it reported
        before, and find the attempt it was running."""
        self.signal(signal.SIGKILL)  # before it is reaped: its group id cannot have been reused yet
        self._join()
        try:
            while len(outcomes) < len(attempts) and self.conn.poll(0):
                outcomes += self.conn.recv()
        except (EOFError, OSError):
            pass
        progress = int(self.shared[_PROGRESS])
        running = (progress - 1) // 2 if progress > 0 and progress % 2 == 1 else None
        if running is not None and running < len(outcomes):
            running = None  # it reported that one after all
        return _Ran(outcomes, gone=True, running=running, started=progress >= 0)

    def _join(self) -> None:
        with _reaping:
            self.process.join(5)

    def signal(self, signum: int) -> None:
        pid = self.process.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signum)
        except OSError:  # not its own group yet (it is starting): the process alone
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def exitcode(self) -> int | None:
        with _reaping:
            code = self.process.exitcode
        return int(code) if code is not None else None

    def death(self) -> str:
        """How it died, in a few words: ``SIGSEGV``, ``SIGKILL (...)``, ``exit status 3``."""
        code = self.exitcode()
        if code is None:
            return "it closed its pipe"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"{name} (killed: out of memory, or by another process)" if code == -signal.SIGKILL else name
        return f"exit status {code} (the process exited: os._exit, or a C library called exit)"

    def close(self) -> None:
        """Tell it to end, then end its process group (what its tasks left behind), and reap it."""
        _live.discard(self)
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.conn.close()
        wait([self.process.sentinel], 2)
        self.signal(signal.SIGKILL)
        self._join()
        watchdog.untrack(self.process.pid)


def _nothing() -> None:
    pass


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.signal(signal.SIGKILL)


@atexit.register
def _end_live_workers() -> None:
    """At exit, the workers still there are ended (multiprocessing would otherwise wait for them)."""
    for w in list(_live):
        w.close()


# --- in the worker process ------------------------------------------------------------------------


def _serve_calls(conn: Connection, held: Any, shared: Any) -> None:
    """A worker process's life: run each list of attempts it is sent, until it is sent None or its pipe
    closes. It reports their outcomes in lists, at most ``REPORT_EVERY`` seconds apart and at the end
    of a call, and keeps ``shared`` up to date: which attempt it is running, and when a call with a
    timeout is due to end (its ``kill_grace`` included)."""
    os.setpgid(0, 0)
    for name in [n for n in os.environ if n.startswith(_MPI_JOB_VARIABLES)]:
        del os.environ[name]
    grace = [0.0]

    def due(at: float) -> None:
        shared[_DUE] = at + grace[0] if at else 0.0

    watch_timeouts(due)
    while True:
        try:
            attempts = conn.recv()
        except (EOFError, OSError):
            return
        if attempts is None:
            return
        report: list[Outcome] = []
        reported = time.monotonic()
        last = len(attempts) - 1
        for i, a in enumerate(attempts):
            shared[_PROGRESS] = 2 * i + 1
            grace[0] = a.kill_grace
            if held.value and i > 0:  # the first was reported started as it was handed over: it runs
                report.append(Outcome.because(OutcomeReason.NOT_STARTED))
            else:
                report.append(run_attempt(a))
            shared[_PROGRESS] = 2 * i + 2
            now = time.monotonic()
            if i == last or now - reported >= REPORT_EVERY:
                conn.send(report)
                report = []
                reported = now
