"""The dependency graph: shape, critical path, merging, errors and determinism."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping

import pytest

from cmbagent_batch.errors import CycleError
from cmbagent_batch.plan.dag import EDGE_SOURCES, Dag, Edge


def edge(src: str, dst: str, source: str = "explicit", reason: str = "", type: str = "data") -> Edge:
    return Edge(src=src, dst=dst, type=type, source=source, reason=reason)


def dag(pairs: Iterable[tuple[str, str]], extra: Iterable[str] = (),
        weights: Mapping[str, float] | None = None) -> Dag:
    """A Dag whose tasks are the ends of ``pairs`` plus ``extra``."""
    pairs = list(pairs)
    nodes = {n for pair in pairs for n in pair} | set(extra)
    return Dag(nodes, [edge(a, b) for a, b in pairs], weights)


DIAMOND = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]


# --- shape -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [Dag.empty(), Dag([], []), Dag((), (), {})])
def test_empty_graph(empty: Dag) -> None:
    assert len(empty) == 0
    assert empty.nodes == () and empty.edges == ()
    assert empty.levels() == [] and empty.widths() == [] and empty.max_parallelism == 0
    assert empty.topological_order() == []
    assert empty.critical_path() == (0.0, [])
    assert empty.bottom_levels() == {}
    assert empty.to_dict() == {"nodes": [], "edges": [], "levels": [],
                               "critical_path": {"length": 0.0, "tasks": []}}


def test_one_task() -> None:
    one = Dag(["solo"], [])
    assert one.nodes == ("solo",) and len(one) == 1 and "solo" in one and "other" not in one
    assert one.levels() == [["solo"]] and one.widths() == [1] and one.max_parallelism == 1
    assert one.critical_path() == (1.0, ["solo"])
    assert one.bottom_levels() == {"solo": 1.0}
    assert one.dependencies("solo") == () and one.dependents("solo") == ()
    assert one.ancestors("solo") == () and one.descendants("solo") == ()
    assert Dag(["solo"], [], {"solo": 2.5}).critical_path() == (2.5, ["solo"])


def test_diamond() -> None:
    d = dag(reversed(DIAMOND))
    assert d.nodes == ("a", "b", "c", "d") and list(d) == ["a", "b", "c", "d"]
    assert [(e.src, e.dst) for e in d.edges] == DIAMOND
    assert d.levels() == [["a"], ["b", "c"], ["d"]]
    assert d.widths() == [1, 2, 1] and d.max_parallelism == 2
    assert d.topological_order() == ["a", "b", "c", "d"]
    assert d.critical_path() == (3.0, ["a", "b", "d"])  # b and c tie: the smaller id wins
    assert d.bottom_levels() == {"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}
    assert d.dependencies("d") == ("b", "c") and d.dependencies("a") == ()
    assert d.dependents("a") == ("b", "c") and d.dependents("d") == ()
    assert d.ancestors("d") == ("a", "b", "c") and d.ancestors("b") == ("a",)
    assert d.descendants("a") == ("b", "c", "d") and d.descendants("c") == ("d",)
    assert d.upstream(["b", "c"]) == {"a"} and d.upstream(["d", "b"]) == {"a", "c"}
    assert d.downstream(["b", "c"]) == {"d"} and d.downstream(["a", "b"]) == {"c", "d"}


def test_diamond_to_dict_is_json() -> None:
    d = Dag("abcd", [edge("a", "b", "llm", "reads b.txt", "file"), edge("a", "c"), edge("b", "d"),
                     edge("c", "d")], {"c": 2})
    expected = {
        "nodes": ["a", "b", "c", "d"],
        "edges": [
            {"from": "a", "to": "b", "type": "file", "source": "llm", "reason": "reads b.txt"},
            {"from": "a", "to": "c", "type": "data", "source": "explicit", "reason": ""},
            {"from": "b", "to": "d", "type": "data", "source": "explicit", "reason": ""},
            {"from": "c", "to": "d", "type": "data", "source": "explicit", "reason": ""},
        ],
        "levels": [["a"], ["b", "c"], ["d"]],
        "critical_path": {"length": 4.0, "tasks": ["a", "c", "d"]},
    }
    assert d.to_dict() == expected
    assert json.loads(json.dumps(d.to_dict())) == expected


def test_level_is_one_more_than_deepest_dependency() -> None:
    # e depends on a root (a) and on the end of a chain (c): it sits after c, not after a.
    d = dag([("a", "b"), ("b", "c"), ("c", "e"), ("a", "e"), ("x", "e")])
    assert d.levels() == [["a", "x"], ["b"], ["c"], ["e"]]
    assert d.widths() == [2, 1, 1, 1]


def test_disconnected_parts() -> None:
    d = dag([("a", "b"), ("d", "e"), ("e", "f")], extra=["c", "g"])
    assert d.levels() == [["a", "c", "d", "g"], ["b", "e"], ["f"]]
    assert d.max_parallelism == 4
    assert d.topological_order() == ["a", "c", "d", "g", "b", "e", "f"]
    assert d.critical_path() == (3.0, ["d", "e", "f"])
    assert d.descendants("a") == ("b",) and d.ancestors("f") == ("d", "e")
    assert d.ancestors("g") == () and d.descendants("g") == ()


@pytest.mark.slow
@pytest.mark.parametrize("ascending", [True, False])
def test_long_chain_needs_no_recursion(ascending: bool) -> None:
    n = 100_000
    ids = [f"t{i:06d}" for i in range(n)]
    if not ascending:  # the chain runs against the sorted order of its ids
        ids.reverse()
    chain = Dag(ids, [edge(a, b) for a, b in zip(ids, ids[1:])])
    assert chain.levels() == [[i] for i in ids]
    assert chain.topological_order() == ids
    assert chain.max_parallelism == 1 and len(chain.widths()) == n
    assert chain.critical_path() == (float(n), ids)
    assert chain.bottom_levels()[ids[0]] == n and chain.bottom_levels()[ids[-1]] == 1.0
    assert chain.ancestors(ids[-1]) == tuple(sorted(ids[:-1]))
    assert chain.descendants(ids[0]) == tuple(sorted(ids[1:]))
    assert chain.dependencies(ids[1]) == (ids[0],)


# --- weights, bottom levels, critical path ------------------------------------------------------------

def test_weights_change_the_critical_path() -> None:
    assert dag(DIAMOND).critical_path() == (3.0, ["a", "b", "d"])
    assert dag(DIAMOND, weights={"c": 5}).critical_path() == (7.0, ["a", "c", "d"])
    assert dag(DIAMOND, weights={"b": 0.5, "c": 0.25}).critical_path() == (2.5, ["a", "b", "d"])
    # A heavy lone task beats a long chain.
    assert dag([("a", "b"), ("b", "c")], extra=["z"], weights={"z": 10}).critical_path() == (10.0, ["z"])


def test_bottom_levels_by_hand() -> None:
    #   a(1) -> b(2) -> d(4)
    #   a(1) -> c(3) -> d(4)
    #           c(3) -> e(10)
    d = dag([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("c", "e")],
            weights={"a": 1, "b": 2, "c": 3, "d": 4, "e": 10})
    assert d.bottom_levels() == {"a": 14.0, "b": 6.0, "c": 13.0, "d": 4.0, "e": 10.0}
    assert list(d.bottom_levels()) == ["a", "b", "c", "d", "e"]
    assert d.critical_path() == (14.0, ["a", "c", "e"])
    assert d.weight("e") == 10.0 and d.weight("a") == 1.0


def test_zero_weights_tie_break_by_id() -> None:
    d = dag(DIAMOND, extra=["0"], weights=dict.fromkeys("0abcd", 0))
    assert d.critical_path() == (0.0, ["0"])
    assert dag(DIAMOND, weights=dict.fromkeys("abcd", 0.0)).critical_path() == (0.0, ["a", "b", "d"])
    # The path starts at a task without dependencies even when a smaller id ties with it.
    assert dag([("b", "a")], weights={"a": 0, "b": 0}).critical_path() == (0.0, ["b", "a"])


def _heaviest_path_weight(nodes: list[str], pairs: list[tuple[str, str]], w: dict[str, float]) -> float:
    """Brute force: the weight of every path, by enumeration."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in pairs:
        succ[a].append(b)
    best = 0.0
    stack = [(n, w[n]) for n in nodes]
    while stack:
        node, total = stack.pop()
        best = max(best, total)
        stack.extend((nxt, total + w[nxt]) for nxt in succ[node])
    return best


