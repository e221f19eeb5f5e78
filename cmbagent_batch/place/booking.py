"""What runs where: the cores, GPUs and memory booked on each node of the inventory by the running tasks.

Rank 0 holds one ``Booking`` for a run. ``place`` books a task's shape where it fits now, or says it does
not fit; ``release`` gives back exactly what was booked. A single-node shape is packed (best fit: the node
it leaves with the fewest free cores, then the fewest free GPUs, then the first by name); a multi-node
shape gets ``nodes`` distinct nodes, chosen by the same order, each with the shape's cores, GPUs and memory
per node. Memory is booked only for a shape that gives ``memory_mb`` and only on nodes whose memory is
known.

Cost, with ``k`` the cores and GPUs booked or released: nodes sit in buckets by their free (cores, GPUs),
each bucket kept in name order and the bucket keys sorted. ``place`` looks at the buckets with enough free
cores in order, one per count of free cores where the GPUs lack (their number is bounded by the size of a
node, not by the number of nodes or tasks), and at the nodes it takes, plus those of the same free cores
and GPUs that lack the memory. Moving a node between buckets is a bisection and a list insert. Free cores and GPUs
are stacks per node, so booking or releasing ``k`` of them costs O(k). A shape that asks for more cores
or GPUs than any node has free fails at once; one that did not fit is remembered until the next release,
so asking again costs O(1).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.place.inventory import Inventory, Node
from cmbagent_batch.spec.model import Resources

_Key = tuple[int, int]  # a bucket's (free cores, free GPUs)
_Shape = tuple[int, int, int, int | None]  # nodes, cores per node, GPUs per node, memory per node
FAILED_SHAPES_KEPT = 1024  # distinct shapes remembered as not fitting; all forgotten past this


def core_ranges(cores: Iterable[int]) -> str:
    """Sorted core indices as compact ranges: ``(0, 1, 2, 3, 8)`` -> ``"0-3,8"``; ``""`` for none."""
    parts = []
    for _, run in itertools.groupby(enumerate(cores), lambda pair: pair[1] - pair[0]):
        first, *rest = (core for _, core in run)
        parts.append(f"{first}-{rest[-1]}" if rest else str(first))
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one task runs: the nodes given to it and what is booked on each (the same amounts on all)."""

    hosts: tuple[str, ...]  # one per node given, in name order
    cores: tuple[tuple[int, ...], ...]  # core indices booked on each (0 .. Node.cpus - 1), ascending
    gpus: tuple[tuple[str, ...], ...]  # GPU ids booked on each, in the node's order
    memory_mb: int | None  # the task's memory per node; booked on the nodes whose memory is known
    ranks_per_node: int

    @property
    def ranks(self) -> int:
        return self.ranks_per_node * len(self.hosts)

    def describe(self) -> str:
        """One line for people: ``n1 cores 0-3 GPUs 0,1; n2 cores 0-3 GPUs 2,3; 2,048 MB per node``."""
        return describe_record(self.record())

    def record(self) -> dict[str, Any]:
        """What a run's records keep of it (JSON-ready): hosts, cores as compact ranges, GPU ids, memory."""
        return {"hosts": list(self.hosts), "cores": [core_ranges(c) for c in self.cores],
                "gpus": [list(g) for g in self.gpus], "memory_mb": self.memory_mb,
                "ranks_per_node": self.ranks_per_node}


def describe_record(record: dict[str, Any]) -> str:
    """``Placement.describe`` of what ``Placement.record`` made (a journal's ``placement``)."""
    hosts, cores, gpus = record.get("hosts") or [], record.get("cores") or [], record.get("gpus") or []
    parts = [f"{host} cores {ranges}" + (f" GPUs {','.join(map(str, ids))}" if ids else "")
             for host, ranges, ids in zip(hosts, cores, gpus)]
    if record.get("memory_mb") is not None:
        parts.append(f"{record['memory_mb']:,} MB per node")
    return "; ".join(parts)


@dataclass(slots=True, eq=False)
class _Free:
    """What is free on one node. The stacks give their last element first."""

    index: int  # the node's position in name order
    node: Node
    cores: list[int]  # free core indices
    gpus: list[int]  # free GPU positions in node.gpus
    gpu_position: dict[str, int]
    memory: int | None  # free MB; None when the node's memory is unknown
    core_busy: bytearray  # 1 at a booked core
    gpu_busy: bytearray  # 1 at a booked GPU position

    @classmethod
    def of(cls, index: int, node: Node) -> _Free:
        return cls(index, node, list(range(node.cpus - 1, -1, -1)), list(range(len(node.gpus) - 1, -1, -1)),
                   {gpu: i for i, gpu in enumerate(node.gpus)}, node.memory_mb, bytearray(node.cpus),
                   bytearray(len(node.gpus)))

    @property
    def key(self) -> _Key:
        return len(self.cores), len(self.gpus)

    def has_room(self, cpus: int, gpus: int, memory: int | None) -> bool:
        return len(self.cores) >= cpus and len(self.gpus) >= gpus and (
            memory is None or self.memory is None or self.memory >= memory)


def _take(stack: list[int], busy: bytearray, count: int) -> tuple[int, ...]:
    """Pop ``count`` entries off a free stack and mark them busy; ascending."""
    cut = len(stack) - count
    taken = sorted(stack[cut:])
    del stack[cut:]
    for i in taken:
        busy[i] = 1
    return tuple(taken)


def _give_back(stack: list[int], busy: bytearray, given: Iterable[int]) -> None:
    """Mark ascending entries free and push them so that the lowest is booked next."""
    given = tuple(given)
    for i in given:
        busy[i] = 0
    stack.extend(reversed(given))


