"""Time ``cmbagent-batch run``: many small shell tasks, many no-op python tasks, and a random layered DAG.

Run as ``python bench/bench_run.py [--quick] [--runs N] [--no-snakemake] [--only shell|python|dag]
[--against PYTHON]`` with the interpreter of a venv
where cmbagent-batch is installed. Every figure is set beside a baseline measured in the same invocation:

1. 2,000 independent shell tasks (``run: echo i > out.txt``, ``outputs: [out.txt]``), as
   ``cmbagent-batch run SPEC --workers 2 --quiet --run-dir FRESH --cache-dir FRESH``, whole-command wall,
   against ``seq 2000 | xargs -P2 -I{} sh -c 'mkdir -p d/{} && echo {} > d/{}/out.txt'`` (``sh`` is
   whatever /bin/sh is; the same with ``bash -c`` is printed for context, since our tasks run under bash);
   target at most 1.5x. And against Snakemake 9 (``snakemake --cores 2 --quiet all`` on a Snakefile whose
   rule writes ``d/{i}/out.txt`` for the same 2,000 i's, in a fresh directory), installed once into
   ``~/.cache/cmbagent-batch-bench/snakemake-venv``; target: Snakemake at least 5x slower than us.
   When the install fails the row says why and is skipped.
2. 20,000 no-op python tasks (``call: noop:run``, a module beside the spec) with
   ``execution: {use_process_pool: true, max_workers: 2}``. Tasks/s raw (20,000 / wall) and corrected
   for start-up (20,000 / (wall - wall of the same command on a 1-task spec)); the corrected one is held
   to the target: at least 50% of a raw ``ProcessPoolExecutor(2)`` submitting 20,000 calls of the same
   function and waiting for them (timed inside its own subprocess, pool start and shutdown included;
   the platform's default start method, printed beside it). For context, the rate while running:
   20,000 / (last ``succeeded`` - first ``running`` journal record).
3. A layered DAG of 30 levels x 100 shell tasks ``sleep 0.NNN`` (each task has two parents drawn from
   the previous level; durations Pareto(alpha=1) rounded to whole ms and clipped to [1, 50] ms; seed 1)
   with ``--workers 16``. Makespan is the span of the run's journal: first ``running`` record to last
   ``succeeded`` record. Its lower bound is max(critical path, total work / 16) over the wall times the
   run recorded (each task's ``wall_s`` in the journals: bash start-up included, as in the makespan);
   target at most 1.05x. Beside it, a level-barrier scheduler: a ``ThreadPoolExecutor(16)`` in this
   process running the same ``bash -c 'sleep ...'`` commands level by level, waiting for each level to
   end before starting the next; its makespan over ours is printed for context.

Each measured run of ours gets a fresh run directory and a fresh analysis cache directory: the cost of
a first run. Nothing is deleted before the end of the benchmark: right after 10^4 directories are
deleted, creating new ones on ext4 is several times slower for a while (it scans the recently freed
inodes), which would charge one run for the clean-up of the one before. Runs of ours and of the baseline alternate, so a change in the machine's load hits both
alike; figures are medians over ``--runs`` runs (default 3; 1 for the 20,000 python tasks and for
Snakemake). ``--quick`` divides the sizes by ~10 (200 shell tasks, 2,000 python tasks, a 10 x 30 DAG),
runs everything once and skips Snakemake: a smoke run, whose absolute figures are not the targets'.

Two versions: ``--against PYTHON`` (the python of another venv with another version of cmbagent-batch
installed) makes every measured run of ours also with that python, in turn with this one's (the order
reversed every other round), on the same specs with fresh directories, and adds "new vs old" rows under
each figure: the median of this version (new), of the other (old) and new / old. The other version's runs
get its venv's ``bin/`` first on PATH and no PYTHONPATH. The baselines run once a round, as without it.

Exit status 0 whatever the figures (benchmarks report, they do not gate); 1 only when a measured
command did not run as expected (the benchmark itself, or the product, is broken, not slow).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab
import specgen
from ab import Install
from runs import (
    DAG_SEED,
    NOOP_MODULE,
    Fresh,
    count_outputs,
    dag_spec,
    journal_span,
    layered_dag,
    level_barrier,
    lower_bound,
    python_spec,
    run_ours,
    shell_spec,
    task_walls,
)
from specgen import CommandFailed, Row, Sample, cpu_cell, secs, verdict

XARGS_RATIO_TARGET = 1.5  # ours / xargs, at most
SNAKEMAKE_RATIO_TARGET = 5.0  # snakemake / ours, at least
PYTHON_FRACTION_TARGET = 0.5  # ours / raw ProcessPoolExecutor, tasks/s, at least
MAKESPAN_RATIO_TARGET = 1.05  # makespan / lower bound, at most

DAG_WORKERS = 16

SNAKEMAKE_VENV = os.path.join(os.path.expanduser("~"), ".cache", "cmbagent-batch-bench", "snakemake-venv")
SNAKEMAKE_REQUIREMENT = "snakemake>=9,<10"


POOL_BASELINE = """
import json, multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor, wait
n, here = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, here)
import noop
t0 = time.perf_counter()
with ProcessPoolExecutor(2) as pool:
    futures = [pool.submit(noop.run) for _ in range(n)]
    wait(futures)
    for f in futures:
        f.result()
