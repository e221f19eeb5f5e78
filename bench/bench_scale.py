"""A job of 10^4, 10^5 and 10^6 tasks: every command's wall time and peak RSS, the run directory's cost to
a file system, and how each grows from one size to the next.

Run as ``python bench/bench_scale.py [--sizes 10000,100000] [--quick] [--runs N] [--timeout S]`` with the
interpreter of a venv where cmbagent-batch is installed (the commands are ``python -m cmbagent_batch``
of that interpreter).

For each size N (default 10^4, 10^5, 10^6; ``--quick``: 10^3, 10^4), one python task ``call: noop:run``
(``noop.py`` beside the spec: ``def run(**kw): return None``) with ``matrix: {a: [...], b: [...]}``
(a * b = N, ids ``t-A-B``) and ``execution: {use_process_pool: true, max_workers: 2}``. Measured, in
this order, each under a wrapper that reports the command's own wall time, CPU time and peak RSS (its
largest process), stdout to /dev/null:

1. ``validate SPEC``; ``plan SPEC --cache-dir FRESH`` (cold); the same again (cached);
2. ``run SPEC --quiet --run-dir FRESH --cache-dir FRESH`` (first run; every task must succeed); then
   what the run directory holds: ``run.json`` bytes, journal bytes per task, inodes per task, the
   fullest directory;
3. the same ``run`` again (all up to date: every task must be skipped); ``status RUN_DIR``;
   ``run --dry-run``; ``run --only 't-0-*'`` (a rerun selecting the B tasks of a = 0).

Baseline, in the same invocation: a raw ``concurrent.futures.ProcessPoolExecutor(2)`` making the same N
calls of the same function, in its own subprocess (interpreter and pool start and shutdown included).
Each call is its own ``submit``, as each task is its own unit for us, in windows of 10,000 futures
(submit 10,000, wait for them, go on), so the baseline does not hold 10^6 futures at once. Printed
beside it for context: ``pool.map`` with ``chunksize=1000``, calls batched as our runner batches tiny
python tasks.

Targets (the issue's, at 10^6): first run at most 2x the baseline, peak RSS of ``run``, ``status``,
``validate`` and cold ``plan`` at most 1 GB, ``validate`` and cold ``plan`` at most 15 s, rerun at most
10 s, ``status`` at most 2 s, ``--dry-run`` at most 10 s, at most 0.01 inodes per no-op task, no directory
over 4,096 entries. At another size the time and memory targets are held pro rata (target x N / 10^6) to
the figure above start-up: the same command on a 1-task spec, measured first and subtracted.

Then the same table at 10^5 (or the largest size chosen below it) with shell tasks ``echo {a}{b} >
out.txt``, ``outputs: [out.txt]``, beside ``xargs -P2`` running the same commands with ``sh -c``, each in
a directory of its own (context). Its inodes per task are those of a task that writes one output.

Last, the growth table: each figure's factor between consecutive sizes (times and RSS above start-up),
with the factor per 10x; more than 15x per 10x is flagged SUPERLINEAR.

Each command has a time limit (``--timeout``; default 120 s up to 10^4 tasks, 600 s above): a command over it is ended (SIGTERM, SIGKILL a minute later) and its row says "timed out". After
a first run that timed out, the rerun and ``--only`` are skipped; ``status`` and ``--dry-run`` read what it
left. Exit status 0 whatever the figures (the benchmark reports, it does not gate); 1 only when a command
did not run as expected.
"""

from __future__ import annotations

import argparse
import enum
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import specgen
from runs import Fresh, count_outputs, read_manifest
from specgen import Census, CommandFailed, Row, Sample, secs, verdict

SIZES = (10**4, 10**5, 10**6)
QUICK_SIZES = (10**3, 10**4)
SHELL_MAX = 10**5  # the shell table's size: the largest size chosen up to this one
TARGET_N = 10**6  # the size the targets are for
GB = 10**9
RUN_VS_BASELINE = 2.0  # first run, at most times the baseline
INODES_PER_TASK = 0.01  # no-op python task
LARGEST_DIR = 4096  # entries
SUPERLINEAR = 15.0  # growth per 10x, above which a figure is flagged
TOO_SMALL_S, TOO_SMALL_RSS = 0.2, 10**7  # figures above start-up too small for their factor to mean anything
WINDOW, CHUNKSIZE = 10_000, 1_000