@pytest.mark.parametrize("seed", range(20))
def test_critical_path_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(12)]
    pairs = sorted({(nodes[rng.randrange(j)], nodes[j]) for j in range(1, 12) for _ in range(2)})
    w = {n: float(rng.randrange(4)) for n in nodes}
    d = Dag(nodes, [edge(a, b) for a, b in pairs], w)
    length, path = d.critical_path()
    assert length == _heaviest_path_weight(nodes, pairs, w)
    assert sum(w[n] for n in path) == length
    assert all((a, b) in pairs for a, b in zip(path, path[1:]))
    assert d.dependencies(path[0]) == () and d.dependents(path[-1]) == ()
    assert d.bottom_levels()[path[0]] == length


# --- duplicate edges ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_duplicates_keep_the_most_trusted_source(seed: int) -> None:
    given = [edge("a", "b", source, reason=f"{source} says so") for source in EDGE_SOURCES]
    random.Random(seed).shuffle(given)
    d = Dag("ab", given)
    assert d.edges == (edge("a", "b", "explicit", "explicit says so"),)
    without_explicit = Dag("ab", [e for e in given if e.source != "explicit"])
    assert without_explicit.edges == (edge("a", "b", "files", "files says so"),)


def test_duplicates_with_the_same_source_keep_the_first() -> None:
    d = Dag("abc", [edge("a", "b", "llm", "first"), edge("b", "c", "llm", "only"),
                    edge("a", "b", "llm", "second"), edge("a", "b", "fallback", "weak"),
                    edge("a", "b", "llm", "third")])
    assert d.edges == (edge("a", "b", "llm", "first"), edge("b", "c", "llm", "only"))
    assert d.dependents("a") == ("b",) and d.dependencies("b") == ("a",)
    assert d.levels() == [["a"], ["b"], ["c"]]
    assert len(d.to_dict()["edges"]) == 2  # type: ignore[arg-type]