print(json.dumps({"wall": time.perf_counter() - t0, "start_method": multiprocessing.get_start_method()}))
"""

SNAKEFILE = """\
N = {n}

rule all:
    input: expand("d/{{i}}/out.txt", i=range(1, N + 1))

rule write:
    output: "d/{{i}}/out.txt"
    shell: "echo {{wildcards.i}} > {{output}}"
"""


# ---------------------------------------------------------------------------------------------------
# Snakemake, in its own venv


def _snakemake_version(exe: str) -> str | None:
    if not os.access(exe, os.X_OK):
        return None
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def snakemake() -> tuple[str | None, str]:
    """``(path to snakemake 9, version)``, installing it once; ``(None, why not)`` when that fails."""
    exe = os.path.join(SNAKEMAKE_VENV, "bin", "snakemake")
    version = _snakemake_version(exe)
    if version and version.startswith("9."):
        return exe, version
    print(f"bench_run: installing {SNAKEMAKE_REQUIREMENT} into {SNAKEMAKE_VENV} (once) ...", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", "--clear", SNAKEMAKE_VENV],
             [os.path.join(SNAKEMAKE_VENV, "bin", "python"), "-m", "pip", "install", "-q", SNAKEMAKE_REQUIREMENT]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(cmd)}: {exc}"
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return None, f"{' '.join(cmd)} exited {proc.returncode}: {tail}"
    version = _snakemake_version(exe)
    if not version or not version.startswith("9."):
        return None, f"{exe} --version says {version!r} after the install, not 9.x"
    return exe, version


# ---------------------------------------------------------------------------------------------------
# Figure 1: 2,000 shell tasks


def shell_figures(rows: list[Row], notes: list[str], root: str, env: dict[str, str], n: int, runs: int,
                  skip_snakemake: str | None, sides: Sequence[Install]) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("shell-spec")
    spec = specgen.write(spec_dir, "shell.yaml", shell_spec(n))
    warm = specgen.write(spec_dir, "warm.yaml", shell_spec(1))
    for side in sides:
        run_ours(side, warm, fresh, env, 1, workers=2)  # compiles .pyc files, fills the page cache; not counted

    def xargs(shell: str) -> list[str]:
        return ["sh", "-c", f"seq {n} | xargs -P2 -I{{}} {shell} -c 'mkdir -p d/{{}} && echo {{}} > d/{{}}/out.txt'"]

    by_side = {side: Sample() for side in sides}
    x_sh, x_bash = Sample(), Sample()
    for r in range(runs):
        for side in ab.in_turn(sides, r):
            by_side[side].add(run_ours(side, spec, fresh, env, n, workers=2)[0])
        for sample, shell in ((x_sh, "sh"), (x_bash, "bash")):
            cwd = fresh(f"xargs-{shell}")
            sample.add(specgen.run_once(xargs(shell), cwd=cwd, env=env))
            if count_outputs(cwd) != n:
                raise CommandFailed(f"{' '.join(xargs(shell))}\n  wrote {count_outputs(cwd)} of {n} outputs")
    ours = by_side[sides[0]]
    sh_is = os.path.realpath(shutil.which("sh") or "/bin/sh")
    rows.append(Row(f"xargs -P2, sh -c per item (baseline, {x_sh.runs()})", secs(x_sh.wall), cpu=cpu_cell(x_sh)))
    rows.append(Row(f"xargs -P2, bash -c per item (context, {x_bash.runs()})", secs(x_bash.wall),
                    cpu=cpu_cell(x_bash)))
    rows.append(Row(f"run {n:,} shell tasks, --workers 2 ({ours.runs()})", secs(ours.wall), secs(x_sh.wall),
                    f"{ours.wall / x_sh.wall:.2f}x", f"<= {XARGS_RATIO_TARGET}x xargs (sh)",
                    verdict(ours.wall <= XARGS_RATIO_TARGET * x_sh.wall), cpu_cell(ours, x_sh)))
    rows.append(Row("  same, against xargs with bash -c", secs(ours.wall), secs(x_bash.wall),
                    f"{ours.wall / x_bash.wall:.2f}x", cpu=cpu_cell(ours, x_bash)))
    rows.append(Row("  per task", f"{ours.wall / n * 1000:.2f} ms", f"{x_sh.wall / n * 1000:.2f} ms"))
    rows.append(Row("  peak RSS", specgen.mib(ours.peak_rss)))
    ab.versus(rows, {side: {**ab.sample_figures(f"run {n:,} shell tasks", s),
                                 "peak RSS": (s.peak_rss, lambda b: specgen.mib(int(b)))}
                          for side, s in by_side.items()})
    notes.append(f"sh is {sh_is}; the 1.5x target is held against the sh figure (the issue's command); "
                 "our tasks run under bash, so the bash row is the like-for-like context")
    notes.append("ours: whole command (start-up, spec, DAG, journal, run.json) with a fresh --run-dir and "
                 "--cache-dir per run; runs of ours and of both xargs alternate")

    if skip_snakemake:
        rows.append(Row("snakemake 9 --cores 2", skip_snakemake))
        return
    exe, version = snakemake()
    if exe is None:
        rows.append(Row("snakemake 9 --cores 2", "skipped: install failed"))
        notes.append(f"snakemake not measured: {version}")
        return
    cwd = fresh("snakemake")
    specgen.write(cwd, "Snakefile", SNAKEFILE.format(n=n))
    cmd = [exe, "--cores", "2", "--quiet", "all", "--snakefile", "Snakefile"]
    snake = Sample()
    snake.add(specgen.run_once(cmd, cwd=cwd, env=env))
    if count_outputs(cwd) != n:
        raise CommandFailed(f"{' '.join(cmd)}\n  wrote {count_outputs(cwd)} of {n} outputs")
    rows.append(Row(f"snakemake {version} --cores 2, same {n:,} jobs ({snake.runs()})", secs(snake.wall),
                    secs(ours.wall), f"{snake.wall / ours.wall:.2f}x",
                    f">= {SNAKEMAKE_RATIO_TARGET:g}x ours", verdict(snake.wall >= SNAKEMAKE_RATIO_TARGET * ours.wall),
                    cpu_cell(snake, ours)))
    notes.append(f"snakemake: {' '.join(cmd[1:])} in a fresh directory, from {SNAKEMAKE_VENV}; "
                 "its ratio is snakemake / ours (how many times slower Snakemake is)")


# ---------------------------------------------------------------------------------------------------
# Figure 2: no-op python tasks in a process pool


def python_figures(rows: list[Row], notes: list[str], root: str, env: dict[str, str], n: int, runs: int,
                   startup_runs: int, sides: Sequence[Install]) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("python-spec")
    specgen.write(spec_dir, "noop.py", NOOP_MODULE)
    spec = specgen.write(spec_dir, "python.yaml", python_spec(n))
    one = specgen.write(spec_dir, "python1.yaml", python_spec(1))
    for side in sides:
        run_ours(side, one, fresh, env, 1)  # warm-up, not counted

    pool_out = os.path.join(spec_dir, "pool.json")
    pool_cmd = [sys.executable, "-c", POOL_BASELINE, str(n), spec_dir]
    pool_walls: list[float] = []
    start_method = "?"
    pool = Sample()
    startups, whole = {side: Sample() for side in sides}, {side: Sample() for side in sides}
    spans: dict[Install, list[float]] = {side: [] for side in sides}
    for r in range(runs):
        pool.add(specgen.run_once(pool_cmd, cwd=spec_dir, env=env, stdout_path=pool_out))
        with open(pool_out, encoding="utf-8") as fh:
            report = json.load(fh)
        pool_walls.append(float(report["wall"]))
        start_method = report["start_method"]
        for side in ab.in_turn(sides, r):
            run, run_dir = run_ours(side, spec, fresh, env, n)
            whole[side].add(run)
            first, last = journal_span(run_dir)
            spans[side].append(last - first)
    for r in range(startup_runs):
        for side in ab.in_turn(sides, r):
            startups[side].add(run_ours(side, one, fresh, env, 1)[0])
    figures = {side: ab.rate_figures(n, whole[side], startups[side], spans[side]) for side in sides}
    ours, startup = whole[sides[0]], startups[sides[0]]
    pool_rate = n / statistics.median(pool_walls)
    raw = n / ours.wall
    work = ours.wall - startup.wall
    corrected = n / work if work > 0 else float("inf")
    rows.append(Row(f"ProcessPoolExecutor(2) ({start_method}), {n:,} no-op submits (baseline, {pool.runs()})",
                    f"{pool_rate:,.0f} tasks/s", cpu=cpu_cell(pool)))
    rows.append(Row(f"run 1 python task: start-up ({startup.runs()})", secs(startup.wall), cpu=cpu_cell(startup)))
    rows.append(Row(f"run {n:,} python tasks, process pool of 2 ({ours.runs()})", secs(ours.wall),
                    cpu=cpu_cell(ours, pool)))
    rows.append(Row("  raw: tasks / wall", f"{raw:,.0f} tasks/s", f"{pool_rate:,.0f} tasks/s",
                    f"{raw / pool_rate:.1%}"))
    rows.append(Row("  start-up corrected: tasks / (wall - 1-task wall)", f"{corrected:,.0f} tasks/s",
                    f"{pool_rate:,.0f} tasks/s", f"{corrected / pool_rate:.1%}",
                    f">= {PYTHON_FRACTION_TARGET:.0%}", verdict(corrected >= PYTHON_FRACTION_TARGET * pool_rate)))
    rows.append(Row("  per task (corrected)", f"{work / n * 1e6:,.0f} us", f"{1e6 / pool_rate:,.0f} us",
                    f"{(work / n) * pool_rate:.1f}x"))
    running = n / statistics.median(spans[sides[0]])
    rows.append(Row("  while running: tasks / journal span (context)", f"{running:,.0f} tasks/s",
                    f"{pool_rate:,.0f} tasks/s", f"{running / pool_rate:.1%}"))
    ab.versus(rows, figures)
    notes.append("the PASS uses the start-up-corrected rate; the baseline is timed inside its subprocess "
                 "(pool start, submits, waits, shutdown), ours is the whole command, which also reads, checks "
                 "and fingerprints the 20,000 tasks and writes run.json twice")
    notes.append("while running: first 'running' to last 'succeeded' journal record, i.e. dispatch alone "
                 "(no spec, no run.json, no pool start-up)")


# ---------------------------------------------------------------------------------------------------
# Figure 3: layered DAG, makespan against its lower bound and a level-barrier scheduler


def dag_figures(rows: list[Row], notes: list[str], root: str, env: dict[str, str], levels: int, width: int,
                runs: int, sides: Sequence[Install]) -> None:
    fresh = Fresh(root)
    spec_dir = fresh("dag-spec")
    tasks = layered_dag(levels, width, DAG_SEED)
    n = len(tasks)
    spec = specgen.write(spec_dir, "dag.yaml", dag_spec(tasks))
    warm = specgen.write(spec_dir, "warm.yaml", shell_spec(1))
    for side in sides:
        run_ours(side, warm, fresh, env, 1)  # warm-up, not counted

    got: dict[Install, defaultdict[str, list[float]]] = {side: defaultdict(list) for side in sides}
    barriers: list[float] = []
    barrier_cpu: list[float] = []
    for r in range(runs):
        for side in ab.in_turn(sides, r):
            run, run_dir = run_ours(side, spec, fresh, env, n, workers=DAG_WORKERS)
            walls = task_walls(run_dir)
            first, last = journal_span(run_dir)
            cp, work = lower_bound(tasks, walls, DAG_WORKERS)
            for name, value in (("makespan", last - first), ("cp", cp), ("work", work), ("bound", max(cp, work)),
                                ("ratio", (last - first) / max(cp, work)), ("command", run.wall), ("cpu", run.cpu)):
                got[side][name].append(value)
        barrier, spent = level_barrier(tasks, DAG_WORKERS, fresh("barrier"))
        barriers.append(barrier)
        barrier_cpu.append(spent)

    med = statistics.median
    figures: dict[Install, ab.Figures] = {side: {
        "DAG makespan": (med(g["makespan"]), secs), "DAG makespan / LB": (med(g["ratio"]), ab.times),
        "DAG whole command: wall": (med(g["command"]), secs), "DAG whole command: cpu": (med(g["cpu"]), secs),
    } for side, g in got.items()}
    ours = got[sides[0]]
    makespans, bounds, cps, works = ours["makespan"], ours["bound"], ours["cp"], ours["work"]
    ratios, commands, ours_cpu = ours["ratio"], ours["command"], ours["cpu"]
    nominal = {t.id: t.ms / 1000 for t in tasks}
    n_cp, n_work = lower_bound(tasks, nominal, DAG_WORKERS)
    label = f"median of {runs}" if runs > 1 else "1 run"
    cpu = f"{med(ours_cpu):.3f} / {med(barrier_cpu):.3f} s = {med(ours_cpu) / max(med(barrier_cpu), 1e-9):.2f}x"
    rows.append(Row(f"level barrier, ThreadPoolExecutor({DAG_WORKERS}) (baseline, {label})", secs(med(barriers)),
                    cpu=f"{med(barrier_cpu):.3f} s"))
    rows.append(Row(f"run DAG {levels}x{width}={n:,}, --workers {DAG_WORKERS}: makespan ({label})",
                    secs(med(makespans)), f"LB {secs(med(bounds))}", f"{med(ratios):.3f}x",
                    f"<= {MAKESPAN_RATIO_TARGET}x LB", verdict(med(ratios) <= MAKESPAN_RATIO_TARGET)))
    rows.append(Row("  LB parts: critical path | work / 16 (recorded walls)",
                    f"{secs(med(cps))} | {secs(med(works))}"))
    rows.append(Row("  level barrier / ours", secs(med(barriers)), secs(med(makespans)),
                    f"{med(barriers) / med(makespans):.2f}x", "(context: ~1.9x in the issue)"))
    rows.append(Row("  whole command wall", secs(med(commands)), cpu=cpu))
    rows.append(Row("  sleep-only LB: critical path | work / 16", f"{secs(n_cp)} | {secs(n_work)}",
                    ratio=f"ours {med(makespans) / max(n_cp, n_work):.2f}x"))
    if runs > 1:
        rows.append(Row("  per run: makespan / LB", ", ".join(f"{r:.3f}x" for r in ratios)))
    ab.versus(rows, figures)
    notes.append(f"DAG: shell tasks 'sleep 0.NNN' (bash -c), durations Pareto(1) clipped to [1, 50] ms, "
                 f"seed {DAG_SEED}, sum {sum(t.ms for t in tasks) / 1000:.1f} s; makespan = first 'running' "
                 "to last 'succeeded' journal record; LB from the journals' wall_s (process start included)")
    notes.append("level barrier: the same bash -c commands from this benchmark process, timed from the "
                 "first submit to the last level's end (no spec, journal or work directories); cpu column: "
                 "our whole command / the barrier's process and children")


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes / ~10, one run each, no snakemake: a smoke run")
    parser.add_argument("--runs", type=int, metavar="N",
                        help="runs of the shell and DAG figures (default 3, quick 1); python and snakemake run once")
    parser.add_argument("--no-snakemake", action="store_true", help="skip the Snakemake row (and its install)")
    parser.add_argument("--only", choices=("shell", "python", "dag"), action="append",
                        help="run only this figure (repeatable); default: all three")
    parser.add_argument("--against", metavar="PYTHON",
                        help="also make every run of ours with the cmbagent-batch of this python (another venv's), "
                             "in turn with this one's, and report each figure of both and new / old")
    args = parser.parse_args()
    sides, versus_notes = ab.installs(args.against)
    quick = args.quick
    runs = max(1, args.runs or (1 if quick else 3))
    env = specgen.bench_env()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_shell, n_python = (200, 2_000) if quick else (2_000, 20_000)
    skip_snakemake = "skipped in --quick" if quick else ("skipped (--no-snakemake)" if args.no_snakemake else None)
    levels, width = (10, 30) if quick else (30, 100)
    with specgen.TempDir() as tmp:
        steps = {
            "shell": (f"1. {n_shell:,} shell tasks, 2 workers", lambda r, nt: shell_figures(
                r, nt, tmp, env, n_shell, runs, skip_snakemake, sides)),
            "python": (f"2. {n_python:,} no-op python tasks, process pool of 2", lambda r, nt: python_figures(
                r, nt, tmp, env, n_python, 1, 1 if quick else 5, sides)),
            "dag": (f"3. layered DAG {levels}x{width}, {DAG_WORKERS} workers", lambda r, nt: dag_figures(
                r, nt, tmp, env, levels, width, runs, sides)),
        }
        sections, failed = specgen.run_sections(steps, args.only, settled=not quick)
    notes = [f"{specgen.load_note()}; {load_at_start:.2f} (1 min) at the start. 2 cores shared with "
             "other work: wall times include waiting for a core, compare the cpu column too"]
    if quick:
        notes.append("--quick: sizes / ~10, one run each; only the ratios mean anything")
    return specgen.report(f"cmbagent-batch run ({sys.executable})", sections, failed, notes + versus_notes)

if __name__ == "__main__":
    sys.exit(main())
