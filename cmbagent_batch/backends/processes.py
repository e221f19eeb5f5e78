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
variables (``PMI_*``) behind: it is not one of the job's MPI processes. The worker process itself, seen
from its thread here and from inside, is ``backends.worker_process``.

Job steps: an attempt placed inside a Slurm allocation starts its ranks as job steps
(``$CMBAGENT_LAUNCH``). The worker ends them itself when it interrupts a call at its timeout
(``tasks.python``). When the worker is killed instead, its steps would outlive it, so they are ended here:
at a stop, ``scancel --signal=TERM`` as the worker gets SIGTERM, then a plain ``scancel`` to those squeue
still lists after ``grace`` (``tasks.shell.end_steps``); when its call never returned to Python, or the
worker died, a plain ``scancel`` (its process group was SIGKILLed). Either way the attempt's end names
them (``Outcome.steps``, read from the notes its steps left in its work directory), and a ``squeue`` or
``scancel`` that fails is a warning in its error and its ``logs/stderr.log``.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmbagent_batch.attempt import Attempt, Outcome, Stopped
from cmbagent_batch.backends.slots import Slots
from cmbagent_batch.backends.worker_process import Worker, kill_all
from cmbagent_batch.rundir.layout import Layout
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.metered import run_metered
from cmbagent_batch.tasks.places import adopt_scratch
from cmbagent_batch.tasks.shell import end_steps, log_step_problems, placed_steps, steps_ended, with_step_problems
from cmbagent_batch.tasks.workdir import tree_size

if TYPE_CHECKING:
    from cmbagent_batch.place.launch import TaskSteps


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
        self._running: dict[int, Worker] = {}  # thread index -> the worker running a call
        self._worker: dict[int, Worker | None] = {}  # thread index -> its worker process (None: none yet)
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
            attempt = w.attempt()
            w.steps = placed_steps(attempt.ctx, attempt.payload) if attempt is not None else None
        stepped = [w.steps for w in running if w.steps is not None]

        def term() -> None:
            for w in running:
                w.signal(signal.SIGTERM)

        if stepped:  # signalled as their steps' locks are held: the attempts' ends wait for the steps' end
            threading.Thread(target=end_steps, args=(stepped, grace, term), daemon=True).start()
        else:
            term()
        if running:
            timer = threading.Timer(grace, kill_all, args=(running,))
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
                        outcomes = self._metered(index, call.attempts, call.on_start)
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

    def _metered(self, index: int, attempts: Sequence[Attempt], on_start: Callable[[], None] | None) -> list[Outcome]:
        """``_run``; attempts that call models one at a time, each with its gateway grant open just while it
        runs (a batch's grants would outlive the attempts that end first)."""
        if not any(a.payload.models for a in attempts):
            return self._run(index, attempts, on_start)
        outcomes: list[Outcome] = []
        for attempt in attempts:
            outcomes += run_metered([attempt], functools.partial(self._run, index, on_start=on_start))
            on_start = None
        return outcomes

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

    def _start_worker(self) -> Worker:
        with self._lock:
            if self._held is None:
                self._held = self._context.RawValue("b", 1 if self._holding else 0)
        return Worker.start(self._context, self._held)

    def _casualty(self, worker: Worker, attempt: Attempt) -> Outcome:
        """The outcome of the attempt a worker died running; what it left in the worker's scratch directory
        becomes its work directory."""
        wall = time.monotonic() - worker.reported_at
        ctx = attempt.ctx
        with contextlib.suppress(OSError):  # then it stays there, said at the next run's start
            adopt_scratch(Layout(ctx.run_dir, ctx.sharding).scratch(ctx.rank, worker.process.pid), ctx)
        steps = worker.steps or _ended_with_worker(attempt)
        step_ids = steps.finish() if steps is not None else ()  # once a stop is done with them
        if steps is not None:
            log_step_problems(steps, ctx.logs_dir)
        work_bytes = tree_size(ctx.work_dir)
        if self._terminating:
            reason = OutcomeReason.TERMINATED_BY_RUNNER
            return Outcome(ok=False, error=with_step_problems(reason.message, steps), reason=reason, wall_s=wall,
                           work_bytes=work_bytes, steps=step_ids)
        timeout = attempt.payload.timeout
        if worker.killed_for_timeout and timeout is not None:
            error = (f"timed out after {timeout:g} s (the call did not return to Python: its worker process was "
                     f"killed {attempt.kill_grace:g} s later{steps_ended(steps, step_ids)})")
            return Outcome(ok=False, timed_out=True, wall_s=wall, work_bytes=work_bytes,
                           error=with_step_problems(error, steps), steps=step_ids)
        return Outcome(ok=False, error=with_step_problems(f"worker died: {worker.death()}", steps), wall_s=wall,
                       work_bytes=work_bytes, exit_code=worker.exitcode(), worker_died=True,
                       reason=OutcomeReason.WORKER_DIED, steps=step_ids)


def _ended_with_worker(attempt: Attempt) -> TaskSteps | None:
    """The job steps of an attempt whose worker was killed or died, cancelled on every node (plain
    ``scancel``: its process group had SIGKILL); None when it starts none."""
    steps = placed_steps(attempt.ctx, attempt.payload)
    if steps is not None:
        steps.end()
    return steps



def _nothing() -> None:
    pass


