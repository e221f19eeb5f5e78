"""Which worker rank gets the next call, and how many calls each may hold.

``SlotTable``: the least loaded rank below the limit, ties to the lowest rank. ``Pace``: the limit, from
how fast the workers end their calls. Pure bookkeeping (no MPI), owned by rank 0's communication thread.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence


class SlotTable:
    """At most ``per_rank`` calls in flight on each of ``ranks``. ``per_rank`` may change at any time: a
    rank above a lowered limit gets nothing more until its calls end.

    A heap of (load, rank) gives the least loaded rank in O(log n). Each change pushes the rank's new
    load; an entry whose load is no longer the rank's is stale and skipped when it reaches the top, and
    the heap is rebuilt when stale entries make it four times the number of ranks (which happens when
    every slot stays busy, so that nothing reaches the top).
    """

    def __init__(self, ranks: Sequence[int], per_rank: int) -> None:
        self._load = {r: 0 for r in ranks}
        self._heap = [(0, r) for r in sorted(self._load)]
        self.per_rank = per_rank

    @property
    def per_rank(self) -> int:
        return self._per_rank

    @per_rank.setter
    def per_rank(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"slots per rank must be at least 1, not {value}")
        self._per_rank = value

    def _least(self) -> tuple[int, int]:
        heap = self._heap
        while True:
            load, rank = heap[0]
            if self._load[rank] == load:
                return load, rank
            heapq.heappop(heap)

    def room(self) -> bool:
        """Whether some rank is below the limit."""
        return self._least()[0] < self._per_rank

    def least_load(self) -> int:
        """Calls in flight on the least loaded rank."""
        return self._least()[0]

    def take(self) -> int | None:
        """Book a slot on the least loaded rank and return that rank; None when every rank is at the limit."""
        load, rank = self._least()
        if load >= self._per_rank:
            return None
        self._load[rank] = load + 1
        heapq.heapreplace(self._heap, (load + 1, rank))
        return rank

    def take_among(self, ranks: Sequence[int]) -> int | None:
        """Book a slot on the least loaded of ``ranks`` (ties to the first); None when each is at the limit.
        It looks at each of them: meant for the few ranks of one node."""
        load, rank = min((self._load[r], r) for r in ranks)
        if load >= self._per_rank:
            return None
        self._load[rank] = load + 1
        heapq.heappush(self._heap, (load + 1, rank))
        return rank

    def give(self, rank: int) -> None:
        """Free a slot of ``rank`` (its call has ended)."""
        load = self._load[rank] - 1
        if load < 0:
            raise ValueError(f"rank {rank} has no call in flight")
        self._load[rank] = load
        if len(self._heap) >= 4 * len(self._load):
            self._heap = [(n, r) for r, n in self._load.items()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (load, rank))

    def load(self, rank: int) -> int:
        """Calls in flight on ``rank``."""
        return self._load[rank]


class Pace:
    """How many calls each of ``workers`` ranks may hold: ``least``, plus as many as one rank ends in
    ``cover`` seconds (whole calls) at the pace of the last ``window`` calls to end anywhere, at most
    ``most``.

    Calls held beyond a rank's free slots let a slot that frees start its next call at once, however late
    rank 0 gets a core; but they wait behind whatever that rank runs, which may be long. Sized by the
    pace, they cover ``cover`` seconds of rank 0's absence when calls are short, and shrink to ``least``
    when calls are long, so that a long call keeps back about ``cover`` seconds of work, not a fixed
    number of calls. Until ``window`` calls have ended the pace is not known: ``least``. The pace is
    that of calls that ended: after a run of short calls, long ones that follow are sent as far ahead
    as the short ones were, until some of them end.
    """

    def __init__(self, workers: int, least: int, most: int, cover: float, window: int = 64) -> None:
        if not 1 <= least <= most:
            raise ValueError(f"need 1 <= least <= most, not least {least}, most {most}")
        self._workers = workers
        self._least = least
        self._most = most
        self._cover = cover
        self._ends: deque[float] = deque(maxlen=window)

    def ended(self, t: float) -> None:
        """A call ended at ``t`` (monotonic seconds)."""
        self._ends.append(t)

    def limit(self) -> int:
        gap = self.gap()
        if gap is None:
            return self._least
        return min(self._most, self._least + math.floor(self._cover / gap))

    def gap(self, known: int | None = None) -> float | None:
        """Seconds between two ends on one rank, at the pace of the last ``window`` ends; None until
        ``known`` calls (default: ``window``) have ended."""
        ends = self._ends
        if len(ends) < max(2, known or ends.maxlen or 0) or ends[-1] <= ends[0]:
            return None
        return (ends[-1] - ends[0]) / (len(ends) - 1) * self._workers