NOOP_MODULE = "def run(**kw):\n    return None\n"

POOL_BASELINE = f"""\
import sys
from concurrent.futures import ProcessPoolExecutor

import noop


def call(_):
    return noop.run()


def main():
    n, how = int(sys.argv[1]), sys.argv[2]
    with ProcessPoolExecutor(2) as pool:
        if how == "map":
            for _ in pool.map(call, range(n), chunksize={CHUNKSIZE}):
                pass
        else:
            for start in range(0, n, {WINDOW}):
                for f in [pool.submit(noop.run) for _ in range(min({WINDOW}, n - start))]:
                    f.result()


if __name__ == "__main__":
    main()
"""


class Kind(enum.Enum):
    """The job's one task entry."""

    PYTHON = "no-op python tasks, process pool of 2"
    SHELL = "shell tasks writing one output, 2 workers"


class Cmd(enum.Enum):
    """A measured command; the value is its row's label."""

    VALIDATE = "validate"
    PLAN_COLD = "plan, cold (fresh --cache-dir)"
    PLAN_CACHED = "plan, cached"
    RUN = "first run"
    RERUN = "rerun, all up to date"
    STATUS = "status RUN_DIR"
    DRY_RUN = "run --dry-run"
    ONLY = "run --only 't-0-*'"


@dataclass(frozen=True)
class Limit:
    """A command's targets at ``TARGET_N`` tasks."""

    wall: float | None = None  # seconds
    rss: int | None = None  # bytes
    vs_baseline: float | None = None  # times the baseline's wall


LIMITS = {Cmd.VALIDATE: Limit(15.0, GB), Cmd.PLAN_COLD: Limit(15.0, GB), Cmd.RUN: Limit(None, GB, RUN_VS_BASELINE),
          Cmd.RERUN: Limit(10.0), Cmd.STATUS: Limit(2.0, GB), Cmd.DRY_RUN: Limit(10.0)}


@dataclass(frozen=True)
class Measured:
    wall: float  # median seconds; the time limit when it timed out
    cpu: float
    rss: int  # bytes, the highest over the runs
    timed_out: bool = False


@dataclass
class SizeResult:
    """Everything measured at one size of one kind of job."""

    n: int
    kind: Kind
    cmds: dict[Cmd, Measured] = field(default_factory=dict)
    skipped: dict[Cmd, str] = field(default_factory=dict)  # why a command was not measured
    baseline: Measured | None = None
    context: Measured | None = None  # the batched pool baseline (python)
    run_json: int | None = None
    journal: int | None = None
    disk: Census | None = None


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if abs(n_bytes) >= 1e7 else f"{n_bytes / 1e6:,.1f} MB"


def limit_for(n: int) -> float:
    return 120.0 if n <= 10**4 else 600.0


def factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == n``, ``a`` the largest divisor of ``n`` not above its square root."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def job_spec(kind: Kind, n: int) -> str:
    a, b = factors(n)
    values = f"      a: [{', '.join(map(str, range(a)))}]\n      b: [{', '.join(map(str, range(b)))}]\n"
    if kind is Kind.PYTHON:
        head, body = "  use_process_pool: true\n", "    kind: python\n    call: noop:run\n"
    else:
        head, body = "", "    kind: shell\n    run: echo {a}{b} > out.txt\n    outputs: [out.txt]\n"
    return (f"version: 1\njob:\n  name: bench-scale\nexecution:\n{head}  max_workers: 2\ntasks:\n"
            f"  - id: t-{{a}}-{{b}}\n{body}    matrix:\n{values}")


# ---------------------------------------------------------------------------------------------------
# Measuring one size


