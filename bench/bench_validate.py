"""Time ``cmbagent-batch validate`` on a small spec, a 10^5-task matrix and a 10^5-task literal file.

Run as ``python bench/bench_validate.py [--quick] [--full] [--repeat N] [--runs N]`` with the interpreter
of a venv where cmbagent-batch is installed. Every figure is a whole command run as a subprocess and is
shown next to a baseline measured in the same invocation:

1. ``validate configs/quickstart.yaml`` (``python -m`` and the console script) against ``python -c pass``;
   target 0.3 s. Also: ``python -X importtime`` shows that no ag2/autogen/openai/mpi4py module is imported.
2. ``validate`` of a spec whose matrix expands to 100,000 tasks, against a naive expansion of the same
   matrix into dicts in plain Python; targets 5 s and 1 GB peak RSS.
3. ``validate`` of a file listing 100,000 tasks literally, against PyYAML's
   PyYAML's ``CSafeLoader`` of the same file (a subprocess too); target 1.5x.
   With ``--full``, also the pure-Python ``yaml.SafeLoader`` (about 36 s) for context.

Sub-second figures are the median of ``--repeat`` runs (default 7) after one unmeasured warm-up run;
the multi-second ones run ``--runs`` times (default 3 for the matrix, 1 for the literal file, whose
run and its baseline alternate). ``--quick`` divides the sizes by 10 and runs everything fewer times:
a smoke run, whose absolute figures are not comparable with the targets.

Exit status 0 whatever the figures (benchmarks report, they do not gate); 1 only when a measured
command did not run as expected (the benchmark itself is broken, not slow).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import specgen
from specgen import CommandFailed, Row, Sample, cpu_cell, measure, mib, secs, verdict

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")
HEAVY = ("ag2", "autogen", "openai", "mpi4py")

SMALL_TARGET = 0.3  # seconds
MATRIX_TARGET = 5.0  # seconds
RSS_TARGET = 10**9  # bytes
YAML_RATIO_TARGET = 1.5

NAIVE_EXPANSION = """
import itertools, sys
na, nb = int(sys.argv[1]), int(sys.argv[2])
tasks = [
    {"id": f"sim-{a}-{b}", "kind": "shell", "description": "One simulation per (a, b).",
     "run": f"python sim.py --a {a} --b {b} > out_{a}_{b}.txt", "outputs": [f"out_{a}_{b}.txt"],
     "matrix": {"a": a, "b": b}}
    for a, b in itertools.product(range(na), range(nb))
]
"""
YAML_LOAD = """
import sys, yaml
with open(sys.argv[2], "rb") as fh:
    data = fh.read()
