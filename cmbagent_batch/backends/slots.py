"""A pool's slots: at most ``n`` attempts execute at once; the others wait at their gate.

Used by the local thread pool (``backends.local``) and by each MPI worker rank (``backends.ranks``).
``StartNotice`` is the gate of a pool with no slot in this process, which reports starts itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cmbagent_batch.attempt import Stopped
from cmbagent_batch.states import OutcomeReason


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
        self._line: list[SlotGate] = []  # handed over, not holding a slot yet, in the order they get one
        self.stopping = False

    def gate(self, on_start: Callable[[], None], priority: float = 0.0) -> SlotGate:
        g = SlotGate(self, on_start, priority)
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

    def _grant(self) -> list[SlotGate]:
        """Give free slots to the first attempts in line that wait for one (the lock is held)."""
        granted: list[SlotGate] = []
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
    def _begin_all(granted: list[SlotGate]) -> None:
        """Start the granted attempts here (the lock is not held), then wake their threads."""
        for g in granted:
            g._begin()
            g._granted.set()

    def _enter(self, g: SlotGate) -> None:
        granted: list[SlotGate] = []
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
            raise Stopped(OutcomeReason.NOT_STARTED)

    def _release(self) -> None:
        with self._lock:
            self._free += 1
            granted = self._grant()
        self._begin_all(granted)

    def _withdraw(self, g: SlotGate) -> None:
        with self._lock:
            if g not in self._line:
                return
            self._line.remove(g)
            granted = self._grant()
        self._begin_all(granted)


class SlotGate:
    """The ``Gate`` of one attempt (see ``cmbagent_batch.attempt.Gate``)."""

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


class StartNotice:
    """The gate of a submission to a pool that reports its start itself (worker processes, worker ranks):
    it carries the scheduler's ``on_start`` to the pool, which calls it when a worker begins the
    submission. Nothing enters it: the pool has no slot to wait for in this process."""

    def __init__(self, on_start: Callable[[], None]) -> None:
        self.on_start = on_start

    def enter(self, start: Callable[[], Any] | None = None) -> Any:
        raise AssertionError("a start notice is never entered: the pool reports the start itself")

    def leave(self, ok: bool) -> None:
        pass

    def withdraw(self) -> None:
        pass

    def settle(self) -> None:
        pass  # no slot is kept here for a failure