class Sizer:
    """Measures the commands of one job; ``start`` (the 1-task figures) are for the pro rata targets."""

    def __init__(self, root: str, env: dict[str, str], runs: int, limit: float | None) -> None:
        self.fresh, self.env, self.runs, self.limit = Fresh(root), env, runs, limit

    def timed(self, argv: Callable[[], list[str]], cwd: str, n: int, expect: int | None = 0) -> Measured:
        """Median of ``runs`` runs of ``argv()`` (called once per run); stops at the first time out."""
        sample, limit = Sample(), self.limit or limit_for(n)
        for _ in range(self.runs):
            run = specgen.run_limited(argv(), cwd=cwd, env=self.env, limit=limit, expect=expect)
            if run is None:
                return Measured(limit, float("nan"), 0, timed_out=True)
            sample.add(run)
        return Measured(sample.wall, sample.cpu, sample.peak_rss)

    def job(self, kind: Kind, n: int) -> SizeResult:
        """Every command of ``n`` tasks of ``kind``, the run directory, and the baseline."""
        result = SizeResult(n, kind)
        spec_dir = self.fresh(f"{kind.name.lower()}-{n}")
        specgen.write(spec_dir, "noop.py", NOOP_MODULE)
        spec = specgen.write(spec_dir, "job.yaml", job_spec(kind, n))
        cli, m = specgen.cli(), result.cmds
        caches: list[str] = []
        run_dirs: list[str] = []

        def cold_cache() -> str:
            caches.append(self.fresh("cache"))
            return caches[-1]

        def first_run() -> list[str]:
            run_dirs.append(os.path.join(self.fresh("run"), "rd"))
            return [*cli, "run", spec, "--quiet", "--run-dir", run_dirs[-1], "--cache-dir", cold_cache()]

        m[Cmd.VALIDATE] = self.timed(lambda: [*cli, "validate", spec], spec_dir, n)
        m[Cmd.PLAN_COLD] = self.timed(lambda: [*cli, "plan", spec, "--cache-dir", cold_cache()], spec_dir, n)
        m[Cmd.PLAN_CACHED] = self.timed(lambda: [*cli, "plan", spec, "--cache-dir", caches[-1]], spec_dir, n)
        m[Cmd.RUN] = self.timed(first_run, spec_dir, n)
        rd, cache = run_dirs[0], caches[-1]
        again = [*cli, "run", spec, "--quiet", "--run-dir", rd, "--cache-dir", cache]
        finished = not m[Cmd.RUN].timed_out
        if finished:
            self.check_counts(rd, again, {"succeeded": n})
        result.run_json = specgen.tree_bytes(os.path.join(rd, "run.json"))
        result.journal = specgen.tree_bytes(os.path.join(rd, "journal"))
        result.disk = specgen.census(rd)
        if finished:
            m[Cmd.RERUN] = self.timed(lambda: again, spec_dir, n)
            self.check_counts(rd, again, {"skipped": n})
        m[Cmd.STATUS] = self.timed(lambda: [*cli, "status", rd], spec_dir, n, expect=0 if finished else None)
        m[Cmd.DRY_RUN] = self.timed(lambda: [*cli, "run", spec, "--dry-run", "--run-dir", rd, "--cache-dir", cache],
                                    spec_dir, n)
        if finished:
            m[Cmd.ONLY] = self.timed(lambda: [*again, "--only", "t-0-*"], spec_dir, n)
        else:
            result.skipped.update(dict.fromkeys((Cmd.RERUN, Cmd.ONLY), "skipped: the first run did not finish"))
        if kind is Kind.PYTHON:
            self.pool_baselines(result, spec_dir)
        else:
            self.xargs_baseline(result)
        return result

    def check_counts(self, run_dir: str, cmd: list[str], expected: dict[str, int]) -> None:
        counts = read_manifest(os.path.join(run_dir, "run.json"), cmd).get("counts")
        if counts != expected:
            raise CommandFailed(f"{' '.join(cmd)}\n  run.json counts {counts}, expected {expected}")

    def pool_baselines(self, result: SizeResult, spec_dir: str) -> None:
        script = specgen.write(spec_dir, "pool_baseline.py", POOL_BASELINE)
        result.baseline = self.timed(lambda: [sys.executable, script, str(result.n), "submit"], spec_dir, result.n)
        result.context = self.timed(lambda: [sys.executable, script, str(result.n), "map"], spec_dir, result.n)

    def xargs_baseline(self, result: SizeResult) -> None:
        cwd = self.fresh("xargs")
        script = f"seq {result.n} | xargs -P2 -I{{}} sh -c 'mkdir -p d/{{}} && echo {{}} > d/{{}}/out.txt'"
        result.baseline = self.timed(lambda: ["sh", "-c", script], cwd, result.n)
        if not result.baseline.timed_out and count_outputs(cwd) != result.n:
            raise CommandFailed(f"{script}\n  wrote {count_outputs(cwd)} of {result.n} outputs")

    def startup(self, kind: Kind) -> SizeResult:
        """The commands on a 1-task spec, after one unmeasured run (compiles .pyc files, fills the page cache)."""
        warm_dir = self.fresh(f"warm-{kind.name.lower()}")
        specgen.write(warm_dir, "noop.py", NOOP_MODULE)
        warm = specgen.write(warm_dir, "job.yaml", job_spec(kind, 1))
        specgen.run_once([*specgen.cli(), "run", warm, "--quiet", "--run-dir", os.path.join(warm_dir, "rd")],
                         cwd=warm_dir, env=self.env)
        return self.job(kind, 1)


