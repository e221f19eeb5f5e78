"""Time the MPI backend's ``RankExecutor`` against mpi4py's ``MPICommExecutor``, on 2 worker ranks.

Run as ``python bench/bench_mpi_executor.py [--quick] [--runs N] [--calls N]`` with the interpreter of a
venv holding cmbagent-batch, mpi4py and an MPI (``mpiexec`` is looked for beside that interpreter, then on
PATH). Every case is its own ``mpiexec -n 3`` job (rank 0 submits, ranks 1 and 2 work); the clock runs
from the first submit to the last result, after one warm-up call, so MPI start-up does not count.

Throughput, 20,000 no-op calls (``--calls``), each a ``submit`` whose future is waited for at the end:

1. ``mpi4py``: ``mpi4py.futures.MPICommExecutor`` (the baseline; one call at a time per worker).
2. ``rank, 1 slot``: ``RankExecutor`` with ``slots_per_rank=1`` (the same concurrency as the baseline);
   target: at least 50% of the baseline's calls/s.
3. ``rank, 4 slots``: ``slots_per_rank=4`` (calls pipelined on each worker).
4. ``rank, 64-call batches``: ``slots_per_rank=1``, the same calls submitted 64 to a ``submit`` (one
   function running 64 no-ops), as the scheduler submits batches of tiny tasks; calls/s counts calls.

Idle cost and latency, per longest poll interval (``wire.POLL_MAX``): rank 0's CPU time over 1 s with no
call in flight, and over a 1 s wait for a call that sleeps 1 s, the worker process's CPU time during
that sleep, and the median round trip
of a no-op call submitted after 20 ms of quiet (loops at their full poll interval), over 50 calls. The same for
``MPICommExecutor`` (its own 1 ms back-off) for context.

Cases alternate run by run, so a change in the machine's load hits all alike; figures are medians over
``--runs`` runs (default 3). ``--quick``: 2,000 calls, one run, the default poll interval only (a smoke
run). Exit status 0 whatever the figures; 1 when a case did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

TARGET = 0.5  # RankExecutor (1 slot) calls/s over MPICommExecutor calls/s, at least
BATCH = 64
POLLS = (0.0005, 0.001, 0.002, 0.005)


def noop() -> None:
    return None


def noops(n: int) -> int:
    for _ in range(n):
        noop()
    return n


def sleep_cpu(seconds: float) -> float:
    c0 = time.process_time()
    time.sleep(seconds)
    return time.process_time() - c0


# Inside an mpiexec job: rank 0 measures and prints "RESULT {json}".

def throughput(ex: Any, calls: int, batch: int) -> dict[str, float]:
    ex.submit(noop).result()
    t0 = time.perf_counter()
    if batch == 1:
        futures = [ex.submit(noop) for _ in range(calls)]
    else:
        futures = [ex.submit(noops, min(batch, calls - i)) for i in range(0, calls, batch)]
    for f in futures:
        f.result()
    return {"calls_per_s": calls / (time.perf_counter() - t0)}


def idle(ex: Any) -> dict[str, float]:
    ex.submit(noop).result()
    c0 = time.process_time()
    time.sleep(1.0)
    quiet_cpu = time.process_time() - c0
    c0 = time.process_time()
    worker_cpu = ex.submit(sleep_cpu, 1.0).result()
    rank0_cpu = time.process_time() - c0
    trips = []
    for _ in range(50):
        time.sleep(0.02)
        t0 = time.perf_counter()
        ex.submit(noop).result()
        trips.append(time.perf_counter() - t0)
    return {"quiet_cpu": quiet_cpu, "rank0_cpu": rank0_cpu, "worker_cpu": worker_cpu,
            "round_trip": statistics.median(trips)}


def inside(case: str, calls: int, poll: float) -> int:
    if case.startswith("mpi4py"):
        from mpi4py import MPI
        from mpi4py.futures import MPICommExecutor

        with MPICommExecutor(MPI.COMM_WORLD, root=0) as ex:
            if ex is not None:
                out = idle(ex) if case == "mpi4py-idle" else throughput(ex, calls, 1)
                print("RESULT " + json.dumps(out), flush=True)
        return 0

    from cmbagent_batch.backends.mpi import run_in_world, wire

    wire.POLL_MAX = poll  # every rank, before its loop starts
    slots = 4 if case == "rank-4" else 1

    def main(ex: Any) -> int:
        if case == "rank-idle":
            out = idle(ex)
        else:
            out = throughput(ex, calls, BATCH if case == "rank-batch" else 1)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    return run_in_world(main, slots)


# Outside: run the cases, print the table.

def mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if found is None:
        sys.exit("bench_mpi_executor: no mpiexec beside the interpreter or on PATH")
    return found


def run_case(case: str, calls: int, poll: float) -> dict[str, float]:
    cmd = [mpiexec(), "-n", "3", sys.executable, os.path.abspath(__file__), "--inside", case,
           "--calls", str(calls), "--poll", str(poll)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return dict(json.loads(lines[0][len("RESULT "):]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--calls", type=int, default=None)
    ap.add_argument("--inside", help=argparse.SUPPRESS)
    ap.add_argument("--poll", type=float, default=0.001, help=argparse.SUPPRESS)
    args = ap.parse_args()
    calls = args.calls or (2000 if args.quick else 20000)
    if args.inside:
        return inside(args.inside, calls, args.poll)
    runs = args.runs or (1 if args.quick else 3)
    polls = (0.001,) if args.quick else POLLS
    cases = [("mpi4py", 0.001), ("rank-1", 0.001), ("rank-4", 0.001), ("rank-batch", 0.001),
             ("mpi4py-idle", 0.001)] + [("rank-idle", p) for p in polls]
    got: dict[tuple[str, float], list[dict[str, float]]] = {c: [] for c in cases}
    try:
        for _ in range(runs):
            for case, poll in cases:
                got[case, poll].append(run_case(case, calls, poll))
    except RuntimeError as exc:
        print(f"ERROR {exc}")
        return 1

    def med(case: str, key: str, poll: float = 0.001) -> float:
        return statistics.median(r[key] for r in got[case, poll])

    base = med("mpi4py", "calls_per_s")
    print(f"MPI executors, {calls:,} no-op calls, mpiexec -n 3 (2 worker ranks), median of {runs} run(s)")
    print(f"{'case':<34}{'calls/s':>10}{'vs mpi4py':>11}")
    for case, label in (("mpi4py", "MPICommExecutor (baseline)"), ("rank-1", "RankExecutor, 1 slot per rank"),
                        ("rank-4", "RankExecutor, 4 slots per rank"),
                        ("rank-batch", f"RankExecutor, {BATCH}-call batches")):
        rate = med(case, "calls_per_s")
        print(f"{label:<34}{rate:>10,.0f}{rate / base:>10.2f}x")
    ratio = med("rank-1", "calls_per_s") / base
    print(f"figure: RankExecutor (1 slot) / MPICommExecutor = {ratio:.2f}, target >= {TARGET}: "
          f"{'PASS' if ratio >= TARGET else 'BELOW TARGET'}")
    print()
    print("Idle cost and latency: CPU seconds of rank 0 over 1 s with no call in flight, then of rank 0 and")
    print("of the worker over a 1 s wait for a sleeping call; round trip of a no-op call after 20 ms quiet")
    print(f"{'case':<34}{'rank 0 CPU':>11}{'rank 0 CPU':>11}{'worker CPU':>11}{'round trip':>12}")
    print(f"{'':<34}{'(no call)':>11}{'(waiting)':>11}{'(waiting)':>11}")
    rows = [("MPICommExecutor", "mpi4py-idle", 0.001)] + [(f"RankExecutor, poll max {p * 1e3:g} ms", "rank-idle", p)
                                                          for p in polls]
    for label, case, poll in rows:
        print(f"{label:<34}{med(case, 'quiet_cpu', poll):>10.3f}s{med(case, 'rank0_cpu', poll):>10.3f}s{med(case, 'worker_cpu', poll):>10.3f}s"
              f"{med(case, 'round_trip', poll) * 1e6:>9.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
