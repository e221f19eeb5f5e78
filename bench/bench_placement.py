"""Placement overhead per task: booking cores and GPUs per node for 10^4 ready tasks on 64 nodes.

Run as ``python bench/bench_placement.py [--quick] [--repeat N]`` with the interpreter of a venv where
cmbagent-batch is installed. In one process, on a fake inventory of 64 nodes (64 cores, 8 GPUs and
512,000 MB each), 10,000 ready tasks of mixed shapes (1-8 ranks of one core, a fifth of them with one GPU
per rank, half with 2,000 MB per node; seeded) go through the same admission loop: the first ready task
is admitted where it fits; when it does not fit, the running task that started first ends (is released)
and the loop tries again; at the end every running task ends. Measured, each the median of ``--repeat``
runs (default 5):

* ours: ``Booking.place`` and ``Booking.release`` (cores, GPU ids and memory booked per node, best fit);
* baseline: a counter-only admission (free cores and free GPUs of the whole inventory, no nodes, no ids),
  the cheapest admission there is.

The figure is the whole loop's time per task in microseconds for both, and ours / baseline. Beside it,
for context: the same at 1,024 nodes (and 16x the tasks, so the inventory fills as often), the buckets
and nodes ``place`` looked at per task, and the ``place`` calls that did not fit. ``--quick`` divides
the task counts by 10 (a smoke run). Exit status 0 whatever the figures (benchmarks report, they do
not gate).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import specgen
from specgen import Row

from cmbagent_batch.place.booking import Booking
from cmbagent_batch.place.inventory import Inventory, Node, Source
from cmbagent_batch.spec.model import Resources

SEED = 24
NODE = Node("nid", cpus=64, gpus=tuple(str(i) for i in range(8)), memory_mb=512_000)
FIGURE_NODES, FIGURE_TASKS = 64, 10_000
WIDE_NODES = 1024

T = TypeVar("T")  # what an admission holds for a running task


def fake_inventory(n_nodes: int) -> Inventory:
    return Inventory(nodes=tuple(Node(f"nid{i:05d}", NODE.cpus, NODE.gpus, NODE.memory_mb) for i in range(n_nodes)),
                     source=Source.DECLARED)


def ready_tasks(n: int) -> list[Resources]:
    rng = random.Random(SEED)
    return [Resources(ranks=rng.randint(1, 8), gpus_per_rank=int(rng.random() < 0.2),
                      memory_mb=rng.choice((None, 2000))) for _ in range(n)]


class Counters:
    """The baseline: free cores and GPUs of the whole inventory, counted; no nodes, no ids."""

    def __init__(self, inventory: Inventory) -> None:
        self.cpus = sum(n.cpus for n in inventory.nodes)
        self.gpus = sum(len(n.gpus) for n in inventory.nodes)

    def place(self, r: Resources) -> Resources | None:
        if r.cpus > self.cpus or r.gpus > self.gpus:
            return None
        self.cpus -= r.cpus
        self.gpus -= r.gpus
        return r

    def release(self, r: Resources) -> None:
        self.cpus += r.cpus
        self.gpus += r.gpus


@dataclass(frozen=True)
class Pass:
    """One run of the admission loop."""

    seconds: float  # wall
    cpu: float  # this process's CPU seconds: steadier than wall time on a busy machine
    misses: int  # place calls that did not fit
    steps: int  # buckets and nodes looked at (ours only)


def admit_all(place: Callable[[Resources], T | None], release: Callable[[T], None], tasks: list[Resources]) -> Pass:
    """The admission loop, timed: each ready task in turn; when it does not fit, the oldest running task
    ends."""
    running: deque[T] = deque()
    misses = 0
    start, cpu = time.perf_counter(), time.process_time()
    for r in tasks:
        while (held := place(r)) is None:
            misses += 1
            release(running.popleft())
        running.append(held)
    while running:
        release(running.popleft())
    return Pass(time.perf_counter() - start, time.process_time() - cpu, misses, 0)


def ours(inventory: Inventory, tasks: list[Resources]) -> Pass:
    booking = Booking(inventory)
    measured = admit_all(booking.place, booking.release, tasks)
    assert booking.busy_cpus == booking.busy_gpus == 0
    return dataclasses.replace(measured, steps=booking.steps)


def baseline(inventory: Inventory, tasks: list[Resources]) -> Pass:
    counters = Counters(inventory)
    return admit_all(counters.place, counters.release, tasks)


def median_pass(run: Callable[[Inventory, list[Resources]], Pass], inventory: Inventory, tasks: list[Resources],
                repeat: int) -> Pass:
    passes = [run(inventory, tasks) for _ in range(repeat)]
    return Pass(statistics.median(p.seconds for p in passes), statistics.median(p.cpu for p in passes),
                passes[0].misses, passes[0].steps)


def us(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e6:.2f} us/task"


def figure_rows(rows: list[Row], n_nodes: int, n_tasks: int, repeat: int, label: str) -> None:
    inventory, tasks = fake_inventory(n_nodes), ready_tasks(n_tasks)
    median_pass(ours, inventory, tasks, 1)  # warm-up, not counted
    mine, base = median_pass(ours, inventory, tasks, repeat), median_pass(baseline, inventory, tasks, repeat)
    how = f"median of {repeat}" if repeat > 1 else "1 run"
    rows.append(Row(f"{label}: place + release, {n_nodes:,} nodes, {n_tasks:,} tasks ({how})",
                    us(mine.seconds, n_tasks), us(base.seconds, n_tasks), f"{mine.seconds / base.seconds:.2f}x",
                    "(report)", cpu=f"{us(mine.cpu, n_tasks)} / {us(base.cpu, n_tasks)} = {mine.cpu / base.cpu:.2f}x"))
    rows.append(Row("  buckets and nodes looked at by place, per task", f"{mine.steps / n_tasks:.1f}"))
    rows.append(Row("  place calls that did not fit", f"{mine.misses:,}", f"{base.misses:,}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="task counts / 10: a smoke run")
    parser.add_argument("--repeat", type=int, metavar="N", help="runs of each figure, the median kept (default 5)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    repeat = max(1, args.repeat or 5)
    rows: list[Row] = []
    figure_rows(rows, FIGURE_NODES, FIGURE_TASKS // scale, repeat, "figure 1")
    figure_rows(rows, WIDE_NODES, FIGURE_TASKS * WIDE_NODES // FIGURE_NODES // scale, repeat, "context")
    notes = [f"each node: {NODE.cpus} cores, {len(NODE.gpus)} GPUs, {NODE.memory_mb:,} MB; tasks: 1-8 ranks of one "
             f"core, a fifth with one GPU per rank, half with 2,000 MB per node (seed {SEED})",
             "baseline: counter-only admission (free cores and GPUs of the whole inventory) in the same loop; "
             "it admits more at once, since it knows no nodes",
             "the loop: the first ready task where it fits, else the oldest running task ends and it tries again",
             specgen.load_note()]
    if args.quick:
        notes.append("--quick: task counts / 10; only the ratios mean anything")
    specgen.print_table(f"figure 1: placement overhead per task ({sys.executable})", rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