# ---------------------------------------------------------------------------------------------------
# The tables


def cell(m: Measured) -> str:
    return f"timed out after {m.wall:.0f} s" if m.timed_out else f"{secs(m.wall)}, {mb(m.rss)}"


def projected(value: float, start: float, n: int) -> float:
    """``value`` at ``n`` tasks carried linearly to ``TARGET_N``: the start-up plus what is above it, scaled."""
    return start + (value - start) * TARGET_N / n


def target_row(cmd: Cmd, m: Measured, n: int, start: Measured | None, base: Measured | None) -> Row:
    """The command's row beside its targets: held to the figures at ``TARGET_N`` tasks, else to their
    linear projection from this size (verdict in parentheses; a figure less than ``TOO_SMALL_*`` above
    start-up is not projected, nor judged)."""
    limit = LIMITS.get(cmd, Limit())
    row = Row(cmd.value, cell(m), cpu="-" if m.timed_out else f"{m.cpu:.3f} s")
    exact = n == TARGET_N or start is None or m.timed_out
    wall: float | None = m.wall
    rss: float | None = None if m.timed_out else float(m.rss)
    if not exact and start is not None:
        wall = projected(m.wall, start.wall, n) if m.wall - start.wall >= TOO_SMALL_S else None
        rss = projected(m.rss, start.rss, n) if m.rss - start.rss >= TOO_SMALL_RSS else None
        row.measured += (f" -> at 10^6 {'-' if wall is None else '~' + secs(wall)}, "
                         f"{'-' if rss is None else '~' + mb(rss)}")
    checks: list[tuple[str, bool | None]] = []
    if limit.wall is not None:
        checks.append((f"<= {secs(limit.wall)}", None if wall is None else wall <= limit.wall))
    if limit.rss is not None:
        checks.append((f"<= {mb(limit.rss)}", None if rss is None else rss <= limit.rss))
    if limit.vs_baseline is not None and base is not None and not base.timed_out:
        # ours above its start-up against the whole baseline (its own start-up is a pool's, ~0.1 s)
        ours = m.wall - (start.wall if start is not None and n != TARGET_N else 0.0)
        checks.append((f"<= {limit.vs_baseline:g}x baseline", ours <= limit.vs_baseline * base.wall))
        row.baseline, row.ratio = secs(base.wall), f"{ours / base.wall:.2f}x"
    if checks:
        row.target = ", ".join(text for text, _ in checks)
        judged = [good for _, good in checks if good is not None]
        ok = verdict(all(judged)) if judged else "-"
        row.verdict = ok if exact or not judged else f"({ok})"
    return row