getattr(yaml, sys.argv[1])(data).get_single_data()  # what yaml.load does with that (safe) loader
"""
INSTALLED = f"""
import importlib.util
print(" ".join(m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None))
"""


def imported_modules(cmd: list[str], cwd: str, env: dict[str, str]) -> set[str]:
    """Top-level packages a command imports, from ``python -X importtime``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise CommandFailed(f"-X importtime {' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    if not names:
        raise CommandFailed("-X importtime printed no imports; cannot check what validate imports")
    return names


def small_spec(rows: list[Row], notes: list[str], cwd: str, env: dict[str, str], repeat: int) -> None:
    base = measure([sys.executable, "-c", "pass"], repeat=repeat, cwd=cwd, env=env, warmup=True)
    rows.append(Row(f"python -c pass (baseline, {base.runs()})", secs(base.wall), cpu=cpu_cell(base)))
    commands = [(f"validate quickstart, python -m (median of {repeat})", specgen.cli())]
    script = specgen.console_script()
    if script:
        commands.append((f"validate quickstart, console script (median of {repeat})", [script]))
    else:
        notes.append(f"no cmbagent-batch script next to {sys.executable}; console-script figure skipped")
    for label, prefix in commands:
        s = measure([*prefix, "validate", QUICKSTART], repeat=repeat, cwd=cwd, env=env, warmup=True)
        rows.append(Row(label, secs(s.wall), secs(base.wall), f"{s.wall / base.wall:.2f}x",
                        f"<= {SMALL_TARGET} s", verdict(s.wall <= SMALL_TARGET), cpu_cell(s, base)))
    heavy = sorted(imported_modules([*specgen.cli(), "validate", QUICKSTART], cwd, env) & set(HEAVY))
    rows.append(Row("validate imports ag2/autogen/openai/mpi4py", ", ".join(heavy) or "none",
                    target="none", verdict=verdict(not heavy)))
    installed = subprocess.run([sys.executable, "-c", INSTALLED], cwd=cwd, env=env, capture_output=True,
                               text=True).stdout.split()
    notes.append("of ag2/autogen/openai/mpi4py, installed here: " + (", ".join(installed) or "none")
                 + ("" if installed else " (so the import check cannot fail here)"))


def matrix(rows: list[Row], cwd: str, env: dict[str, str], n_a: int, n_b: int, runs: int) -> None:
    spec = specgen.write(cwd, "matrix.yaml", specgen.matrix_spec(n_a, n_b))
    n = n_a * n_b
    base = measure([sys.executable, "-c", NAIVE_EXPANSION, str(n_a), str(n_b)], repeat=runs, cwd=cwd, env=env,
                   warmup=True)
    s = measure([*specgen.cli(), "validate", spec], repeat=runs, cwd=cwd, env=env, warmup=True)
    rows.append(Row(f"naive expansion {n:,} dicts (baseline, {base.runs()})", secs(base.wall), cpu=cpu_cell(base)))
    rows.append(Row(f"validate matrix {n:,}+1 tasks ({s.runs()})", secs(s.wall), secs(base.wall),
                    f"{s.wall / base.wall:.2f}x", f"<= {MATRIX_TARGET:g} s", verdict(s.wall <= MATRIX_TARGET),
                    cpu_cell(s, base)))
    rows.append(Row("  peak RSS", mib(s.peak_rss), mib(base.peak_rss), f"{s.peak_rss / base.peak_rss:.2f}x",
                    f"< 1 GB ({mib(RSS_TARGET)})", verdict(s.peak_rss < RSS_TARGET)))


def literal(rows: list[Row], notes: list[str], cwd: str, env: dict[str, str], n: int, runs: int,
            full: bool) -> None:
    spec = specgen.write(cwd, "literal.yaml", specgen.literal_spec(n))
    notes.append(f"literal file: {os.path.getsize(spec) / 1e6:.1f} MB, {n:,} tasks")
    has_libyaml = subprocess.run([sys.executable, "-c", "import yaml; print(yaml.__with_libyaml__)"], cwd=cwd,
                                 env=env, capture_output=True, text=True).stdout.strip() == "True"
    validate = [*specgen.cli(), "validate", spec]
    if not has_libyaml:
        s = measure(validate, repeat=runs, cwd=cwd, env=env)
        rows.append(Row(f"validate literal {n:,} tasks ({s.runs()})", secs(s.wall), "n/a", target="<= 1.5x",
                        cpu=cpu_cell(s)))
        notes.append("PyYAML here has no libyaml (CSafeLoader): the 1.5x figure has no baseline")
    else:
        c_load = [sys.executable, "-c", YAML_LOAD, "CSafeLoader", spec]
        base, s = Sample(), Sample()
        for _ in range(runs):  # alternate, so a change in the machine's load hits both alike
            for sample, cmd in ((base, c_load), (s, validate)):
                sample.add(specgen.run_once(cmd, cwd=cwd, env=env))
        rows.append(Row(f"yaml.load CSafeLoader (baseline, {base.runs()})", secs(base.wall), cpu=cpu_cell(base)))
        rows.append(Row(f"validate literal {n:,} tasks ({s.runs()})", secs(s.wall), secs(base.wall),
                        f"{s.wall / base.wall:.2f}x", f"<= {YAML_RATIO_TARGET}x",
                        verdict(s.wall <= YAML_RATIO_TARGET * base.wall), cpu_cell(s, base)))
        rows.append(Row("  peak RSS", mib(s.peak_rss), mib(base.peak_rss), f"{s.peak_rss / base.peak_rss:.2f}x"))
    if full:
        py = measure([sys.executable, "-c", YAML_LOAD, "SafeLoader", spec], repeat=1, cwd=cwd, env=env)
        rows.append(Row("yaml.load SafeLoader, pure Python (1 run)", secs(py.wall), cpu=cpu_cell(py)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 10 and fewer runs: a smoke run")
    parser.add_argument("--full", action="store_true", help="also time PyYAML's pure-Python SafeLoader (~36 s)")
    parser.add_argument("--repeat", type=int, metavar="N", help="runs of each sub-second figure (default 7, quick 5)")
    parser.add_argument("--runs", type=int, metavar="N", help="runs of each multi-second figure "
                        "(default 3 for the matrix, 1 for the literal file; quick 1)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    repeat = max(1, args.repeat or (5 if args.quick else 7))
    env = specgen.bench_env()
    rows: list[Row] = []
    notes: list[str] = []
    failed: list[str] = []
    with specgen.TempDir() as tmp:
        steps = [
            ("small spec", lambda: small_spec(rows, notes, tmp, env, repeat)),
            ("matrix", lambda: matrix(rows, tmp, env, 100 // scale, 1000,
                                      max(1, args.runs or (1 if args.quick else 3)))),
            ("literal", lambda: literal(rows, notes, tmp, env, 100_000 // scale,
                                        max(1, args.runs or 1), args.full)),
        ]
        for name, step in steps:
            try:
                step()
            except CommandFailed as exc:
                rows.append(Row(f"{name}: command failed", "-", verdict="ERROR"))
                failed.append(str(exc))
    notes.append(specgen.load_note())
    if args.quick:
        notes.append("--quick: sizes / 10; only the ratios mean anything, the seconds are not the targets'")
    specgen.print_table(f"cmbagent-batch validate ({sys.executable})", rows, notes)
    for message in failed:
        print(f"\nERROR: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
