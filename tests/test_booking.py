"""Booking cores, GPUs and memory per node: packing, best fit, multi-node shapes, exact release, and a cost
that does not grow with the number of tasks or nodes (counted in buckets and nodes looked at, never timed)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmbagent_batch.place.booking import Booking, Placement, core_ranges
from cmbagent_batch.place.inventory import Inventory, Node, Source
from cmbagent_batch.spec.model import Resources

BENCH = Path(__file__).resolve().parent.parent / "bench"


def inventory(*nodes: Node) -> Inventory:
    return Inventory(nodes=nodes, source=Source.DECLARED)


def gpu_ids(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def hosts(booking: Booking, r: Resources) -> tuple[str, ...]:
    """Where ``r`` is placed (it must fit)."""
    p = booking.place(r)
    assert p is not None, r
    return p.hosts


def test_two_two_core_tasks_share_a_four_core_node_and_a_four_core_task_waits_for_both() -> None:
    booking = Booking(inventory(Node("vm", 4)))
    first = booking.place(Resources(ranks=2))
    second = booking.place(Resources(ranks=2))
    assert first == Placement(("vm",), ((0, 1),), ((),), None, 2)
    assert second == Placement(("vm",), ((2, 3),), ((),), None, 2)
    assert booking.place(Resources(ranks=4)) is None
    assert (booking.busy_cpus, booking.total_cpus) == (4, 4)
    booking.release(first)
    assert booking.place(Resources(ranks=4)) is None
    booking.release(second)
    assert booking.place(Resources(ranks=4)) == Placement(("vm",), ((0, 1, 2, 3),), ((),), None, 4)


def test_a_single_node_task_goes_where_it_leaves_the_fewest_free_cores() -> None:
    booking = Booking(inventory(Node("big", 8), Node("small", 4), Node("mid", 6)))
    assert hosts(booking, Resources(cpus_per_rank=3)) == ("small",)
    # free now: big 8, mid 6, small 1
    assert hosts(booking, Resources(cpus_per_rank=5)) == ("mid",)
    assert hosts(booking, Resources(cpus_per_rank=1)) == ("mid",)
    assert hosts(booking, Resources(cpus_per_rank=1)) == ("small",)
    assert hosts(booking, Resources(cpus_per_rank=1)) == ("big",)


def test_equal_free_cores_are_broken_by_free_gpus_then_by_name() -> None:
    booking = Booking(inventory(Node("c", 4, gpu_ids(1)), Node("b", 4), Node("a", 4, gpu_ids(2)), Node("d", 4)))
    first = [hosts(booking, Resources()) for _ in range(4)]
    # the fewest free GPUs, then name order: b, and b again as it is then the fullest
    assert first == [("b",), ("b",), ("b",), ("b",)]
    assert hosts(booking, Resources()) == ("d",)
    assert hosts(booking, Resources(gpus_per_rank=1)) == ("c",)


def test_a_multi_node_task_gets_distinct_nodes_with_its_share_on_each() -> None:
    booking = Booking(inventory(Node("n1", 4), Node("n2", 4), Node("n3", 4)))
    small = booking.place(Resources(cpus_per_rank=3))
    assert small is not None and small.hosts == ("n1",)
    spread = booking.place(Resources(nodes=2, ranks=8, cpus_per_rank=1))
    assert spread == Placement(("n2", "n3"), ((0, 1, 2, 3), (0, 1, 2, 3)), ((), ()), None, 4)
    assert spread.ranks == 8
    assert booking.place(Resources(nodes=2, ranks=2)) is None  # one node has a free core, two are needed
    booking.release(spread)
    assert booking.place(Resources(nodes=3, ranks=3)) == Placement(
        ("n1", "n2", "n3"), ((3,), (0,), (0,)), ((), (), ()), None, 1)


def test_gpu_tasks_get_disjoint_ids_of_their_size() -> None:
    booking = Booking(inventory(Node("vm", 8, ("GPU-a", "GPU-b", "GPU-c", "GPU-d"))))
    pair = booking.place(Resources(ranks=2, gpus_per_rank=1))
    one = booking.place(Resources(gpus_per_rank=1))
    last = booking.place(Resources(gpus_per_rank=1))
    assert [p.gpus if p else None for p in (pair, one, last)] == [
        (("GPU-a", "GPU-b"),), (("GPU-c",),), (("GPU-d",),)]
    assert booking.place(Resources(gpus_per_rank=1)) is None
    assert booking.place(Resources()) is not None  # a CPU-only task still fits
    assert (booking.busy_gpus, booking.total_gpus) == (4, 4)
    assert one is not None
    booking.release(one)
    assert booking.place(Resources(ranks=2, gpus_per_rank=1)) is None
    again = booking.place(Resources(gpus_per_rank=1))
    assert again is not None and again.gpus == (("GPU-c",),)


def test_memory_is_booked_per_node_where_it_is_known() -> None:
    booking = Booking(inventory(Node("known", 8, memory_mb=1000)))
    assert booking.place(Resources(memory_mb=600)) is not None
    assert booking.place(Resources(memory_mb=600)) is None
    assert booking.place(Resources(memory_mb=400)) is not None
    assert booking.place(Resources()) is not None  # asks for no memory: books none

    unknown = Booking(inventory(Node("unknown", 8)))
    assert [unknown.place(Resources(memory_mb=10**6)) is not None for _ in range(3)] == [True, True, True]

    spread = Booking(inventory(Node("a", 2, memory_mb=1000), Node("b", 2, memory_mb=500), Node("c", 2)))
    two = spread.place(Resources(nodes=2, ranks=2, memory_mb=800))
    assert two is not None and two.hosts == ("a", "c") and two.memory_mb == 800
    # a and c have one core left each; a has 200 MB left, c's memory is unknown
    assert spread.place(Resources(memory_mb=300)) == Placement(("c",), ((1,),), ((),), 300, 1)


def test_release_gives_back_exactly_what_was_booked() -> None:
    booking = Booking(inventory(Node("n1", 4, gpu_ids(2), 1000), Node("n2", 4, gpu_ids(2), 1000)))
    whole = Resources(nodes=2, ranks=4, cpus_per_rank=2, gpus_per_rank=1, memory_mb=1000)
    for _ in range(3):
        parts = [booking.place(Resources(cpus_per_rank=2, gpus_per_rank=1, memory_mb=500)) for _ in range(4)]
        assert all(parts) and booking.place(Resources()) is None
        for p in parts:
            assert p is not None
            booking.release(p)
        assert (booking.busy_cpus, booking.busy_gpus) == (0, 0)
        p = booking.place(whole)
        assert p == Placement(("n1", "n2"), ((0, 1, 2, 3),) * 2, (("0", "1"),) * 2, 1000, 2)
        booking.release(p)


def test_releasing_what_is_not_booked_is_refused_and_changes_nothing() -> None:
    booking = Booking(inventory(Node("n1", 4)))
    p = booking.place(Resources(ranks=2))
    assert p is not None
    booking.release(p)
    with pytest.raises(ValueError) as twice:
        booking.release(p)
    assert str(twice.value) == "release: n1 cores 0-1 is not booked"
    with pytest.raises(ValueError) as elsewhere:
        booking.release(Placement(("n9",), ((0,),), ((),), None, 1))
    assert str(elsewhere.value) == "release: no node 'n9' in the inventory"
    assert booking.busy_cpus == 0
    assert booking.place(Resources(ranks=4)) is not None


def test_an_inventory_naming_a_node_twice_is_refused() -> None:
    with pytest.raises(ValueError) as twice:
        Booking(inventory(Node("vm", 4), Node("vm", 2)))
    assert str(twice.value) == "the inventory lists node 'vm' twice"

def test_a_shape_that_did_not_fit_is_not_looked_for_again_until_a_release() -> None:
    booking = Booking(inventory(*(Node(f"n{i:02d}", 4, memory_mb=1000) for i in range(16))))
    held = [booking.place(Resources(ranks=3, memory_mb=900)) for _ in range(16)]
    wide = Resources(memory_mb=500)  # a core is free on every node, the memory on none
    assert booking.place(wide) is None
    steps = booking.steps
    assert steps > 16
    assert booking.place(wide) is None
    assert booking.steps == steps
    p = held.pop()
    assert p is not None
    booking.release(p)
    assert booking.place(wide) is not None
    assert booking.steps > steps


def test_a_placement_describes_itself_for_records() -> None:
    p = Placement(("n1", "n2"), ((0, 1, 2, 3, 8), (5,)), (("0", "1"), ("2",)), 2048, 2)
    assert core_ranges((0, 1, 2, 3, 8, 10, 11)) == "0-3,8,10-11"
    assert core_ranges(()) == ""
    assert p.describe() == "n1 cores 0-3,8 GPUs 0,1; n2 cores 5 GPUs 2; 2,048 MB per node"
    assert p.record() == {"hosts": ["n1", "n2"], "cores": ["0-3,8", "5"], "gpus": [["0", "1"], ["2"]],
                          "memory_mb": 2048, "ranks_per_node": 2}
    assert Placement(("vm",), ((0,),), ((),), None, 1).describe() == "vm cores 0"


# ---------------------------------------------------------------------------------------------------
# Random shapes against an independent model of what is booked


@dataclass
class Held:
    """What the model says is booked on one node."""

    cores: set[int] = field(default_factory=set)
    gpus: set[str] = field(default_factory=set)
    memory: int = 0


def fitting(nodes: list[Node], held: dict[str, Held], r: Resources) -> list[str]:
    """Every node with room for ``r``'s share, in best-fit order."""
    room = []
    for n in nodes:
        h = held[n.name]
        free_cores, free_gpus = n.cpus - len(h.cores), len(n.gpus) - len(h.gpus)
        memory_ok = r.memory_mb is None or n.memory_mb is None or n.memory_mb - h.memory >= r.memory_mb
        if free_cores >= r.cpus_per_node and free_gpus >= r.gpus_per_node and memory_ok:
            room.append((free_cores, free_gpus, n.name))
    return [name for *_, name in sorted(room)]


