"""The run report at scale: `cmbagent-batch report RUN_DIR` of a run directory of N no-op python tasks
(default 10^5; ``matrix: {a, b}``, a process pool of 2, the run made by the real ``run``), its wall time and
the size of the HTML, against the targets (at 10^5: at most 5 s and 15 MB). Beside it, ``status`` of the
same directory in the same invocation, for scale.

    python bench/bench_run_report.py [--tasks 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

COMMAND = [sys.executable, "-m", "cmbagent_batch"]


def spec(n: int) -> str:
    a = math.isqrt(n)
    b = n // a
    return (f"version: 1\njob: {{name: report-{n}}}\nexecution: {{max_workers: 2}}\ntasks:\n"
            f"  - id: t-{{a}}-{{b}}\n    kind: python\n    call: noop:run\n"
            f"    matrix: {{a: {list(range(a))}, b: {list(range(b))}}}\n")


def timed(*args: str, cwd: str) -> float:
    start = time.perf_counter()
    r = subprocess.run([*COMMAND, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--keep", help="make the run directory here and keep it")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="bench-run-report-")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "noop.py"), "w") as fh:
        fh.write("def run(**kw):\n    return None\n")
    with open(os.path.join(work, "job.yaml"), "w") as fh:
        fh.write(spec(args.tasks))
    run_dir = os.path.join(work, "runs", f"report-{args.tasks}")
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        print(f"run of {args.tasks:,} no-op tasks (the run writes its own report as it ends): "
              f"{timed('run', '--quiet', 'job.yaml', cwd=work):.1f} s", flush=True)
    report = timed("report", run_dir, "-o", os.path.join(work, "bench-report.html"), cwd=work)
    size = os.path.getsize(os.path.join(work, "bench-report.html"))
    status = timed("status", run_dir, cwd=work)
    journal = sum(os.path.getsize(os.path.join(run_dir, "journal", n)) for n in os.listdir(os.path.join(run_dir, "journal"))
                  if n.endswith(".jsonl"))
    print(f"tasks: {args.tasks:,}; journals {journal / 2**20:.1f} MB")
    print(f"report: {report:.2f} s (target 5 s at 10^5), HTML {size / 2**20:.2f} MB (target 15 MB)")
    print(f"status, for scale: {status:.2f} s")
    if not args.keep:
        print(f"(run directory left in {work})")


if __name__ == "__main__":
    main()