def size_table(r: SizeResult, start: SizeResult | None) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    if r.kind is Kind.PYTHON and r.baseline and r.context:
        rows.append(Row(f"ProcessPoolExecutor(2): {r.n:,} submits, windows of {WINDOW:,} (baseline)",
                        cell(r.baseline), cpu=f"{r.baseline.cpu:.3f} s"))
        rows.append(Row(f"ProcessPoolExecutor(2).map, chunksize {CHUNKSIZE:,} (context)", cell(r.context),
                        cpu=f"{r.context.cpu:.3f} s"))
    elif r.baseline:
        rows.append(Row(f"xargs -P2: {r.n:,} sh -c 'mkdir -p d/I && echo I > d/I/out.txt' (context)",
                        cell(r.baseline), cpu=f"{r.baseline.cpu:.3f} s"))
    for cmd in Cmd:
        if cmd in r.skipped:
            rows.append(Row(cmd.value, r.skipped[cmd]))
        elif cmd in r.cmds:
            base = r.baseline if r.kind is Kind.PYTHON else None
            row = target_row(cmd, r.cmds[cmd], r.n, start.cmds.get(cmd) if start else None, base)
            if r.kind is Kind.SHELL and cmd is Cmd.RUN and r.baseline and not r.baseline.timed_out:
                row.baseline, row.ratio = secs(r.baseline.wall), f"{r.cmds[cmd].wall / r.baseline.wall:.2f}x"
            rows.append(row)
    if r.run_json is not None:
        rows.append(Row("run.json after the first run", f"{r.run_json:,} B ({r.run_json / r.n:,.0f} B/task)"))
    rows.append(Row("journal/ after the first run", "absent" if r.journal is None
                    else f"{r.journal:,} B ({r.journal / r.n:,.0f} B/task)"))
    if r.disk is not None:
        d = r.disk
        what = "inodes per task (one output each)" if r.kind is Kind.SHELL else "inodes per task"
        ok = d.inodes / r.n <= INODES_PER_TASK
        rows.append(Row(f"run directory: {what}", f"{d.inodes / r.n:.3f} ({d.inodes:,} inodes, {mb(d.bytes)})",
                        target=f"<= {INODES_PER_TASK}" if r.kind is Kind.PYTHON else "-",
                        verdict=verdict(ok) if r.kind is Kind.PYTHON else "-"))
        rows.append(Row("largest directory", f"{d.largest:,} entries ({d.largest_path})", target=f"<= {LARGEST_DIR:,}",
                        verdict=verdict(d.largest <= LARGEST_DIR)))
    if r.n != TARGET_N:
        notes.append(f"{r.n:,} tasks: '-> at 10^6' carries a figure linearly to 10^6 tasks (the 1-task figure plus "
                     f"what is above it x 10^6 / {r.n:,}; '-' when that is under {TOO_SMALL_S} s or "
                     f"{mb(TOO_SMALL_RSS)}, too small to carry); the targets are held to that, verdicts in "
                     "parentheses. The baseline ratio is of the time above start-up")
    if Cmd.RUN in r.skipped or (Cmd.RUN in r.cmds and r.cmds[Cmd.RUN].timed_out):
        notes.append("the first run timed out: status and --dry-run read the run directory it left, and the "
                     "run directory figures are of that partial run")
    return rows, notes


def startup_table(starts: Sequence[SizeResult]) -> tuple[list[Row], list[str]]:
    rows = [Row(f"{s.kind.name.lower()}: {cmd.value}", cell(m), cpu=f"{m.cpu:.3f} s")
            for s in starts for cmd, m in s.cmds.items()]
    return rows, ["each command on a 1-task spec of the same shape; subtracted from the figures of the other "
                  "sizes for their pro rata targets and the growth table"]


def factor_row(label: str, sizes: Sequence[int], values: Sequence[float | None], timed_out: Sequence[bool],
               small: float, show: Callable[[float], str]) -> Row:
    """``values`` at ``sizes``, and the factor of each step with the factor per 10x; a timed-out value
    is a lower bound, a step from a value below ``small`` is too noisy to flag."""
    shown, steps, flagged, noisy = [], [], False, False
    for i, v in enumerate(values):
        shown.append("-" if v is None else (">" if timed_out[i] else "") + show(v))
        if i == 0 or v is None or values[i - 1] is None:
            continue
        prev = values[i - 1]
        assert prev is not None
        if timed_out[i - 1] or prev < small or v <= 0 or prev <= 0:
            steps.append("-")
            noisy = noisy or prev < small or v <= 0
            continue
        f = v / prev
        per10 = f ** (math.log(10) / math.log(sizes[i] / sizes[i - 1])) if f > 0 else 0.0
        steps.append((">" if timed_out[i] else "") + f"{f:.1f}x" + ("" if sizes[i] == 10 * sizes[i - 1]
                                                                   else f" ({per10:.1f}x per 10x)"))
        flagged = flagged or per10 > SUPERLINEAR
    result = "SUPERLINEAR" if flagged else ("(too small)" if noisy and all(s == "-" for s in steps) else "ok")
    return Row(label, " -> ".join(shown), ratio=", ".join(steps) or "-", target=f"<= {SUPERLINEAR:g}x per 10x",
               verdict=result)