def random_shape(rng: random.Random) -> Resources:
    nodes = rng.choice((1, 1, 1, 2, 3))
    return Resources(nodes=nodes, ranks=nodes * rng.randint(1, 4), cpus_per_rank=rng.randint(1, 3),
                     gpus_per_rank=rng.choice((0, 0, 0, 1)),
                     memory_mb=rng.choice((None, rng.randrange(100, 4000, 100))))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_shapes_never_overbook_or_overlap_and_always_take_the_best_fit(seed: int) -> None:
    rng = random.Random(seed)
    nodes = [Node(f"n{i}", rng.randint(1, 16), gpu_ids(rng.randint(0, 4)), rng.choice((None, 2000, 8000)))
             for i in rng.sample(range(8), 8)]
    by_name = {n.name: n for n in nodes}
    booking = Booking(inventory(*nodes))
    held = {n.name: Held() for n in nodes}
    live: list[tuple[Placement, Resources]] = []
    placed = refused = 0
    for _ in range(5000):
        if live and rng.random() < 0.4:
            done, asked = live.pop(rng.randrange(len(live)))
            booking.release(done)
            for host, cores, gpus in zip(done.hosts, done.cores, done.gpus, strict=True):
                h = held[host]
                h.cores -= set(cores)
                h.gpus -= set(gpus)
                if by_name[host].memory_mb is not None:
                    h.memory -= asked.memory_mb or 0
        else:
            r = random_shape(rng)
            room = fitting(nodes, held, r)
            p = booking.place(r)
            if p is None:
                refused += 1
                assert len(room) < r.nodes, (r, room)
                continue
            placed += 1
            assert list(p.hosts) == sorted(room[: r.nodes])
            assert (p.memory_mb, p.ranks_per_node) == (r.memory_mb, r.ranks_per_node)
            for host, cores, gpus in zip(p.hosts, p.cores, p.gpus, strict=True):
                h, node = held[host], by_name[host]
                assert len(cores) == len(set(cores)) == r.cpus_per_node and list(cores) == sorted(cores)
                assert len(gpus) == len(set(gpus)) == r.gpus_per_node
                assert set(cores) <= set(range(node.cpus)) and set(gpus) <= set(node.gpus)
                assert not h.cores & set(cores) and not h.gpus & set(gpus)
                h.cores |= set(cores)
                h.gpus |= set(gpus)
                if node.memory_mb is not None:
                    h.memory += r.memory_mb or 0
                    assert h.memory <= node.memory_mb
            live.append((p, r))
        assert booking.busy_cpus == sum(len(h.cores) for h in held.values())
        assert booking.busy_gpus == sum(len(h.gpus) for h in held.values())
    assert placed > 1000 and refused > 100  # the run really was full at times


