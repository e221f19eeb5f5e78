"""Local executors: a thread pool for shell (and, by default, python) tasks, a process pool for python
callables when ``use_process_pool`` is set. The scheduler sees only ``concurrent.futures.Executor``s.

The thread pool has ``workers`` slots and more threads than that: an attempt prepares its work directory,
then waits at the gate for a slot, runs, gives the slot back and publishes its outputs. So the next
attempt is ready to start the moment a task ends, and directory work never holds a slot.

``hold`` (a stop with a drain) starts nothing more and lets what runs go on: the slots grant no more
attempts, and a process pool's workers refuse the calls they have not started.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import (
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from multiprocessing.context import BaseContext
from typing import Any

from cmbagent_batch.attempt import Attempt, Gate
from cmbagent_batch.backends.slots import Slots
from cmbagent_batch.tasks.runner import run_attempt, run_attempts
from cmbagent_batch.tasks.shell import terminate_all


class _ProcessPool(ProcessPoolExecutor):
    """A process pool whose workers start no call once ``held`` is set: what is queued in the pool, or
    already passed to a worker's queue, comes back as cancelled (``CancelledError``)."""

    def __init__(self, workers: int, context: BaseContext) -> None:
        self.held = context.Event()
        super().__init__(max_workers=workers, mp_context=context, initializer=_in_worker, initargs=(self.held,))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return super().submit(_unless_held, fn, *args, **kwargs)


_held: Any = None  # in a worker process of a _ProcessPool: its pool's ``held`` event


def _in_worker(held: Any) -> None:
    global _held
    _held = held


def _unless_held(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    if _held is not None and _held.is_set():
        raise CancelledError("not started: the run is stopping")
    return fn(*args, **kwargs)


class LocalPools:
    def __init__(self, workers: int, use_process_pool: bool) -> None:
        self.workers = workers
        self.use_process_pool = use_process_pool
        self.slots = Slots(workers)
        # Attempts handed over ahead of a free slot. Preparing one (directories, log files) takes about as
        # long as a tiny task runs, so with few workers more than one apiece wait ready.
        self.prefetch = max(workers, 4)
        self.threads = ThreadPoolExecutor(max_workers=workers + self.prefetch, thread_name_prefix="task")
        self.processes: _ProcessPool | None = None
        self.holding = False

    def _new_process_pool(self) -> _ProcessPool:
        # forkserver, not fork: the runner has threads (scheduler, journal, pools), and a child forked
        # while one of them holds a lock would hang on it.
        pool = _ProcessPool(self.workers, multiprocessing.get_context("forkserver"))
        if self.holding:
            pool.held.set()
        return pool

    def _in_processes(self, kind: str) -> bool:
        return kind == "python" and self.use_process_pool

    def executor_for(self, kind: str) -> Executor:
        if self._in_processes(kind):
            if self.processes is None:
                self.processes = self._new_process_pool()
            return self.processes
        return self.threads

    def gate(self, kind: str, on_start: Callable[[], None]) -> Gate | None:
        # A process pool runs one attempt per worker process: what is handed over waits in its queue.
        return None if self._in_processes(kind) else self.slots.gate(on_start)

    def submit(self, executor: Executor, attempts: Sequence[Attempt], gate: Gate | None) -> Future[Any]:
        """Hand one attempt (with its gate) or a batch of them (none has a gate) to ``executor``; the
        future's result is the attempt's ``Outcome``, or the batch's list of them."""
        if len(attempts) == 1:
            return executor.submit(run_attempt, attempts[0], gate)
        return executor.submit(run_attempts, attempts)

    def batches(self, kind: str) -> bool:
        return self._in_processes(kind)  # a round trip to a worker process costs ~0.1 ms; to a thread, little

    def prefetch_kinds(self) -> frozenset[str]:
        """Kinds whose attempts may be handed over ahead of a free worker (see ``Limits``)."""
        kinds = {"shell", "agent"} | ({"python"} if self.workers > 1 or not self.use_process_pool else set())
        return frozenset(kinds)

    def replace_broken(self, executor: Executor) -> None:
        """A worker process died: the pool is unusable, so start a new one (once per breakage)."""
        if executor is self.processes and self.processes is not None:
            self.processes.shutdown(wait=False, cancel_futures=True)
            self.processes = self._new_process_pool()

    def hold(self) -> None:
        """Start nothing more; running attempts go on. An attempt at (or on its way to) its gate ends
        "terminated by the runner before it started"; a process pool's calls not started are cancelled."""
        self.holding = True
        self.slots.stop()
        if self.processes is not None:
            self.processes.held.set()

    def terminate_running(self, grace: float) -> None:
        self.slots.stop()
        terminate_all(grace)
        if self.processes is not None:
            for proc in list(getattr(self.processes, "_processes", {}).values()):
                proc.terminate()

    def shutdown(self, wait: bool = True) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=wait, cancel_futures=True)