def growth_table(results: Sequence[SizeResult], start: SizeResult | None) -> tuple[list[Row], list[str]]:
    sizes = [r.n for r in results]
    rows: list[Row] = []
    for cmd in Cmd:
        ms = [r.cmds.get(cmd) for r in results]
        s = start.cmds.get(cmd) if start else None
        out = [m is not None and m.timed_out for m in ms]
        walls = [None if m is None else m.wall - (s.wall if s else 0.0) for m in ms]
        rss = [None if m is None or m.timed_out else float(m.rss - (s.rss if s else 0)) for m in ms]
        rows.append(factor_row(f"{cmd.value}: wall above start-up", sizes, walls, out, TOO_SMALL_S, secs))
        rows.append(factor_row(f"{cmd.value}: peak RSS above start-up", sizes, rss, [False] * len(ms),
                               TOO_SMALL_RSS, mb))
    never = [False] * len(results)
    base = [r.baseline for r in results]
    rows.append(factor_row("baseline (ProcessPoolExecutor): wall", sizes, [b.wall if b else None for b in base],
                           [bool(b and b.timed_out) for b in base], TOO_SMALL_S, secs))
    disk = [r.disk for r in results]
    for label, values in (("run.json bytes", [r.run_json for r in results]),
                          ("journal/ bytes", [r.journal for r in results]),
                          ("run directory inodes", [d.inodes if d else None for d in disk]),
                          ("run directory bytes", [d.bytes if d else None for d in disk]),
                          ("largest directory entries", [d.largest if d else None for d in disk])):
        rows.append(factor_row(label, sizes, [None if v is None else float(v) for v in values], never, 0.0,
                               lambda v: f"{v:,.0f}"))
    notes = [f"sizes {' -> '.join(f'{n:,}' for n in sizes)}; factor of each step; linear is the size ratio "
             f"(10x per 10x); above {SUPERLINEAR:g}x per 10x is flagged SUPERLINEAR",
             "wall and RSS above start-up: minus the same command on a 1-task spec; a step from less than "
             f"{TOO_SMALL_S} s or {mb(TOO_SMALL_RSS)} above start-up is not judged ('-')",
             "'>' marks a command that timed out: its figure is the time limit, a lower bound"]
    return rows, notes


# ---------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"bench_scale: --sizes: not a list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"bench_scale: --sizes: sizes must be positive integers: {text!r}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", metavar="N,N,...", help="task counts (default 10000,100000,1000000)")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000: a smoke run")
    parser.add_argument("--runs", type=int, default=1, metavar="N", help="runs of each command (median; default 1)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="time limit of each command (default 120 s up to 10^4 tasks, else 600 s)")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    shell_n = max((n for n in sizes if n <= SHELL_MAX), default=None)
    env = specgen.bench_env()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: list[SizeResult] = []
    starts: dict[Kind, SizeResult] = {}
    with specgen.TempDir() as tmp:
        sizer = Sizer(tmp, env, max(1, args.runs), args.timeout)

        def start_step(rows: list[Row], notes: list[str]) -> None:
            for kind in Kind:
                starts[kind] = sizer.startup(kind)
            got = startup_table(list(starts.values()))
            rows.extend(got[0])
            notes.extend(got[1])

        def size_step(kind: Kind, n: int) -> specgen.Step:
            def step(rows: list[Row], notes: list[str]) -> None:
                r = sizer.job(kind, n)
                if kind is Kind.PYTHON:
                    results.append(r)
                got = size_table(r, starts.get(kind))
                rows.extend(got[0])
                notes.extend(got[1])
            return step

        steps: dict[str, tuple[str, specgen.Step]] = {"start": ("start-up: 1 task", start_step)}
        for n in sizes:
            steps[f"python-{n}"] = (f"{n:,} {Kind.PYTHON.value}", size_step(Kind.PYTHON, n))
        if shell_n is not None:
            steps[f"shell-{shell_n}"] = (f"{shell_n:,} {Kind.SHELL.value}", size_step(Kind.SHELL, shell_n))
        sections, failed = specgen.run_sections(steps, None, settled=not args.quick)
    if len(results) > 1:
        rows, notes = growth_table(results, starts.get(Kind.PYTHON))
        sections.append((f"growth: {Kind.PYTHON.value}", rows, notes))
    closing = [f"{specgen.load_note()}; {load_at_start:.2f} (1 min) at the start",
               f"baseline: a raw ProcessPoolExecutor(2) ({multiprocessing.get_start_method()} start method, this "
               "interpreter's default) in its own subprocess, one submit per call in windows of "
               f"{WINDOW:,} futures (each call its own unit, as each task is ours); map with chunksize "
               f"{CHUNKSIZE:,} batches calls as our runner batches tiny tasks (context)"]
    return specgen.report(f"cmbagent-batch at scale ({sys.executable})", sections, failed, closing)


if __name__ == "__main__":
    sys.exit(main())