# ---------------------------------------------------------------------------------------------------
# Cost per call, counted


def steps_per_call(n_nodes: int, calls: int, seed: int = 7) -> float:
    """Buckets and nodes looked at per call over ``calls`` place and release calls, on nodes of 32 cores,
    2 GPUs and 64 GB, with mixed shapes (1-8 ranks or one GPU, some on 2 nodes), once the booking is full:
    each shape that does not fit ends the task that started first."""
    booking = Booking(inventory(*(Node(f"nid{i:05d}", 32, gpu_ids(2), 64_000) for i in range(n_nodes))))
    rng = random.Random(seed)
    live: deque[Placement] = deque()
    made, start, steps = 0, None, 0
    while start is None or made - start < calls:
        nodes, memory = 2 if rng.random() < 0.05 else 1, rng.choice((None, 2000))
        if rng.random() < 0.1:  # one GPU
            r = Resources(cpus_per_rank=rng.randint(1, 8), gpus_per_rank=1, memory_mb=memory)
        else:
            r = Resources(nodes=nodes, ranks=nodes * rng.randint(1, 8), memory_mb=memory)
        p = booking.place(r)
        made += 1
        if p is not None:
            live.append(p)
            continue
        if start is None:  # full: count from here
            start, steps = made, booking.steps
        booking.release(live.popleft())
        made += 1
    return (booking.steps - steps) / (made - start)


def test_the_cost_of_place_and_release_does_not_grow_with_calls_or_nodes() -> None:
    per_call = {(n, calls): steps_per_call(n, calls) for n in (64, 1024) for calls in (10**3, 10**4)}
    for n in (64, 1024):
        assert per_call[n, 10**4] <= 1.5 * per_call[n, 10**3], per_call
    assert per_call[1024, 10**4] <= 2 * per_call[64, 10**4] + 1, per_call
    assert per_call[1024, 10**4] < 1024 / 8, per_call  # far from looking at every node


@pytest.mark.slow  # figure 2 runs two real jobs of 50 tasks
def test_placement_benchmark_runs_quick(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH / "bench_placement.py"), "--quick", "--repeat", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "figure 1: placement overhead per task" in r.stdout
    assert "figure 2: makespan, 50 tasks of 1-8 ranks on 16 declared cores" in r.stdout
