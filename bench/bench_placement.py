"""Placement overhead per task: booking cores and GPUs per node for 10^4 ready tasks on 64 nodes; and a
mixed workload's makespan against its lower bound (figure 2).

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
the task counts by 10 (a smoke run).

Figure 2 runs ``cmbagent-batch run`` for real, twice: 500 shell tasks of 1-8 ranks (booked; each sleeps a
known 0.05 to 0.5 s, given as its ``estimate``) on a declared inventory of 16 cores, with backfill
(``backfill_s: 60``) and with first fit in order (``backfill_s: 0``). The makespan (the journal's first
start to last end) is reported over its lower bound, the longest task or the core-seconds over the cores,
whichever is larger; target at most 1.15x. ``--quick`` runs 50 tasks. Exit status 0 whatever the
figures (benchmarks report, they do not gate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
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


# Figure 2: a mixed workload's makespan, run for real on a declared inventory.
MIXED_TASKS, MIXED_CORES, MIXED_SEED = 500, 16, 24


@dataclass(frozen=True)
class MixedTask:
    id: str
    ranks: int
    seconds: float


def mixed_tasks(n: int) -> list[MixedTask]:
    """``n`` tasks of 1-8 ranks, each sleeping a known 0.05 to 0.5 s (seeded)."""
    rng = random.Random(MIXED_SEED)
    return [MixedTask(f"m{i:04d}", rng.randint(1, 8), round(rng.uniform(0.05, 0.5), 3)) for i in range(n)]


def mixed_spec(tasks: list[MixedTask], backfill_s: float) -> str:
    parts = [f"version: 1\njob: {{name: mixed}}\nexecution: {{max_workers: {MIXED_CORES}, inventory: "
             f"{{cpus: {MIXED_CORES}}}, backfill_s: {backfill_s}}}\ntasks:\n"]
    parts += [f"  - {{id: {t.id}, kind: shell, run: 'sleep {t.seconds}', resources: {{ranks: {t.ranks}}}, "
              f"estimate: {t.seconds}}}\n" for t in tasks]
    return "".join(parts)


def makespan(run_dir: str) -> float:
    """From the first task's start to the last task's end, as the run journaled them."""
    starts, ends = [], []
    with open(os.path.join(run_dir, "journal", "rank-0000.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            (starts if rec["state"] == "running" else ends).append(rec["t"])
    return max(ends) - min(starts)


def run_mixed(root: str, tasks: list[MixedTask], backfill_s: float, label: str) -> float:
    spec = specgen.write(root, f"{label}.yaml", mixed_spec(tasks, backfill_s))
    run_dir, cache = os.path.join(root, f"{label}-run"), os.path.join(root, f"{label}-cache")
    cmd = [sys.executable, "-m", "cmbagent_batch", "run", spec, "--quiet", "--run-dir", run_dir, "--cache-dir", cache]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return makespan(run_dir)


def mixed_rows(rows: list[Row], n: int) -> None:
    tasks = mixed_tasks(n)
    bound = max(max(t.seconds for t in tasks), sum(t.ranks * t.seconds for t in tasks) / MIXED_CORES)
    with tempfile.TemporaryDirectory(prefix="cmbagent-bench-mixed-") as root:
        ours_s = run_mixed(root, tasks, 60.0, "backfill")
        in_order = run_mixed(root, tasks, 0.0, "in-order")
    rows.append(Row(f"figure 2: makespan, {n} tasks of 1-8 ranks on {MIXED_CORES} declared cores "
                    "(backfill_s 60) / its lower bound", f"{ours_s:.2f} s / {bound:.2f} s",
                    ratio=f"{ours_s / bound:.3f}x", target="<= 1.15x", verdict=specgen.verdict(ours_s / bound <= 1.15)))
    rows.append(Row("  first fit in order (backfill_s 0), for comparison", f"{in_order:.2f} s",
                    ratio=f"{in_order / bound:.3f}x of the bound; ours {ours_s / in_order:.3f}x of it"))


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
    mixed_rows(rows, MIXED_TASKS // scale)
    notes = [f"each node: {NODE.cpus} cores, {len(NODE.gpus)} GPUs, {NODE.memory_mb:,} MB; tasks: 1-8 ranks of one "
             f"core, a fifth with one GPU per rank, half with 2,000 MB per node (seed {SEED})",
             "baseline: counter-only admission (free cores and GPUs of the whole inventory) in the same loop; "
             "it admits more at once, since it knows no nodes",
             "the loop: the first ready task where it fits, else the oldest running task ends and it tries again",
             f"figure 2: {MIXED_TASKS} shell tasks 'sleep S' (S from 0.05 to 0.5 s, seed {MIXED_SEED}) of 1-8 ranks "
             f"(booked, not started: the sleep is the work), estimate S, on execution.inventory {{cpus: "
             f"{MIXED_CORES}}} with max_workers {MIXED_CORES}, run by `cmbagent-batch run`; makespan from the "
             "journal, first start to last end; lower bound: the longest task or the core-seconds / cores, "
             "whichever is larger",
             specgen.load_note()]
    if args.quick:
        notes.append("--quick: task counts / 10; only the ratios mean anything")
    specgen.print_table(f"figure 1: placement overhead per task ({sys.executable})", rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