class Booking:
    """The resources booked by the running tasks on an inventory's nodes (one thread uses it)."""

    def __init__(self, inventory: Inventory) -> None:
        nodes = sorted(inventory.nodes, key=lambda n: n.name)
        for a, b in itertools.pairwise(nodes):
            if a.name == b.name:
                raise ValueError(f"the inventory lists node {a.name!r} twice")
        self._free = [_Free.of(i, node) for i, node in enumerate(nodes)]
        self._by_name = {f.node.name: f for f in self._free}
        self._buckets: dict[_Key, list[int]] = {}
        for f in self._free:  # in name order: each bucket comes out sorted
            self._buckets.setdefault(f.key, []).append(f.index)
        self._keys = sorted(self._buckets)
        self._with_free_gpus = [0] * (max((len(n.gpus) for n in nodes), default=0) + 1)  # nodes, by free GPUs
        for f in self._free:
            self._with_free_gpus[len(f.gpus)] += 1
        self._failed: set[_Shape] = set()  # shapes that did not fit since the last release
        self.total_cpus = sum(node.cpus for node in nodes)
        self.total_gpus = sum(len(node.gpus) for node in nodes)
        self.busy_cpus = 0
        self.busy_gpus = 0
        self.steps = 0  # buckets and nodes looked at by `place`, in all: its cost, counted for the benchmark

    def place(self, r: Resources) -> Placement | None:
        """Book ``r`` where it fits now and say where, or None (nothing booked) when it does not fit now."""
        rpn = r.ranks_per_node
        count, cpus, gpus, memory = shape = (r.nodes, rpn * r.cpus_per_rank, rpn * r.gpus_per_rank, r.memory_mb)
        if shape in self._failed:
            return None
        chosen = self._find(count, cpus, gpus, memory)
        if chosen is None:
            if len(self._failed) >= FAILED_SHAPES_KEPT:
                self._failed.clear()
            self._failed.add(shape)
            return None
        chosen.sort(key=lambda f: f.index)
        booked_cores, booked_gpus = [], []
        for f in chosen:
            self._unfile(f)
            booked_cores.append(_take(f.cores, f.core_busy, cpus))
            booked_gpus.append(tuple(f.node.gpus[i] for i in _take(f.gpus, f.gpu_busy, gpus)))
            if memory is not None and f.memory is not None:
                f.memory -= memory
            self._file(f)
        self.busy_cpus += cpus * count
        self.busy_gpus += gpus * count
        return Placement(tuple(f.node.name for f in chosen), tuple(booked_cores), tuple(booked_gpus), memory, rpn)

    def release(self, p: Placement) -> None:
        """Give back what ``p`` booked. A placement that is not booked here (released twice, or from another
        booking) raises ValueError and changes nothing."""
        frees = [self._by_name.get(host) for host in p.hosts]
        for host, f, cores, gpus in zip(p.hosts, frees, p.cores, p.gpus, strict=True):
            if f is None:
                raise ValueError(f"release: no node {host!r} in the inventory")
            if not all(0 <= c < f.node.cpus and f.core_busy[c] for c in cores) or not all(
                    g in f.gpu_position and f.gpu_busy[f.gpu_position[g]] for g in gpus):
                raise ValueError(f"release: {p.describe()} is not booked")
        for f, cores, gpus in zip(frees, p.cores, p.gpus, strict=True):
            assert f is not None
            self._unfile(f)
            _give_back(f.cores, f.core_busy, cores)
            _give_back(f.gpus, f.gpu_busy, sorted(f.gpu_position[g] for g in gpus))
            if p.memory_mb is not None and f.memory is not None:
                f.memory += p.memory_mb
            self._file(f)
            self.busy_cpus -= len(cores)
            self.busy_gpus -= len(gpus)
        self._failed.clear()

    def _find(self, count: int, cpus: int, gpus: int, memory: int | None) -> list[_Free] | None:
        """``count`` distinct nodes with room for the shape, best fit first; None if there are not enough."""
        keys = self._keys
        if not keys or keys[-1][0] < cpus or (gpus and not any(self._with_free_gpus[gpus:])):
            return None  # no node has that many cores free, or that many GPUs
        chosen: list[_Free] = []
        k = bisect.bisect_left(keys, (cpus, gpus))
        while k < len(keys):
            self.steps += 1
            free_cores, free_gpus = keys[k]
            if free_gpus < gpus:  # too few GPUs: on to the first bucket with enough of them and more cores
                k = bisect.bisect_left(keys, (free_cores, gpus), k + 1)
                continue
            for index in self._buckets[keys[k]]:
                self.steps += 1
                f = self._free[index]
                if f.has_room(cpus, gpus, memory):
                    chosen.append(f)
                    if len(chosen) == count:
                        return chosen
            k += 1
        return None

    def _unfile(self, f: _Free) -> None:
        """Take a node out of its bucket (before what is free on it changes)."""
        key = f.key
        self._with_free_gpus[key[1]] -= 1
        bucket = self._buckets[key]
        del bucket[bisect.bisect_left(bucket, f.index)]
        if not bucket:
            del self._buckets[key]
            del self._keys[bisect.bisect_left(self._keys, key)]

    def _file(self, f: _Free) -> None:
        """Put a node in the bucket of what is free on it now."""
        key = f.key
        self._with_free_gpus[key[1]] += 1
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            bisect.insort(self._keys, key)
        bisect.insort(bucket, f.index)
