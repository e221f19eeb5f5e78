"""``RankExecutor.hold_tasks`` on real ranks, for tests/test_walltime_stop.py:
``mpiexec -n 3 python hold.py DIR``.

Each worker has one slot and gets one call sent ahead; more calls wait on rank 0. The workers get a
burst of SIGUSR1 (Slurm's walltime warning, which srun passes to every rank), which they handle by doing
nothing, before rank 0 holds. After the hold, the running calls finish, nothing else starts, the
workers' stop hook is not called, and the executor still serves new calls. Rank 0 prints one line
``RESULT {json}``; DIR is where the calls meet (files).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from scenarios import WAIT, wait_for  # this script's directory is on sys.path

from cmbagent_batch.backends.mpi import RankExecutor, run_in_world, serve, world

RANK = -1
DIR = Path(".")


def blocker(tag: str) -> list[Any]:
    """Say it started (file ``started-TAG``, holding its pid), wait for file ``go``; return its tag and rank."""
    (DIR / f"started-{tag}").write_text(str(os.getpid()))
    wait_for((DIR / "go").exists)
    return [tag, RANK]


def mark(tag: str) -> str:
    (DIR / f"started-{tag}").touch()  # must never happen: held calls do not start
    return tag


def square(i: int) -> int:
    return i * i


def on_stop() -> None:
    (DIR / f"stopped-{RANK}").touch()


def scenario(ex: RankExecutor) -> dict[str, Any]:
    running = [ex.submit(blocker, f"run-{i}") for i in range(len(ex.workers))]
    def pids() -> list[str]:
        return [p.read_text() for p in DIR.glob("started-run-*")]

    wait_for(lambda: len(pids()) == len(running) and all(pids()))  # one on each worker
    ahead = [ex.submit(mark, f"ahead-{i}") for i in range(len(ex.workers))]
    wait_for(lambda: all(f.rank is not None for f in ahead))  # sent to the workers, waiting there
    queued = [ex.submit(mark, f"queued-{i}") for i in range(3)]  # no free slot: they wait on rank 0
    for _ in range(20):  # a handled signal once left a worker's loop asleep until a call ended
        for pid in pids():
            os.kill(int(pid), signal.SIGUSR1)
        time.sleep(0.001)
    ex.hold_tasks()
    # The running calls end only after this: a worker that does not hear the hold makes `late` non-zero.
    late = len(concurrent.futures.wait(ahead + queued, timeout=WAIT).not_done)
    (DIR / "go").touch()
    results = [f.result() for f in running]
    return {
        "late": late,
        "running": sorted(map(tuple, results)),
        "ahead": [type(f.exception()).__name__ if not f.cancelled() else "cancelled" for f in ahead],
        "ahead_messages": sorted(str(f.exception()) for f in ahead if not f.cancelled()),
        "queued": ["cancelled" if f.cancelled() else "not cancelled" for f in queued],
        "started": sorted(p.name for p in DIR.glob("started-*")),
        "stopped": sorted(p.name for p in DIR.glob("stopped-*")),
        "still_serving": ex.submit(square, 9).result(),
    }


def main(ex: RankExecutor) -> int:
    print("RESULT " + json.dumps(scenario(ex)), flush=True)
    return 0


if __name__ == "__main__":
    DIR = Path(sys.argv[1])
    comm, RANK, _ = world()
    if RANK == 0:
        sys.exit(run_in_world(main, 1))
    own = comm.Dup()  # as run_in_world does on rank 0
    serve(own, 1, on_stop=on_stop, on_signal={signal.SIGUSR1: lambda: None})  # as `cmbagent-batch run` does
    own.Free()