def test_same_pair_with_other_fields_equal_is_one_edge() -> None:
    d = Dag("ab", [edge("a", "b")] * 3)
    assert d.edges == (edge("a", "b"),)


# --- errors -------------------------------------------------------------------------------------------

def test_self_edge() -> None:
    with pytest.raises(ValueError) as info:
        Dag("abc", [edge("a", "b"), edge("c", "c"), edge("b", "b")])
    assert str(info.value) == "task 'b' cannot depend on itself"


def test_unknown_task_in_edge() -> None:
    with pytest.raises(ValueError) as info:
        Dag("ab", [edge("a", "b"), edge("b", "zz"), edge("yy", "a")])
    assert str(info.value) == "edge 'b' -> 'zz' names unknown task 'zz'"
    with pytest.raises(ValueError) as info:
        Dag("ab", [edge("yy", "a")])
    assert str(info.value) == "edge 'yy' -> 'a' names unknown task 'yy'"


def test_repeated_task_id() -> None:
    with pytest.raises(ValueError) as info:
        Dag(["b", "a", "b", "c", "a"], [])
    assert str(info.value) == "task id 'a' is given more than once"


def test_unknown_edge_type_and_source() -> None:
    with pytest.raises(ValueError) as info:
        edge("a", "b", type="magic")
    assert str(info.value) == "edge type 'magic' is not one of data, file, api, logic, order"
    with pytest.raises(ValueError) as info:
        edge("a", "b", source="guess")
    assert str(info.value) == "edge source 'guess' is not one of explicit, files, llm, fallback"


