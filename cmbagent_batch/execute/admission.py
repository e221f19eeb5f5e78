"""Which ready tasks the scheduler may launch now: the ready line (by priority), the limits on workers,
CPUs and memory that submissions reserve, and the batching of tiny attempts.

Owned by the scheduler thread, like the rest of the scheduler's state.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from cmbagent_batch.execute.runs import Limits, TaskRun
from cmbagent_batch.place.booking import Placement

Clock = Callable[[], float]

# A batch holds at most BATCH_MAX attempts and, by their observed durations, about the seconds of work
# that the pools say (``Pools.batches``): enough to make the round trip negligible, little enough to
# balance the workers.
BATCH_MAX = 64


@dataclass(slots=True)
class Unit:
    """One submission to an executor: one attempt, or a batch run one after the other by one worker."""

    members: list[str]
    kind: str
    executor: Executor
    cpus: int
    memory_mb: float
    batch: bool
    started: bool = False  # the pool reported that it started (its attempt, or its batch's first)
    placement: Placement | None = None  # what it booked (a batch's members run one after the other there)


class Admission:
    """The ready line and what the submissions in flight reserve. ``select`` hands the scheduler the
    next submissions that fit; ``admitted`` and ``released`` keep the reservations."""

    def __init__(self, runs: dict[str, TaskRun], limits: Limits, batches: Callable[[str], float],
                 clock: Clock) -> None:
        self.runs = runs
        self.limits = limits
        self._batches = batches  # seconds of work a batch of a kind's tiny attempts holds (0: no batches)
        self._clock = clock
        self.ready: list[tuple[float, str]] = []  # (-priority, task id): a heap
        self.units = 0  # submissions in flight
        self._unit_kinds: Counter[str] = Counter()
        self._avg_wall: dict[str, float] = {}  # kind -> moving average of attempt wall seconds
        self._cpus_used = 0
        self._mem_used = 0.0
        self._mem_checked = (-1.0, 0.0)
        self._passed: dict[str, float] = {}  # tasks that did not fit and were passed by others: since when
        self._gone: set[str] = set()  # passed tasks launched while holding, whose ready entries are still there

    def push(self, r: TaskRun) -> None:
        heapq.heappush(self.ready, (-r.priority, r.id))

    def cap(self) -> int:
        """Submissions in flight at most."""
        lim = self.limits
        return lim.max_workers + (lim.prefetch if lim.prefetch_kinds and lim.booking is None else 0)

    def launch_ready(self, submit: Callable[[list[TaskRun]], None]) -> None:
        """Submit (``submit``, which calls ``admitted``) the ready tasks that fit, the most urgent first,
        tiny ones of a kind together."""
        if self._holding():
            self._launch_passed(submit)
            return
        deferred = []
        cap = self.cap()
        ready = self.ready
        booking = self.limits.booking
        blocked: str | None = None  # the most urgent task that did not fit this time
        while ready and self.units < cap:
            item = heapq.heappop(ready)
            if item[1] in self._gone:  # launched from the passed ones: its entry goes now
                self._gone.discard(item[1])
                continue
            r = self.runs[item[1]]
            if not self._fits(r):
                deferred.append(item)
                continue
            if not self._memory_ok():
                deferred.append(item)
                break
            if booking is not None:
                r.placement = booking.place(r.shape)
                if r.placement is None:
                    if not self.units:  # nothing holds anything: it will never fit (the preflight says so first)
                        raise RuntimeError(f"task {r.id} fits nowhere in the inventory ({booking.total_cpus} CPUs, "
                                           f"{booking.total_gpus} GPUs in all)")
                    blocked = blocked or r.id
                    deferred.append(item)
                    if self.limits.backfill_s <= 0:  # no backfill: first fit, in order
                        break
                    continue
                self._passed.pop(r.id, None)
                if blocked is not None:  # it goes past a more urgent task that does not fit: backfill
                    self._passed.setdefault(blocked, self._clock())
            members = [r]
            size = self._batch_size(r)
            while len(members) < size and ready:
                nxt = self.runs[ready[0][1]]
                if nxt.kind != r.kind or not self._prefetchable(nxt):
                    break
                heapq.heappop(ready)
                nxt.placement = r.placement
                members.append(nxt)
            submit(members)
        for item in deferred:
            heapq.heappush(ready, item)

    def admitted(self, unit: Unit) -> None:
        self.units += 1
        self._unit_kinds[unit.kind] += 1
        self._cpus_used += unit.cpus
        self._mem_used += unit.memory_mb

    def released(self, unit: Unit) -> None:
        self.units -= 1
        self._unit_kinds[unit.kind] -= 1
        self._cpus_used -= unit.cpus
        self._mem_used -= unit.memory_mb
        if unit.placement is not None and self.limits.booking is not None:
            self.limits.booking.release(unit.placement)

    def _launch_passed(self, submit: Callable[[list[TaskRun]], None]) -> None:
        """While holding: only the tasks that were passed start, the most urgent first, each once it fits
        (looking at them only: the ready line is not walked; their entries there are dropped later)."""
        booking = self.limits.booking
        assert booking is not None  # tasks are passed only when booked
        for tid in sorted(self._passed, key=lambda t: (-self.runs[t].priority, t)):
            r = self.runs[tid]
            if self.units >= self.cap() or not self._fits(r) or not self._memory_ok():
                return
            r.placement = booking.place(r.shape)
            if r.placement is None:
                return  # in order: what frees up goes to the most urgent first
            del self._passed[tid]
            self._gone.add(tid)
            submit([r])

    def _holding(self) -> bool:
        """Whether a task that does not fit has been passed by less urgent ones for ``backfill_s``: then
        only such passed tasks may start, so the resources that free up go to them, and none waits forever
        for a stream of smaller ones."""
        if not self._passed:
            return False
        oldest = next(iter(self._passed.values()))
        return self._clock() - oldest >= self.limits.backfill_s

    def observed(self, r: TaskRun) -> None:
        """A success's wall time joins its kind's moving average (which sizes batches)."""
        avg = self._avg_wall.get(r.kind)
        self._avg_wall[r.kind] = r.wall_s if avg is None else 0.8 * avg + 0.2 * r.wall_s

    def _prefetchable(self, r: TaskRun) -> bool:
        return r.small and r.kind in self.limits.prefetch_kinds

    def _fits(self, r: TaskRun) -> bool:
        lim = self.limits
        # Handing over ahead (past max_workers) only among small tasks of one prefetch kind: a mix with
        # other kinds, or tasks that reserve resources, would break max_workers and cpu limits.
        units = self.units
        ahead = lim.prefetch if (lim.booking is None and self._prefetchable(r)
                                 and self._unit_kinds[r.kind] == units) else 0
        if units >= lim.max_workers + ahead:
            return False
        if lim.booking is not None:  # booked per node when placed
            return True
        if units and self._cpus_used + r.cpus > lim.cpus + ahead:
            return False
        return lim.memory_mb is None or not units or self._mem_used + r.memory_mb <= lim.memory_mb

    def _memory_ok(self) -> bool:
        """False while memory in use is past the safety fraction (checked at most 5 times a second)."""
        probe = self.limits.memory_in_use
        if probe is None or not self.units:
            return True
        now = self._clock()
        if now - self._mem_checked[0] > 0.2:
            self._mem_checked = (now, probe())
        return self._mem_checked[1] < self.limits.memory_safety_fraction

    def _batch_size(self, r: TaskRun) -> int:
        """How many ready attempts of ``r``'s kind to hand over together: 1 until their durations are
        known, then about the pools' seconds of work for a batch, never so many that a worker would be left
        without."""
        avg = self._avg_wall.get(r.kind)
        if avg is None or not self._prefetchable(r):
            return 1
        seconds = self._batches(r.kind)
        if not seconds:
            return 1
        by_time = int(seconds / max(avg, 1e-6))
        by_share = len(self.ready) // (self.limits.max_workers + self.limits.prefetch) + 1
        return max(1, min(BATCH_MAX, by_time, by_share))
