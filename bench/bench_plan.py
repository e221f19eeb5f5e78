"""Time ``cmbagent-batch plan --format json`` on 10^5-task specs, cold (fresh cache) and cached.

Run as ``python bench/bench_plan.py [--quick] [--repeat N] [--runs N]`` with the interpreter of a venv
where cmbagent-batch is installed. For each of the two generated specs (a matrix expanding to 100,000
tasks plus one task reading all their outputs; a file listing 100,000 tasks literally, as a chain), in
the same invocation:

* baseline for cold: ``validate`` of the same spec (so the ratio is what analysis, DAG, rendering and
  the cache write add to loading the spec);
* cold: ``plan --format json --cache-dir FRESH``; target 10 s for the matrix, reported only for the
  literal file;
* cached: the same command again on the unchanged spec; target 1.5 s for both;
* baseline for cached: ``python -c "import json; json.load(open(PLAN))"`` on the plan it prints, the
  floor for any cached answer.

The command's output goes to /dev/null. One unmeasured run between cold and cached saves the plan
and checks that it came from the cache and lists every task. Sub-second-ish figures (cached, floor)
are the median of ``--repeat`` runs (default 5); the multi-second ones (validate, cold) run ``--runs``
times (default 1, each cold run with its own fresh cache directory). ``--quick`` divides the sizes by
10: a smoke run, whose absolute figures are not comparable with the targets.

Exit status 0 whatever the figures (benchmarks report, they do not gate); 1 only when a measured
command did not run as expected (the benchmark itself is broken, not slow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import specgen
from specgen import CommandFailed, Row, cpu_cell, measure, secs, verdict

COLD_TARGET = {"matrix": 10.0, "literal": None}  # seconds; None: reported only
CACHED_TARGET = 1.5  # seconds

JSON_FLOOR = "import json, sys; json.load(open(sys.argv[1]))"


def plan_figures(kind: str, text: str, n_tasks: int, rows: list[Row], cwd: str, env: dict[str, str],
                 repeat: int, runs: int) -> None:
    spec = specgen.write(cwd, f"{kind}.yaml", text)

    def plan(cache: str) -> list[str]:
        return [*specgen.cli(), "plan", "--format", "json", "--cache-dir", os.path.join(cwd, cache), spec]

    validate = measure([*specgen.cli(), "validate", spec], repeat=runs, cwd=cwd, env=env)
    rows.append(Row(f"validate {kind} {n_tasks:,} tasks (baseline, {validate.runs()})", secs(validate.wall),
                    cpu=cpu_cell(validate)))

    cold = specgen.Sample()
    for i in range(runs):
        cold.add(specgen.run_once(plan(f"cache-{kind}-{i}"), cwd=cwd, env=env))
    target = COLD_TARGET[kind]
    rows.append(Row(f"plan {kind} cold ({cold.runs()})", secs(cold.wall), secs(validate.wall),
                    f"{cold.wall / validate.wall:.2f}x", f"<= {target:g} s" if target else "(report)",
                    verdict(cold.wall <= target) if target else "-", cpu_cell(cold, validate)))
    rows.append(Row("  peak RSS", specgen.mib(cold.peak_rss), specgen.mib(validate.peak_rss),
                    f"{cold.peak_rss / validate.peak_rss:.2f}x"))

    # Untimed: keep the plan for the floor figure, and make sure the cached runs really are cached.
    saved = os.path.join(cwd, f"{kind}.plan.json")
    specgen.run_once(plan(f"cache-{kind}-0"), cwd=cwd, env=env, stdout_path=saved)
    with open(saved, encoding="utf-8") as fh:
        printed = json.load(fh)
    if printed.get("from_cache") is not True or len(printed.get("tasks", ())) != n_tasks:
        raise CommandFailed(f"second plan of {spec}: from_cache={printed.get('from_cache')!r}, "
                            f"{len(printed.get('tasks', ())):,} tasks (expected a cached plan of {n_tasks:,})")

    cached = measure(plan(f"cache-{kind}-0"), repeat=repeat, cwd=cwd, env=env)
    floor = measure([sys.executable, "-c", JSON_FLOOR, saved], repeat=repeat, cwd=cwd, env=env, warmup=True)
    rows.append(Row(f"json.load of the plan, {os.path.getsize(saved) / 1e6:.0f} MB (floor, {floor.runs()})",
                    secs(floor.wall), cpu=cpu_cell(floor)))
    rows.append(Row(f"plan {kind} cached ({cached.runs()})", secs(cached.wall), secs(floor.wall),
                    f"{cached.wall / floor.wall:.2f}x", f"<= {CACHED_TARGET} s", verdict(cached.wall <= CACHED_TARGET),
                    cpu_cell(cached, floor)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 10 and fewer runs: a smoke run")
    parser.add_argument("--repeat", type=int, metavar="N", help="runs of the cached and floor figures (default 5)")
    parser.add_argument("--runs", type=int, metavar="N", help="runs of the validate and cold figures (default 1)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    repeat = max(1, args.repeat or 5)
    runs = max(1, args.runs or 1)
    env = specgen.bench_env()
    rows: list[Row] = []
    failed: list[str] = []
    n_a, n_b, n_literal = 100 // scale, 1000, 100_000 // scale
    specs = [
        ("matrix", specgen.matrix_spec(n_a, n_b), n_a * n_b + 1),
        ("literal", specgen.literal_spec(n_literal), n_literal),
    ]
    with specgen.TempDir() as tmp:
        # Compile the package's .pyc files and fill the page cache before anything is timed.
        specgen.run_once([*specgen.cli(), "--version"], cwd=tmp, env=env)
        for kind, text, n_tasks in specs:
            try:
                plan_figures(kind, text, n_tasks, rows, tmp, env, repeat, runs)
            except CommandFailed as exc:
                rows.append(Row(f"plan {kind}: command failed", "-", verdict="ERROR"))
                failed.append(str(exc))
    notes = [specgen.load_note()]
    if args.quick:
        notes.append("--quick: sizes / 10; only the ratios mean anything, the seconds are not the targets'")
    specgen.print_table(f"cmbagent-batch plan --format json ({sys.executable})", rows, notes)
    for message in failed:
        print(f"\nERROR: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