@pytest.mark.parametrize(("weights", "message"), [
    ({"zz": 1.0}, "weight given for unknown task 'zz'"),
    ({"a": -1.0}, "weight of task 'a' must be a finite number >= 0, not -1.0"),
    ({"a": math.nan}, "weight of task 'a' must be a finite number >= 0, not nan"),
    ({"a": math.inf}, "weight of task 'a' must be a finite number >= 0, not inf"),
    ({"a": "3"}, "weight of task 'a' must be a finite number >= 0, not '3'"),
    ({"a": True}, "weight of task 'a' must be a finite number >= 0, not True"),
])
def test_bad_weights(weights: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Dag("ab", [], weights)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_lookup_of_unknown_task() -> None:
    d = dag(DIAMOND)
    for lookup in (d.dependencies, d.dependents, d.ancestors, d.descendants, d.weight):
        with pytest.raises(KeyError, match="unknown task id 'zz'"):
            lookup("zz")


@pytest.mark.parametrize(("pairs", "cycle"), [
    ([("a", "b"), ("b", "c"), ("c", "a")], ["a", "b", "c", "a"]),
    ([("c", "b"), ("b", "a"), ("a", "c")], ["a", "c", "b", "a"]),
    ([("a", "b"), ("b", "a")], ["a", "b", "a"]),
    # a root before the cycle and a task after it change nothing
    ([("r", "x"), ("x", "y"), ("y", "z"), ("z", "x"), ("z", "after")], ["x", "y", "z", "x"]),
    # the smallest task left over ("a") hangs off the cycle; the walk back from it finds the cycle
    ([("b", "c"), ("c", "b"), ("c", "a")], ["b", "c", "b"]),
    # two separate cycles: the one reached from the smallest task is named
    ([("d", "c"), ("c", "d"), ("a", "b"), ("b", "a")], ["a", "b", "a"]),
    # a -> b -> a and a -> b -> c -> a: walking back, a's smallest dependency is b, b's is a
    ([("a", "b"), ("b", "a"), ("b", "c"), ("c", "a")], ["a", "b", "a"]),
])
def test_cycle_is_named(pairs: list[tuple[str, str]], cycle: list[str]) -> None:
    for seed in range(3):
        shuffled = list(pairs)
        random.Random(seed).shuffle(shuffled)
        with pytest.raises(CycleError) as info:
            dag(shuffled)
        assert info.value.cycle == cycle
        assert str(info.value) == "dependency cycle: " + " -> ".join(cycle)


def test_cycle_in_a_long_chain() -> None:
    ids = [f"t{i:06d}" for i in range(50_000)]
    edges = [edge(a, b) for a, b in zip(ids, ids[1:])] + [edge(ids[-1], ids[0])]
    with pytest.raises(CycleError) as info:
        Dag(ids, edges)
    assert info.value.cycle == [*ids, ids[0]]


# --- determinism --------------------------------------------------------------------------------------

def _random_dag(rng: random.Random, n: int) -> tuple[list[str], list[Edge], dict[str, float]]:
    ids = [f"task-{rng.randrange(10**6):06d}-{i}" for i in range(n)]
    edges = [edge(ids[rng.randrange(j)], ids[j], rng.choice(EDGE_SOURCES), f"r{k}")
             for j in range(1, n) for k in range(rng.randrange(4))]
    weights = {i: float(rng.randrange(3)) for i in ids if rng.random() < 0.5}  # many ties
    return ids, edges, weights


def test_same_result_whatever_the_input_order() -> None:
    ids, edges, weights = _random_dag(random.Random(7), 300)
    reference = Dag(ids, edges, weights)
    assert len(reference.edges) < len(edges)  # there were duplicates to merge
    for seed in range(5):
        rng = random.Random(seed)
        ids2, weights2 = ids[:], list(weights.items())
        rng.shuffle(ids2)
        rng.shuffle(weights2)
        # Shuffle edges but keep the relative order of the ones joining the same pair, since that
        # order decides which of two equally trusted duplicates is kept.
        ranks = {id(e): rng.random() for e in edges}
        first_rank: dict[tuple[str, str], float] = {}
        for e in edges:
            first_rank.setdefault((e.src, e.dst), ranks[id(e)])
        edges2 = sorted(edges, key=lambda e: first_rank[e.src, e.dst])
        other = Dag(ids2, edges2, dict(weights2))
        assert other.to_dict() == reference.to_dict()
        assert other.edges == reference.edges
        assert other.bottom_levels() == reference.bottom_levels()
        assert other.topological_order() == reference.topological_order()
        assert list(other.bottom_levels()) == sorted(ids)


def test_topological_order_puts_dependencies_first() -> None:
    ids, edges, _ = _random_dag(random.Random(3), 500)
    d = Dag(ids, edges)
    position = {task: i for i, task in enumerate(d.topological_order())}
    assert sorted(position) == sorted(ids)
    assert all(position[e.src] < position[e.dst] for e in d.edges)
    level_of = {task: i for i, level in enumerate(d.levels()) for task in level}
    for task in ids:
        deps = d.dependencies(task)
        assert level_of[task] == (1 + max(level_of[p] for p in deps) if deps else 0)
        assert set(d.ancestors(task)) >= set(deps)
        assert all(task in d.dependents(p) for p in deps)


def test_levels_and_weights_by_task_in_id_order() -> None:
    dag = Dag(["c", "a", "b", "lonely"], [Edge("a", "b", "order", "explicit", "r"), Edge("b", "c", "order", "explicit", "r")],
              {"c": 2.5})
    assert dag.level_numbers() == [0, 1, 2, 0]
    assert dag.weights() == [1.0, 1.0, 2.5, 1.0]
    assert dag.levels() == [["a", "lonely"], ["b"], ["c"]]
    assert (dag.dependencies("lonely"), dag.dependents("lonely"), dag.dependents("a")) == ((), (), ("b",))
    assert dag.ancestors("c") == ("a", "b") and dag.descendants("a") == ("b", "c")
