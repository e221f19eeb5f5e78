"""The task dependency graph: pure graph logic (no I/O, no clock, no environment).

A :class:`Dag` is built once from task ids and :class:`Edge` s and then only read. Internally every id
gets the integer index of its position in sorted order, and the graph is kept as plain lists indexed by
those integers (``succ[i]`` lists the dependents of task ``i``), so that the hot loops touch no strings
and no dicts; graphs of a million tasks build in seconds. Every answer is sorted by id, never in the
order edges happened to be given, so two runs of the same spec plan the same way. Every walk is
iterative: a chain of a million tasks does not reach the recursion limit.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from numbers import Real
from operator import add, attrgetter, eq, mul

from cmbagent_batch.errors import CycleError
from cmbagent_batch.spec.checks import closed_loop, walk_to_loop

EDGE_TYPES = ("data", "file", "api", "logic", "order")
"""What an edge carries: data in memory, a file, an API contract, a logical precondition, plain order."""

EDGE_SOURCES = ("explicit", "files", "llm", "fallback")
"""Where an edge comes from, most trusted first: when two edges join the same pair, the first listed wins."""

_RANK = {source: rank for rank, source in enumerate(EDGE_SOURCES)}
_TYPES = frozenset(EDGE_TYPES)
_SRC = attrgetter("src")
_DST = attrgetter("dst")
_ENDS = attrgetter("src", "dst")
_SOURCE = attrgetter("source")


@dataclass(frozen=True, slots=True)
class Edge:
    """``dst`` depends on ``src``: ``src`` must finish before ``dst`` starts.

    Raises ``ValueError`` if ``type`` is not one of :data:`EDGE_TYPES` or ``source`` not one of
    :data:`EDGE_SOURCES`.
    """

    src: str  # the dependency (runs first)
    dst: str  # the dependent
    type: str  # one of EDGE_TYPES
    source: str  # one of EDGE_SOURCES (provenance)
    reason: str  # human-readable why

    def __post_init__(self) -> None:
        # Checked once here, where the edge is made, so that a Dag can trust every Edge it is given.
        if self.type not in _TYPES:
            raise ValueError(f"edge type {self.type!r} is not one of {', '.join(EDGE_TYPES)}")
        if self.source not in _RANK:
            raise ValueError(f"edge source {self.source!r} is not one of {', '.join(EDGE_SOURCES)}")

    def to_dict(self) -> dict[str, str]:
        """The edge as JSON-ready data, with ``from``/``to`` for ``src``/``dst``."""
        return {"from": self.src, "to": self.dst, "type": self.type, "source": self.source,
                "reason": self.reason}


class Dag:
    """An immutable, acyclic dependency graph of task ids.

    Construction validates, merges edges and sorts the graph into levels (which is how a cycle is found);
    bottom levels, the critical path, the sorted edge list and the dependency lists are computed on first
    use and kept.

    Raises ``ValueError`` for a repeated task id, an edge naming an unknown task, a self-edge, or a
    weight that is not a finite number >= 0 or names an unknown task;
    :class:`~cmbagent_batch.errors.CycleError` when the edges form a cycle. Two edges joining the same
    (src, dst) pair merge into one: the one whose ``source`` comes first in :data:`EDGE_SOURCES` is kept,
    the first given on a tie. ``weights`` (default 1.0 per task) weigh the critical path.
    Lookups by an id that is not a task raise ``KeyError``.
    """

    __slots__ = (
        "_bottom",
        "_critical",
        "_edges",
        "_ids",
        "_index",
        "_levels",
        "_pred",
        "_sorted_edges",
        "_succ",
        "_weight",
    )

    def __init__(self, nodes: Iterable[str], edges: Iterable[Edge],
                 weights: Mapping[str, float] | None = None) -> None:
        ids = sorted(nodes)
        index = dict(zip(ids, range(len(ids))))
        if len(index) != len(ids):
            repeated = next(a for a, b in zip(ids, ids[1:]) if a == b)
            raise ValueError(f"task id {repeated!r} is given more than once")
        self._ids = ids
        self._index = index
        edge_list, srcs, dsts = _merge_edges(list(edges), index)
        self._edges = edge_list
        self._weight = _weights(weights, index)
        succ = _adjacency(len(ids), srcs, dsts)
        self._succ = succ
        levels, waiting = _kahn_levels(succ, dsts)
        if sum(map(len, levels)) < len(ids):
            raise CycleError([ids[i] for i in _cycle(succ, waiting)])
        self._levels: list[array[int]] = levels
        self._pred: list[Sequence[int]] | None = None
        self._bottom: list[float] | None = None
        self._critical: tuple[float, list[int]] | None = None
        self._sorted_edges: tuple[Edge, ...] | None = None

    @classmethod
    def empty(cls) -> Dag:
        """The graph with no tasks."""
        return cls((), ())

    # --- tasks and edges -------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every task id, sorted."""
        return tuple(self._ids)

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Every (merged) edge, sorted by (src, dst)."""
        if self._sorted_edges is None:
            self._sorted_edges = tuple(sorted(self._edges, key=_ENDS))
        return self._sorted_edges

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._index

    def __iter__(self) -> Iterator[str]:
        """Task ids in sorted order."""
        return iter(self._ids)

    def __repr__(self) -> str:
        return f"<Dag: {len(self._ids)} tasks, {len(self._edges)} edges>"

    def weight(self, task_id: str) -> float:
        """The weight of a task (1.0 unless given)."""
        return self._weight[self._at(task_id)]

    def dependencies(self, task_id: str) -> tuple[str, ...]:
        """The tasks ``task_id`` directly depends on, sorted."""
        return self._names(self._predecessors()[self._at(task_id)])

    def dependents(self, task_id: str) -> tuple[str, ...]:
        """The tasks that directly depend on ``task_id``, sorted."""
        return self._names(self._succ[self._at(task_id)])

    def ancestors(self, task_id: str) -> tuple[str, ...]:
        """Every task ``task_id`` depends on, directly or not, sorted."""
        return self._names(_reach(self._predecessors(), [self._at(task_id)]))

    def descendants(self, task_id: str) -> tuple[str, ...]:
        """Every task that depends on ``task_id``, directly or not, sorted."""
        return self._names(_reach(self._succ, [self._at(task_id)]))

    def upstream(self, task_ids: Iterable[str]) -> set[str]:
        """Every task one of ``task_ids`` depends on, directly or not, ``task_ids`` themselves left out: one
        walk, however many ids."""
        return set(self._names(_reach(self._predecessors(), [self._at(t) for t in task_ids])))

    def downstream(self, task_ids: Iterable[str]) -> set[str]:
        """Every task that depends on one of ``task_ids``, directly or not, ``task_ids`` themselves left out."""
        return set(self._names(_reach(self._succ, [self._at(t) for t in task_ids])))

    def linked(self) -> frozenset[str]:
        """The tasks that have a dependency or a dependent."""
        return frozenset(chain.from_iterable((e.src, e.dst) for e in self._edges))

    # --- schedule shape ----------------------------------------------------------------------------

    def levels(self) -> list[list[str]]:
        """Tasks by topological level, each level sorted.

        Tasks without dependencies are level 0; any other task is one more than its deepest dependency,
        so every task of a level can run as soon as all earlier levels are done.
        """
        ids = self._ids
        return [[ids[i] for i in level] for level in self._levels]

    def widths(self) -> list[int]:
        """How many tasks each level holds."""
        return [len(level) for level in self._levels]

    @property
    def max_parallelism(self) -> int:
        """The widest level: how many tasks can ever be ready together (0 for the empty graph)."""
        return max(map(len, self._levels), default=0)

    def level_numbers(self) -> list[int]:
        """The level of each task, in id order."""
        out = [0] * len(self._ids)
        for number, level in enumerate(self._levels):
            for i in level:
                out[i] = number
        return out

    def weights(self) -> list[float]:
        """The weight of each task, in id order."""
        return list(self._weight)

    def topological_order(self) -> list[str]:
        """Every task after all of its dependencies: the levels, in order, concatenated."""
        ids = self._ids
        return [ids[i] for level in self._levels for i in level]

    def bottom_levels(self) -> dict[str, float]:
        """For each task, in id order, the heaviest path from it to the end, its own weight included.

        This is the critical path that remains once the task starts: a scheduler runs the ready task with
        the largest bottom level first.
        """
        return dict(zip(self._ids, self._bottom_levels()))

    def critical_path(self) -> tuple[float, list[str]]:
        """The heaviest path through the graph: its total weight and its task ids in run order.

        It runs from a task without dependencies to one without dependents. Ties are broken by id: the
        path starts at the smallest id among the tasks without dependencies that have the largest bottom
        level, and each step goes to the smallest id among the dependents with the largest bottom level.
        The empty graph gives ``(0.0, [])``.
        """
        if self._critical is None:
            self._critical = _critical_path(self._succ, self._bottom_levels(), self._levels)
        length, path = self._critical
        return length, [self._ids[i] for i in path]

    def to_dict(self) -> dict[str, object]:
        """The graph as JSON-ready data: nodes, edges, levels and critical path, all sorted."""
        length, path = self.critical_path()
        return {
            "nodes": list(self._ids),
            "edges": [edge.to_dict() for edge in self.edges],
            "levels": self.levels(),
            "critical_path": {"length": length, "tasks": path},
        }

    # --- internals -----------------------------------------------------------------------------------

    def _at(self, task_id: str) -> int:
        try:
            return self._index[task_id]
        except KeyError:
            raise KeyError(f"unknown task id {task_id!r}") from None

    def _names(self, indices: Iterable[int]) -> tuple[str, ...]:
        ids = self._ids
        return tuple(ids[i] for i in sorted(indices))

    def _predecessors(self) -> list[Sequence[int]]:
        if self._pred is None:
            srcs = [s for s, targets in enumerate(self._succ) for _ in targets]
            dsts = list(chain.from_iterable(self._succ))
            self._pred = _adjacency(len(self._ids), dsts, srcs)
        return self._pred

    def _bottom_levels(self) -> list[float]:
        if self._bottom is None:
            self._bottom = _bottom_levels(self._succ, self._weight, self._levels)
        return self._bottom


def _adjacency(n: int, starts: list[int], ends: list[int]) -> list[Sequence[int]]:
    """For each of ``n`` tasks, the ends of the edges starting at it, in the order given. A task with none
    shares one empty tuple: a graph of 10^6 tasks and few edges holds no list per task."""
    grouped: dict[int, list[int]] = {}
    for s, d in zip(starts, ends):
        grouped.setdefault(s, []).append(d)
    adjacent: list[Sequence[int]] = [()] * n
    for s, targets in grouped.items():
        adjacent[s] = targets
    return adjacent


def _merge_edges(edges: list[Edge], index: dict[str, int]) -> tuple[list[Edge], list[int], list[int]]:
    """Validate edges, merge those joining the same pair, and give their ends as indices."""
    try:
        srcs = list(map(index.__getitem__, map(_SRC, edges)))
        dsts = list(map(index.__getitem__, map(_DST, edges)))
    except KeyError:
        raise ValueError(_unknown_task_message(edges, index)) from None
    if any(map(eq, srcs, dsts)):
        task = min(e.src for e in edges if e.src == e.dst)
        raise ValueError(f"task {task!r} cannot depend on itself")
    keys = list(map(add, map(mul, srcs, repeat(len(index))), dsts))  # one int per (src, dst) pair
    if len(set(keys)) == len(keys):
        return edges, srcs, dsts
    # Feed a dict from the least wanted edge to the most wanted: each pair ends on its most wanted edge,
    # the one with the highest priority source and, among those, the first given.
    order: range | list[int] = range(len(edges) - 1, -1, -1)
    if len(set(map(_SOURCE, edges))) > 1:
        ranks = list(map(_RANK.__getitem__, map(_SOURCE, edges)))
        order = sorted(order, key=ranks.__getitem__, reverse=True)  # stable: indices stay descending
    keep = sorted(dict(zip(map(keys.__getitem__, order), order)).values())
    return [edges[i] for i in keep], [srcs[i] for i in keep], [dsts[i] for i in keep]


def _unknown_task_message(edges: list[Edge], index: dict[str, int]) -> str:
    """Name the first edge, in (src, dst) order, that has an end which is not a task."""
    src, dst = min((e.src, e.dst) for e in edges if e.src not in index or e.dst not in index)
    task = src if src not in index else dst
    return f"edge {src!r} -> {dst!r} names unknown task {task!r}"


def _weights(weights: Mapping[str, float] | None, index: dict[str, int]) -> list[float]:
    weight = [1.0] * len(index)
    for task, value in sorted((weights or {}).items()):
        if task not in index:
            raise ValueError(f"weight given for unknown task {task!r}")
        if isinstance(value, bool) or not isinstance(value, Real) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"weight of task {task!r} must be a finite number >= 0, not {value!r}")
        weight[index[task]] = float(value)
    return weight


def _kahn_levels(succ: list[Sequence[int]], dsts: list[int]) -> tuple[list[array[int]], list[int]]:
    """Kahn's sort, one level at a time, each level sorted.

    Also gives, per task, how many of its dependencies were never done: tasks on or after a cycle are
    left out of the levels with a count above zero.
    """
    waiting = [0] * len(succ)  # dependencies not yet done
    for d in dsts:
        waiting[d] += 1
    frontier = array("i", [i for i, k in enumerate(waiting) if not k])
    levels: list[array[int]] = []  # 4 bytes a task
    while frontier:
        levels.append(frontier)
        ready: list[int] = []
        # One flat pass over every dependent of the level: no Python-level loop per task.
        for d in chain.from_iterable(map(succ.__getitem__, frontier)):
            k = waiting[d] - 1
            waiting[d] = k
            if not k:
                ready.append(d)
        frontier = array("i", sorted(ready))
    return levels, waiting


def _cycle(succ: list[Sequence[int]], waiting: list[int]) -> list[int]:
    """One cycle among the tasks Kahn's sort could not reach, as indices, first repeated at the end.

    Every task left over has a dependency that is also left over, so walking back from the smallest one
    through the smallest left-over dependency must revisit a task. The loop found is given in run order,
    rotated to start at its smallest index.
    """
    pred: dict[int, int] = {}  # smallest left-over dependency of each left-over task
    for s, targets in enumerate(succ):
        if waiting[s]:
            for d in targets:
                if waiting[d] and (d not in pred or s < pred[d]):
                    pred[d] = s
    loop = walk_to_loop(min(pred), pred.__getitem__)
    return closed_loop(loop[::-1])  # the walk went against the edges


def _reach(adjacent: list[Sequence[int]], starts: list[int]) -> list[int]:
    """Every index reachable from one of ``starts``, the starts themselves left out, unsorted."""
    seen = bytearray(len(adjacent))
    for start in starts:
        seen[start] = 1
    found: list[int] = []
    stack = list(starts)
    while stack:
        for n in adjacent[stack.pop()]:
            if not seen[n]:
                seen[n] = 1
                found.append(n)
                stack.append(n)
    return found


def _bottom_levels(succ: list[Sequence[int]], weight: list[float], levels: Sequence[Sequence[int]]) -> list[float]:
    bottom = weight[:]
    at = bottom.__getitem__
    for level in reversed(levels):  # dependents are always in a later level: already final
        for i in level:
            if targets := succ[i]:
                bottom[i] = weight[i] + max(map(at, targets))
    return bottom


def _critical_path(succ: list[Sequence[int]], bottom: list[float],
                   levels: Sequence[Sequence[int]]) -> tuple[float, list[int]]:
    if not levels:
        return 0.0, []
    # With weights >= 0 the heaviest start is a root; max() keeps the first, i.e. smallest, index.
    node = max(levels[0], key=bottom.__getitem__)
    path = [node]
    while targets := succ[node]:
        node = min(targets, key=lambda i: (-bottom[i], i))
        path.append(node)
    return bottom[path[0]], path
