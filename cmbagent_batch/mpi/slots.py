"""Which worker rank gets the next call: the least loaded one with a free slot, ties to the lowest rank.

Pure bookkeeping (no MPI), owned by rank 0's communication thread.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


class SlotTable:
    """At most ``per_rank`` calls in flight on each of ``ranks``.

    A heap of (load, rank) gives the least loaded rank in O(log n). Each change pushes the rank's new
    load; an entry whose load is no longer the rank's is stale and skipped when it reaches the top, and
    the heap is rebuilt when stale entries make it four times the number of ranks (which happens when
    every slot stays busy, so that nothing reaches the top).
    """

    def __init__(self, ranks: Sequence[int], per_rank: int) -> None:
        if per_rank < 1:
            raise ValueError(f"slots per rank must be at least 1, not {per_rank}")
        self.per_rank = per_rank
        self._load = {r: 0 for r in ranks}
        self._heap = [(0, r) for r in sorted(self._load)]
        self.free = per_rank * len(self._load)

    def take(self) -> int | None:
        """Book a slot on the least loaded rank and return that rank; None when every slot is busy."""
        if self.free == 0:
            return None
        heap = self._heap
        while True:
            load, rank = heap[0]
            if self._load[rank] == load:
                break
            heapq.heappop(heap)
        self._load[rank] = load + 1
        heapq.heapreplace(heap, (load + 1, rank))
        self.free -= 1
        return rank

    def give(self, rank: int) -> None:
        """Free a slot of ``rank`` (its call has ended)."""
        load = self._load[rank] - 1
        if load < 0:
            raise ValueError(f"rank {rank} has no call in flight")
        self._load[rank] = load
        self.free += 1
        if len(self._heap) >= 4 * len(self._load):
            self._heap = [(n, r) for r, n in self._load.items()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (load, rank))

    def load(self, rank: int) -> int:
        """Calls in flight on ``rank``."""
        return self._load[rank]
