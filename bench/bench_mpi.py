"""Time ``cmbagent-batch run`` with the MPI backend: no-op python tasks against raw ``mpi4py.futures``, a
heavy-tailed DAG against its lower bound, and makespans for 1, 2 and 4 worker ranks.

Run as ``python bench/bench_mpi.py [--quick] [--runs N] [--only throughput|dag|scaling|rank0] [--against PYTHON]
[--profile DIR]``
with the interpreter of a venv where cmbagent-batch, mpi4py and an MPI (e.g. PyPI ``mpich``) are installed. Ours is
always ``mpiexec -n N python -m cmbagent_batch run SPEC --quiet --run-dir FRESH --cache-dir FRESH`` with
``execution: {backend: mpi, tasks_per_rank: K}`` in the spec: rank 0 schedules, ranks 1..N-1 run the
tasks. ``mpiexec`` is the one next to this interpreter, else the first on PATH; the commands get PATH with
this interpreter's directory first (Hydra starts the ranks through it).

1. 20,000 no-op python tasks (``call: noop:run``, bench_run's module and spec) on 2 worker ranks
   (``mpiexec -n 3``, ``tasks_per_rank: 1``). Baseline, in the same invocation: a script under
   ``mpiexec -n 3`` whose rank 0 submits 20,000 calls of the same function to
   ``mpi4py.futures.MPICommExecutor`` and waits for all of them, timed from the first submit to the last
   result. As in bench_run, ours is held to the target with the start-up corrected rate:
   20,000 / (wall - wall of the same command on a 1-task spec); target at least 50% of the baseline's
   tasks/s. For context, the raw rate (20,000 / wall) and the rate while running
   (20,000 / (last ``succeeded`` - first ``running`` journal record)).
2. bench_run's layered DAG, 30 levels x 100 shell tasks ``sleep 0.NNN`` (Pareto(1) durations clipped to
   [1, 50] ms, seed 1) on 16 worker slots: 4 worker ranks x ``tasks_per_rank: 4`` (``mpiexec -n 5``;
   oversubscribed on a small machine, which is fine: the tasks sleep). Makespan is the journals' span
   (first ``running`` to last ``succeeded`` record, over every rank's journal); its lower bound is
   max(critical path, total work / 16) over the wall times in the journals; target at most 1.10x.
   For context: the slot time each task costs beyond its recorded wall, the delay from a worker's
   ``succeeded`` record to rank 0's, and the local backend's makespan on the same DAG (bench_run's command
   with ``--workers 16``, run after each MPI run).
3. 64 independent shell tasks ``sleep 0.250`` with ``tasks_per_rank: 1`` on 1, 2 and 4 worker ranks
   (``mpiexec -n 2, 3, 5``): makespan (journal span), the ideal 64 x 0.25 s / ranks and the speed-up over
   1 rank. Context only: no target.
4. Rank 0's own CPU time per task, in microseconds: 20,000 no-op python tasks (figure 1's spec, which
   the scheduler sends in batches) and 5,000 shell tasks ``echo i > out.txt`` (bench_run's), each on 2 worker
   ranks (``mpiexec -n 3``, ``tasks_per_rank: 1``). Rank 0 reads it itself: ``run.json``'s ``runner``
   (``cpu_s``: getrusage(RUSAGE_SELF) user + system at the end of the run, over ``tasks_run``) or, for a
   version that does not write it, the same getrusage taken as rank 0's command ends (``RANK0_WRAPPER``
   in mpi_runs.py, through which every run of this figure starts). Whatever the allocation, rank 0 does
   this work for every task, so 10^6 / (us per task) is the ceiling of tasks/s that any number of ranks can
   reach; targets: at most 100 us per python task and 300 us per shell task. For context, the marginal
   figure: (CPU of the N-task run - CPU of a 1-task run) / (N - 1), without start-up. ``--profile DIR``
   adds one run of each under py-spy (``py-spy record --gil``, rank 0's GIL holder at 250 Hz; py-spy next
   to this interpreter or on PATH, with ptrace rights), keeps the raw profiles in DIR and prints their top
   lines.

Each run of ours gets a fresh run directory and cache directory, and nothing is deleted before the end
(see bench_run). Runs of ours and of the baseline alternate, as do the three rank counts, so a change in
the machine's load hits all alike; figures are medians over ``--runs`` runs (default 3). Each run is
checked: every task succeeded, ``run.json`` says backend ``mpi`` with the expected ranks, and every task
ran on a worker rank (as the journals say). Rows marked "tasks per rank" show how evenly the worker ranks were used.
``--quick`` shrinks the sizes (500 no-op tasks, a 10 x 30 DAG, 16 sleep tasks) and runs everything once:
a smoke run, whose absolute figures are not the targets'.

``--against PYTHON`` compares two versions as bench_run's does: every run of ours (the local backend's
in figure 2 too) is also made with the other venv's python and the ``mpiexec`` of that venv's ``bin/``
(which must be there: ``pip install mpich``), in turn with this one's; the mpi4py.futures baseline runs
with this interpreter's.

Exit status 0 whatever the figures (benchmarks report, they do not gate); 1 only when a measured
command did not run as expected (failed, hung past its time limit, or ran the wrong way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab
import specgen
from ab import Install
from mpi_runs import (
    FUTURES_BASELINE,
    Mpi,
    OurRun,
    autogroup_note,
    find_mpiexec,
    find_py_spy,
    fs_probe,
    mpi_spec,
    profile_rank0,
    profile_top,
    rank_cells,
    run_ours,
    sleep_tasks,
    versions,
)
from runs import (
    DAG_SEED,
    NOOP_MODULE,
    Fresh,
    dag_spec,
    journal_span,
    layered_dag,
    lower_bound,
    python_spec,
    shell_spec,
    task_walls,
)
from runs import run_ours as run_local
from specgen import CommandFailed, Row, Sample, cpu_cell, secs, verdict

THROUGHPUT_FRACTION_TARGET = 0.5  # ours / raw mpi4py.futures, tasks/s, at least
MAKESPAN_RATIO_TARGET = 1.10  # makespan / lower bound, at most
RANK0_US_TARGETS = {"python": 100.0, "shell": 300.0}  # rank 0's CPU per task, at most (microseconds)

THROUGHPUT_RANKS = 2  # worker ranks, as the baseline's
DAG_RANKS, DAG_TASKS_PER_RANK = 4, 4
SCALING_RANKS = (1, 2, 4)
SLEEP_MS = 250
RANK0_RANKS = 2  # worker ranks
PROFILE_LINES = 15

# A command that has not ended after this long is killed (with its ranks) and reported as hung.
TIME_LIMIT_S, QUICK_TIME_LIMIT_S = 900, 240


# ---------------------------------------------------------------------------------------------------
# Figure 1: no-op python tasks against mpi4py.futures


def throughput_figures(rows: list[Row], notes: list[str], root: str, mpis: Sequence[Mpi], n: int, runs: int,
                       startup_runs: int) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("throughput-spec")
    specgen.write(spec_dir, "noop.py", NOOP_MODULE)
    spec = specgen.write(spec_dir, "python.yaml", mpi_spec(python_spec(n), 1))
    one = specgen.write(spec_dir, "python1.yaml", mpi_spec(python_spec(1), 1))
    ranks = THROUGHPUT_RANKS + 1
    for mpi in mpis:
        run_ours(mpi, one, fresh, THROUGHPUT_RANKS, 1)  # warm-up (.pyc files, page cache), not counted

    base_out = os.path.join(spec_dir, "futures.json")
    this = mpis[0]
    base_cmd = this.cmd(ranks, sys.executable, "-c", FUTURES_BASELINE, str(n), spec_dir)
    base = Sample()
    whole, startups = {m.side: Sample() for m in mpis}, {m.side: Sample() for m in mpis}
    base_walls: list[float] = []
    spans: dict[Install, list[float]] = {m.side: [] for m in mpis}
    done: list[OurRun] = []
    library = "?"
    for r in range(runs):
        base.add(this.run_once(base_cmd, cwd=spec_dir, stdout_path=base_out))
        try:
            with open(base_out, encoding="utf-8") as fh:
                report = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CommandFailed(f"{' '.join(base_cmd)}\n  printed no report: {exc}") from None
        base_walls.append(float(report["wall"]))
        library = report["library"]
        for mpi in ab.in_turn(mpis, r):
            mine = run_ours(mpi, spec, fresh, THROUGHPUT_RANKS, n)
            whole[mpi.side].add(mine.run)
            spans[mpi.side].append(mine.span)
            if mpi is this:
                done.append(mine)
    for r in range(startup_runs):
        for mpi in ab.in_turn(mpis, r):
            startups[mpi.side].add(run_ours(mpi, one, fresh, THROUGHPUT_RANKS, 1).run)

    figures = {m.side: ab.rate_figures(n, whole[m.side], startups[m.side], spans[m.side]) for m in mpis}
    ours, startup = whole[this.side], startups[this.side]
    base_rate = n / statistics.median(base_walls)
    raw = n / ours.wall
    work = ours.wall - startup.wall
    corrected = n / work if work > 0 else float("inf")
    running = n / statistics.median(spans[this.side])
    rows.append(Row(f"mpi4py.futures MPICommExecutor, -n {ranks}, {n:,} no-op submits (baseline, {base.runs()})",
                    f"{base_rate:,.0f} tasks/s", cpu=cpu_cell(base)))
    rows.append(Row(f"  whole mpiexec command (context, {base.runs()})", secs(base.wall)))
    rows.append(Row(f"run 1 python task, mpiexec -n {ranks}: start-up ({startup.runs()})", secs(startup.wall),
                    cpu=cpu_cell(startup)))
    rows.append(Row(f"run {n:,} python tasks, mpiexec -n {ranks}, tasks_per_rank 1 ({ours.runs()})",
                    secs(ours.wall), secs(base.wall), f"{ours.wall / base.wall:.2f}x", cpu=cpu_cell(ours, base)))
    rows.append(Row("  raw: tasks / wall", f"{raw:,.0f} tasks/s", f"{base_rate:,.0f} tasks/s",
                    f"{raw / base_rate:.1%}"))
    rows.append(Row("  start-up corrected: tasks / (wall - 1-task wall)", f"{corrected:,.0f} tasks/s",
                    f"{base_rate:,.0f} tasks/s", f"{corrected / base_rate:.1%}",
                    f">= {THROUGHPUT_FRACTION_TARGET:.0%}",
                    verdict(corrected >= THROUGHPUT_FRACTION_TARGET * base_rate)))
    rows.append(Row("  per task (corrected)", f"{work / n * 1e6:,.0f} us", f"{1e6 / base_rate:,.0f} us",
                    f"{(work / n) * base_rate:.1f}x"))
    rows.append(Row("  while running: tasks / journal span (context)", f"{running:,.0f} tasks/s",
                    f"{base_rate:,.0f} tasks/s", f"{running / base_rate:.1%}"))
    if runs > 1:
        rows.append(Row("  per run: raw tasks/s, ours | baseline", ", ".join(f"{n / w:,.0f}" for w in ours.walls),
                        ", ".join(f"{n / w:,.0f}" for w in base_walls)))
    rows.append(Row("  tasks per worker rank (mean over runs)", rank_cells(done, THROUGHPUT_RANKS)[0]))
    ab.versus(rows, figures)
    notes.append("the PASS uses the start-up-corrected rate, as bench_run does; the baseline is timed on its "
                 "rank 0 from the first submit to the last result (no MPI start-up, no imports), ours is the "
                 "whole command, which also reads, checks and fingerprints the tasks and writes run.json twice")
    notes.append("while running: first 'running' to last 'succeeded' record over all ranks' journals, "
                 "i.e. dispatch alone (no spec, no run.json, no MPI start-up)")
    notes.append(f"MPI library: {library}")


# ---------------------------------------------------------------------------------------------------
# Figure 2: the layered DAG on 16 slots over 4 worker ranks


def dag_figures(rows: list[Row], notes: list[str], root: str, mpis: Sequence[Mpi], levels: int, width: int,
                runs: int) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("dag-spec")
    tasks = layered_dag(levels, width, DAG_SEED)
    n = len(tasks)
    slots = DAG_RANKS * DAG_TASKS_PER_RANK
    spec = specgen.write(spec_dir, "dag.yaml", mpi_spec(dag_spec(tasks), DAG_TASKS_PER_RANK))
    warm = specgen.write(spec_dir, "warm.yaml", mpi_spec(dag_spec(sleep_tasks(1, 1)), DAG_TASKS_PER_RANK))
    for mpi in mpis:
        run_ours(mpi, warm, fresh, DAG_RANKS, 1)  # warm-up, not counted

    local_spec = specgen.write(spec_dir, "dag-local.yaml", dag_spec(tasks))
    probe = fs_probe(fresh("fs-probe"), n)
    done: dict[Install, list[OurRun]] = {m.side: [] for m in mpis}
    got: dict[Install, defaultdict[str, list[float]]] = {m.side: defaultdict(list) for m in mpis}
    for r in range(runs):
        for mpi in ab.in_turn(mpis, r):
            mine = run_ours(mpi, spec, fresh, DAG_RANKS, n)
            done[mpi.side].append(mine)
            walls = mine.walls()
            cp, work = lower_bound(tasks, walls, slots)
            _, local_dir = run_local(mpi.side, local_spec, fresh, specgen.bench_env(), n, workers=slots)
            first, last = journal_span(local_dir)
            local_walls = task_walls(local_dir)
            g = got[mpi.side]
            for name, value in (("makespan", mine.span), ("cp", cp), ("work", work), ("bound", max(cp, work)),
                                ("ratio", mine.span / max(cp, work)),
                                ("outside", (slots * mine.span - sum(walls.values())) / n),
                                ("local_span", last - first),
                                ("local_ratio", (last - first) / max(lower_bound(tasks, local_walls, slots)))):
                g[name].append(value)
            g["returns"].extend(mine.returns())

    med = statistics.median
    commands = {side: _sample(mines) for side, mines in done.items()}
    figures: dict[Install, ab.Figures] = {side: {
        "DAG makespan": (med(g["makespan"]), secs), "DAG makespan / LB": (med(g["ratio"]), ab.times),
        "DAG slot time outside walls, per task": (med(g["outside"]), lambda x: f"{x * 1000:.1f} ms"),
        **ab.sample_figures("DAG whole command", commands[side]),
        "local backend DAG makespan": (med(g["local_span"]), secs)} for side, g in got.items()}
    this = mpis[0].side
    ours = got[this]
    makespans, bounds, cps, works, ratios = ours["makespan"], ours["bound"], ours["cp"], ours["work"], ours["ratio"]
    outside, returns = ours["outside"], ours["returns"]
    local_spans, local_ratios = ours["local_span"], ours["local_ratio"]
    n_cp, n_work = lower_bound(tasks, {t.id: t.ms / 1000 for t in tasks}, slots)
    label = f"median of {runs}" if runs > 1 else "1 run"
    rows.append(Row(f"run DAG {levels}x{width}={n:,}, mpiexec -n {DAG_RANKS + 1}, tasks_per_rank "
                    f"{DAG_TASKS_PER_RANK}: makespan ({label})", secs(med(makespans)), f"LB {secs(med(bounds))}",
                    f"{med(ratios):.3f}x", f"<= {MAKESPAN_RATIO_TARGET:.2f}x LB",
                    verdict(med(ratios) <= MAKESPAN_RATIO_TARGET)))
    rows.append(Row(f"  LB parts: critical path | work / {slots} (recorded walls)",
                    f"{secs(med(cps))} | {secs(med(works))}"))
    rows.append(Row(f"  sleep-only LB: critical path | work / {slots}", f"{secs(n_cp)} | {secs(n_work)}",
                    ratio=f"ours {med(makespans) / max(n_cp, n_work):.2f}x"))
    rows.append(Row("  whole command wall", secs(commands[this].wall), cpu=cpu_cell(commands[this])))
    if runs > 1:
        rows.append(Row("  per run: makespan / LB", ", ".join(f"{r:.3f}x" for r in ratios)))
    count, use = rank_cells(done[this], DAG_RANKS, DAG_TASKS_PER_RANK)
    rows.append(Row("  tasks per worker rank (mean over runs)", count))
    rows.append(Row(f"  busy: task walls / ({DAG_TASKS_PER_RANK} slots x span)", use))
    rows.append(Row(f"  slot time per task outside its wall: ({slots} x span - walls) / {n:,}",
                    f"{med(outside) * 1000:.1f} ms", f"mean wall {med(works) * slots / n * 1000:.1f} ms"))
    ordered = sorted(returns)
    rows.append(Row("  worker's 'succeeded' to rank 0's: median | p90 | max",
                    " | ".join(f"{ordered[int(q * (len(ordered) - 1))] * 1000:.1f} ms" for q in (0.5, 0.9, 1.0))))
    rows.append(Row(f"local backend, --workers {slots}, same DAG: makespan (context, {label})",
                    secs(med(local_spans)), ratio=f"{med(local_ratios):.3f}x its LB"))
    rows.append(Row("  MPI makespan / local makespan", secs(med(makespans)), secs(med(local_spans)),
                    f"{med(makespans) / med(local_spans):.2f}x"))
    rows.append(Row(f"  filesystem: CPU to make {n:,} work-directory skeletons (2 mkdir + 2 files)",
                    secs(probe), ratio=f"{probe / n * 1000:.2f} ms a task"))
    ab.versus(rows, figures)
    notes.append("filesystem: a shell task's attempt makes its work directory, logs/ and two log files; on ext4 "
                 "that costs about 3x more CPU for a minute or more after many files were deleted (inode "
                 "allocation skips recently deleted inodes), and the DAG's makespan is CPU-bound on 2 cores: "
                 "compare the probe between runs of this benchmark")
    notes.append(f"DAG: bench_run's, shell tasks 'sleep 0.NNN' (bash -c), Pareto(1) clipped to [1, 50] ms, seed "
                 f"{DAG_SEED}, sum {sum(t.ms for t in tasks) / 1000:.1f} s; makespan = first 'running' to last "
                 "'succeeded' record over all ranks' journals; LB from the journals' wall_s (process start included)")
    notes.append("slot time outside its wall: what a slot spends per task beyond the attempt's recorded wall "
                 "(hand-over, the round trip, polling, waiting for a core); the local backend runs the same "
                 "spec with bench_run's command, after each MPI run")
    if (autogroup := autogroup_note(DAG_RANKS + 1)) is not None:
        notes.append(autogroup)


# ---------------------------------------------------------------------------------------------------
# Figure 3: sleep-bound scaling over 1, 2 and 4 worker ranks


@dataclass
class Scaling:
    spans: list[float] = field(default_factory=list)
    runs: list[OurRun] = field(default_factory=list)
    command: Sample = field(default_factory=Sample)


def scaling_figures(rows: list[Row], notes: list[str], root: str, mpis: Sequence[Mpi], n: int, runs: int) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("scaling-spec")
    spec = specgen.write(spec_dir, "sleep.yaml", mpi_spec(dag_spec(sleep_tasks(n, SLEEP_MS)), 1))
    warm = specgen.write(spec_dir, "warm.yaml", mpi_spec(dag_spec(sleep_tasks(1, 1)), 1))
    for mpi in mpis:
        run_ours(mpi, warm, fresh, max(SCALING_RANKS), 1)  # warm-up, not counted

    by_side = {m.side: {k: Scaling() for k in SCALING_RANKS} for m in mpis}
    for r in range(runs):
        for mpi in ab.in_turn(mpis, r):
            for k, s in by_side[mpi.side].items():
                mine = run_ours(mpi, spec, fresh, k, n)
                s.spans.append(mine.span)
                s.runs.append(mine)
                s.command.add(mine.run)

    med = statistics.median
    figures: dict[Install, ab.Figures] = {side: {
        f"{k} worker rank{'s' if k > 1 else ''}: {name}": (value, secs)
        for k, s in by.items() for name, value in (("makespan", med(s.spans)), ("whole command", s.command.wall))
    } for side, by in by_side.items()}
    by_ranks = by_side[mpis[0].side]
    one = med(by_ranks[SCALING_RANKS[0]].spans)
    label = f"median of {runs}" if runs > 1 else "1 run"
    for k, s in by_ranks.items():
        makespan = med(s.spans)
        ideal = n * SLEEP_MS / 1000 / k
        plural = "rank" if k == 1 else "ranks"
        rows.append(Row(f"{n} x sleep {SLEEP_MS / 1000:g}, {k} worker {plural} (mpiexec -n {k + 1}): makespan "
                        f"({label})", secs(makespan), f"ideal {secs(ideal)}", f"{makespan / ideal:.3f}x ideal",
                        cpu=cpu_cell(s.command)))
        if k != SCALING_RANKS[0]:
            speedup = one / makespan
            rows.append(Row(f"  speed-up over {SCALING_RANKS[0]} rank", f"{speedup:.2f}x", f"ideal {k}x",
                            f"{speedup / k:.0%} of ideal"))
        count, _ = rank_cells(s.runs, k)
        rows.append(Row("  tasks per worker rank", count, ratio=f"whole command {secs(s.command.wall)}"))
    ab.versus(rows, figures)
    notes.append(f"scaling: {n} independent shell tasks 'sleep {SLEEP_MS / 1000:.3f}', tasks_per_rank 1; ideal = "
                 f"{n} x {SLEEP_MS / 1000:g} s / worker ranks (no bash start-up); the cpu column is the "
                 "whole command's, all ranks")


# ---------------------------------------------------------------------------------------------------
# Figure 4: rank 0's CPU time per task


def rank0_figures(rows: list[Row], notes: list[str], root: str, mpis: Sequence[Mpi], sizes: dict[str, int],
                  runs: int, profile_dir: str | None) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("rank0-spec")
    specgen.write(spec_dir, "noop.py", NOOP_MODULE)
    makers = {"python": python_spec, "shell": shell_spec}
    specs = {kind: (specgen.write(spec_dir, f"{kind}.yaml", mpi_spec(makers[kind](n), 1)),
                    specgen.write(spec_dir, f"{kind}1.yaml", mpi_spec(makers[kind](1), 1))) for kind, n in sizes.items()}
    ranks = RANK0_RANKS + 1
    label = f"median of {runs}" if runs > 1 else "1 run"
    figures: dict[Install, ab.Figures] = {m.side: {} for m in mpis}
    for kind, n in sizes.items():
        spec, one = specs[kind]
        for mpi in mpis:
            run_ours(mpi, one, fresh, RANK0_RANKS, 1)  # warm-up, not counted
        whole: dict[Install, list[OurRun]] = {m.side: [] for m in mpis}
        single: dict[Install, list[OurRun]] = {m.side: [] for m in mpis}
        for r in range(runs):
            for mpi in ab.in_turn(mpis, r):
                whole[mpi.side].append(run_ours(mpi, spec, fresh, RANK0_RANKS, n, rank0_cpu=True))
                single[mpi.side].append(run_ours(mpi, one, fresh, RANK0_RANKS, 1, rank0_cpu=True))
        what = "batched no-op python tasks" if kind == "python" else "shell tasks 'echo i > out.txt'"
        for mpi in mpis:
            side = mpi.side
            cpus = [o.rank0.cpu_s for o in whole[side] if o.rank0]
            per_task = statistics.median(o.rank0.us_per_task for o in whole[side] if o.rank0)
            base = statistics.median(o.rank0.cpu_s for o in single[side] if o.rank0)
            marginal = (statistics.median(cpus) - base) / max(n - 1, 1) * 1e6
            figures[side][f"rank 0 CPU per {kind} task"] = (per_task, _us)
            figures[side][f"rank 0 CPU per {kind} task, marginal"] = (marginal, _us)
            if mpi is not mpis[0]:
                continue
            target = RANK0_US_TARGETS[kind]
            sources = sorted({o.rank0.source for o in whole[side] + single[side] if o.rank0})
            rows.append(Row(f"rank 0 CPU per task, {n:,} {what}, mpiexec -n {ranks} ({label})", _us(per_task),
                            ratio=f"ceiling {1e6 / per_task:,.0f} tasks/s", target=f"<= {target:.0f} us",
                            verdict=verdict(per_task <= target), cpu=cpu_cell(_sample(whole[side]))))
            rows.append(Row("  rank 0 CPU over the whole run | 1-task run", f"{secs(statistics.median(cpus))} | "
                            f"{secs(base)}", ratio=f"read from {' and '.join(sources)}"))
            rows.append(Row("  marginal: (CPU - 1-task CPU) / (tasks - 1)", _us(marginal),
                            ratio=f"ceiling {1e6 / marginal:,.0f} tasks/s" if marginal > 0 else "-"))
            if runs > 1:
                rows.append(Row("  per run: us per task", ", ".join(f"{o.rank0.us_per_task:,.0f}"
                                                                      for o in whole[side] if o.rank0)))
        if profile_dir is not None:
            profile_rows(rows, notes, mpis[0], spec, fresh, n, kind, profile_dir)
    ab.versus(rows, figures)
    notes.append("rank 0 CPU: user + system seconds of rank 0's process (all its threads: the scheduler, the "
                 "thread talking MPI, the journal's writer), from its start to the end of the run, over the tasks "
                 "it ran: reading, checking and fingerprinting the spec, dispatch, two journals' records per "
                 "task and run.json twice. Its bound on tasks/s holds for any number of worker ranks; the "
                 "cpu column is the whole command's, all ranks")


def profile_rows(rows: list[Row], notes: list[str], mpi: Mpi, spec: str, fresh: Fresh, n: int, kind: str,
                 profile_dir: str) -> None:
    """One run of ``spec`` with rank 0 under py-spy: its top lines, by function and by module."""
    py_spy = find_py_spy(mpi.side)
    if py_spy is None:
        notes.append("--profile: no py-spy next to this interpreter or on PATH (pip install py-spy)")
        return
    os.makedirs(profile_dir, exist_ok=True)
    raw = os.path.join(profile_dir, f"rank0-{kind}-{n}.txt")
    cpu = profile_rank0(mpi, py_spy, spec, fresh, RANK0_RANKS, n, raw)
    total, by_fn, by_module = profile_top(raw, PROFILE_LINES)
    rows.append(Row(f"  py-spy of rank 0 ({total:,} samples, {cpu / n * 1e6:,.0f} us per task in that run): {raw}",
                    "share"))
    rows.extend(Row(f"    {name}", f"{share:.1%}") for share, name in by_fn)
    rows.append(Row("  the same by module", "share"))
    rows.extend(Row(f"    {name}", f"{share:.1%}") for share, name in by_module)
    notes.append(f"py-spy ({kind}): each sample counted once, for the innermost cmbagent_batch function on the "
                 "stack of the thread holding the GIL (the library code it called charged to it)")


def _us(us: float) -> str:
    return f"{us:,.0f} us"


def _sample(done: list[OurRun]) -> Sample:
    sample = Sample()
    for one in done:
        sample.add(one.run)
    return sample


# ---------------------------------------------------------------------------------------------------



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (500 no-op tasks, 10x30 DAG, 16 sleeps), one run each: a smoke run")
    parser.add_argument("--runs", type=int, metavar="N", help="runs of each figure (default 3, quick 1)")
    parser.add_argument("--only", choices=("throughput", "dag", "scaling", "rank0"), action="append",
                        help="run only this figure (repeatable); default: all four")
    parser.add_argument("--against", metavar="PYTHON",
                        help="also make every run of ours with the cmbagent-batch, python and mpiexec of this "
                             "python's venv, in turn with this one's, and report each figure of both and new / old")
    parser.add_argument("--profile", metavar="DIR",
                        help="figure 4: also profile rank 0 with py-spy, one run of each kind, raw profiles in DIR")
    args = parser.parse_args()
    sides, versus_notes = ab.installs(args.against)
    quick = args.quick
    runs = max(1, args.runs or (1 if quick else 3))
    mpis: list[Mpi] = []
    for side in sides:
        exe = find_mpiexec(side)
        if exe is None:
            where = "this interpreter or on PATH" if side.own else side.python
            print(f"bench_mpi: no mpiexec next to {where} (pip install mpich)", file=sys.stderr)
            return 1
        mpis.append(Mpi(exe, side.env(specgen.bench_env()), QUICK_TIME_LIMIT_S if quick else TIME_LIMIT_S, side))
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_python, n_sleep = (500, 16) if quick else (20_000, 64)
    rank0_sizes = {"python": 500, "shell": 200} if quick else {"python": 20_000, "shell": 5_000}
    levels, width = (10, 30) if quick else (30, 100)
    with specgen.TempDir() as tmp:
        steps: dict[str, tuple[str, specgen.Step]] = {
            "throughput": (f"1. {n_python:,} no-op python tasks, {THROUGHPUT_RANKS} worker ranks",
                           lambda r, nt: throughput_figures(r, nt, tmp, mpis, n_python, runs, 1 if quick else 5)),
            "dag": (f"2. layered DAG {levels}x{width}, {DAG_RANKS} worker ranks x {DAG_TASKS_PER_RANK} slots",
                    lambda r, nt: dag_figures(r, nt, tmp, mpis, levels, width, runs)),
            "scaling": (f"3. {n_sleep} sleep tasks on {', '.join(map(str, SCALING_RANKS))} worker ranks",
                        lambda r, nt: scaling_figures(r, nt, tmp, mpis, n_sleep, runs)),
            "rank0": (f"4. rank 0's CPU per task: {rank0_sizes['python']:,} python and {rank0_sizes['shell']:,} "
                      f"shell tasks, {RANK0_RANKS} worker ranks",
                      lambda r, nt: rank0_figures(r, nt, tmp, mpis, rank0_sizes, runs, args.profile)),
        }
        sections, failed = specgen.run_sections(steps, args.only, settled=not quick)
    notes = [f"mpiexec: {' | '.join(m.mpiexec for m in mpis)}; {versions()}",
             (f"{specgen.load_note()}; {load_at_start:.2f} (1 min) at the start. Ranks oversubscribe "
              "the cores: wall times include waiting for a core, compare the cpu column too")]
    if quick:
        notes.append("--quick: small sizes, one run each; only the ratios mean anything")
    return specgen.report(f"cmbagent-batch run --backend mpi ({sys.executable})", sections, failed,
                          notes + versus_notes)

if __name__ == "__main__":
    sys.exit(main())
