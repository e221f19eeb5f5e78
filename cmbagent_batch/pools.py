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
import threading
from collections.abc import Callable
from concurrent.futures import (
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from multiprocessing.context import BaseContext
from typing import Any

from cmbagent_batch.tasks.base import Stopped
from cmbagent_batch.tasks.shell import terminate_all


class Slots:
    """At most ``n`` attempts of a thread pool execute at once, and they start in the order they were
    handed over (the scheduler's priority order), not in the order their threads reach the gate: a slot
    is kept for an attempt handed over earlier that is still preparing. None starts once stopping.

    With ``keep_order=False`` a free slot goes to the first attempt in line that is ready to start, and
    the line is ordered by each gate's ``priority`` (higher first, then hand-over order): an MPI worker
    rank, which gets attempts a few at a time and ahead of its slots, runs what is ready, the most urgent
    first, instead of idling while a newly arrived attempt prepares.

    The thread that frees a slot starts the next attempt itself (its ``start``, e.g. spawning bash) before
    waking that attempt's thread: the process starts without waiting for a thread to wake and get the GIL.
    """

    def __init__(self, n: int, keep_order: bool = True) -> None:
        self._lock = threading.Lock()
        self._free = n
        self._keep_order = keep_order
        self._line: list[_Gate] = []  # handed over, not holding a slot yet, in the order they get one
        self.stopping = False

    def gate(self, on_start: Callable[[], None], priority: float = 0.0) -> _Gate:
        g = _Gate(self, on_start, priority)
        with self._lock:
            at = len(self._line)
            while at and self._line[at - 1].priority < priority:
                at -= 1
            self._line.insert(at, g)
        return g

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            for g in self._line:
                g._granted.set()  # wakes it to find the run stopping

    def _grant(self) -> list[_Gate]:
        """Give free slots to the first attempts in line that wait for one (the lock is held)."""
        granted: list[_Gate] = []
        i = 0
        while not self.stopping and i < len(self._line) and self._free > 0:
            if self._keep_order and i >= self._free:
                break  # the free slots are kept for attempts ahead in line that are still preparing
            g = self._line[i]
            if g._waiting:
                del self._line[i]
                self._free -= 1
                granted.append(g)
            else:
                i += 1
        return granted

    @staticmethod
    def _begin_all(granted: list[_Gate]) -> None:
        """Start the granted attempts here (the lock is not held), then wake their threads."""
        for g in granted:
            g._begin()
            g._granted.set()

    def _enter(self, g: _Gate) -> None:
        granted: list[_Gate] = []
        with self._lock:
            if self.stopping:
                g._granted.set()  # the check below raises Stopped
            elif g in self._line:
                g._waiting = True
                granted = self._grant()
        self._begin_all(granted)
        g._granted.wait()
        if not g._begun:  # woken by stop()
            with self._lock:
                if g in self._line:
                    self._line.remove(g)
            g.refused = True
            raise Stopped("terminated by the runner before it started")

    def _release(self) -> None:
        with self._lock:
            self._free += 1
            granted = self._grant()
        self._begin_all(granted)

    def _withdraw(self, g: _Gate) -> None:
        with self._lock:
            if g not in self._line:
                return
            self._line.remove(g)
            granted = self._grant()
        self._begin_all(granted)


class _Gate:
    """The ``Gate`` of one attempt (see ``cmbagent_batch.tasks.base.Gate``)."""

    def __init__(self, slots: Slots, on_start: Callable[[], None], priority: float = 0.0) -> None:
        self._slots = slots
        self._on_start = on_start
        self.priority = priority
        self.refused = False  # it reached the gate and a stop kept it from starting
        self._start: Callable[[], Any] | None = None
        self._waiting = False
        self._granted = threading.Event()
        self._begun = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._kept = False

    def enter(self, start: Callable[[], Any] | None = None) -> Any:
        self._start = start
        self._slots._enter(self)
        if self._error is not None:
            self._kept = True  # it holds a slot; the scheduler frees it once it has seen the failure
            raise self._error
        return self._result

    def _begin(self) -> None:
        self._begun = True
        try:
            self._on_start()
            if self._start is not None:
                self._result = self._start()
        except BaseException as exc:  # noqa: BLE001 - handed to the attempt's own thread
            self._error = exc

    def leave(self, ok: bool) -> None:
        if ok:
            self._slots._release()
        else:
            self._kept = True  # read by settle() on the scheduler thread, after this attempt's future is done

    def withdraw(self) -> None:
        self._slots._withdraw(self)

    def settle(self) -> None:
        self._slots._withdraw(self)  # an attempt that never ran (cancelled) leaves the line
        if self._kept:
            self._kept = False
            self._slots._release()


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

    def gate(self, kind: str, on_start: Callable[[], None]) -> _Gate | None:
        # A process pool runs one attempt per worker process: what is handed over waits in its queue.
        return None if self._in_processes(kind) else self.slots.gate(on_start)

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
