"""Scenarios for tests/test_mpi_executor.py, run by every rank as ``mpiexec -n N python scenarios.py NAME DIR``.

Rank 0 prints one line ``RESULT {json}``; DIR is a scratch directory the calls use to meet (files).
Calls are module-level functions of this script, so every rank finds them in its own ``__main__``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmbagent_batch.backends.mpi import (
    NoWorkerRanks,
    RankExecutor,
    RemoteTaskError,
    run_in_world,
    world,
)

RANK = -1  # this process's rank, set before serving
DIR = Path(".")
STOPPED = threading.Event()
WAIT = 30.0  # seconds a call waits for a file before it gives up (a broken test, not a slow one)


def wait_for(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long")
        time.sleep(0.005)


def whoami(i: int) -> list[int]:
    return [i, RANK]


def host() -> str:
    from mpi4py import MPI

    return str(MPI.Get_processor_name())


def hold(name: str, tag: str) -> list[Any]:
    """Say it started (file ``started-TAG``), wait for file NAME; return where it ran (rank, host), when."""
    start = time.monotonic_ns()
    (DIR / f"started-{tag}").touch()
    wait_for((DIR / name).exists)
    return [tag, RANK, start, host()]


def square(i: int) -> int:
    return i * i


def stamp(i: int) -> list[int]:
    return [i, RANK, time.monotonic_ns()]


def meet(i: int, count: int) -> list[int]:
    """Start, then wait until ``count`` calls of this rank have started: they run at once."""
    start = time.monotonic_ns()
    (DIR / f"meet-{RANK}-{i}").touch()
    wait_for(lambda: len(list(DIR.glob(f"meet-{RANK}-*"))) >= count)
    return [i, RANK, start, time.monotonic_ns()]


def fail_on(rank: int) -> int:
    time.sleep(0.2)  # overlaps the call sent just before, so that the two land on ranks 1 and 2
    if rank == RANK:
        raise ValueError(f"bad input on rank {RANK}")
    return RANK


class NeedsTwo(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")  # unpickling calls NeedsTwo("1 and 2"): fails on rank 0


def raise_needs_two() -> None:
    raise NeedsTwo(1, 2)


def give_lock() -> Any:
    return threading.Lock()


class OnlyOnWorkers:
    pass


def give_only_on_workers() -> Any:
    return OnlyOnWorkers()


def until_stopped(i: int) -> list[Any]:
    (DIR / f"started-{i}").touch()
    return ["stopped" if STOPPED.wait(WAIT) else "not stopped", RANK]


def on_stop() -> None:
    STOPPED.set()
    (DIR / f"stopped-{RANK}").touch()


def sleep_cpu(seconds: float) -> float:
    """Sleep, and return the CPU time this whole worker process used meanwhile."""
    c0 = time.process_time()
    time.sleep(seconds)
    return time.process_time() - c0


# Scenarios: rank 0's side, returning what to print.

def placement(ex: RankExecutor) -> Any:
    n = len(ex.workers)
    futures = [ex.submit(hold, "go", str(i)) for i in range(n)]
    wait_for(lambda: len(list(DIR.glob("started-*"))) == n)  # each holds a slot: the next land elsewhere
    (DIR / "go").touch()
    out = [f.result() for f in futures]
    return {"workers": ex.workers, "slots": ex.slots, "future_ranks": [f.rank for f in futures],
            "call_ranks": [o[1] for o in out], "whoami": [f.result() for f in [ex.submit(whoami, 7)]]}


def many(ex: RankExecutor) -> Any:
    futures = [ex.submit(square, i) for i in range(3000)]
    results = [f.result() for f in futures]
    # FIFO: rank 1 is held by a call. One queued call is sent ahead to it and waits there; all the others
    # go to rank 2, one after the other.
    blocker = ex.submit(hold, "go", "blocker")
    wait_for((DIR / "started-blocker").exists)
    queued = [ex.submit(stamp, i) for i in range(20)]
    wait_for(lambda: sum(f.done() for f in queued) == 19)
    behind = [i for i, f in enumerate(queued) if not f.done()]
    (DIR / "go").touch()
    stamps = [f.result() for f in queued]
    stamps = [s for i, s in enumerate(stamps) if i not in behind]
    return {"ok": results == [i * i for i in range(3000)],
            "ranks": sorted({f.rank for f in futures}), "map": list(ex.map(square, range(5))),
            "blocker_rank": blocker.result()[1], "queued_ranks": sorted({s[1] for s in stamps}),
            "start_order": [s[0] for s in sorted(stamps, key=lambda s: s[2])], "behind_blocker": behind}


def overlap(ex: RankExecutor) -> Any:
    futures = [ex.submit(meet, i, 3) for i in range(6)]
    return {"calls": [f.result() for f in futures]}


def failure(ex: RankExecutor) -> Any:
    pinned = [ex.submit(hold, "go", str(r)) for r in ex.workers]  # one per rank: their host names
    (DIR / "go").touch()
    hosts = {str(h[1]): h[3] for h in (f.result() for f in pinned)}
    futures = [ex.submit(fail_on, 2) for _ in ex.workers]  # first to rank 1, then rank 2 (rank 1 is busy)
    out: dict[str, Any] = {"hosts": hosts, "ok": [], "future_ranks": [f.rank for f in futures]}
    for f in futures:
        try:
            out["ok"].append(f.result())
        except RemoteTaskError as err:
            out["error"] = {"type_name": err.type_name, "message": err.message, "traceback": err.traceback,
                            "rank": err.rank, "host": err.host, "str": str(err), "future_rank": f.rank,
                            "future_host": f.host, "cause": type(err.__cause__).__name__,
                            "format_exc": "".join(traceback.format_exception(err)),
                            "pickles": str(pickle.loads(pickle.dumps(err)))}
    two = ex.submit(raise_needs_two).exception()
    assert isinstance(two, RemoteTaskError)
    out["needs_two"] = {"type_name": two.type_name, "message": two.message, "traceback": two.traceback,
                        "cause": type(two.__cause__).__name__, "cause_str": str(two.__cause__)}
    return out


def unpicklable(ex: RankExecutor) -> Any:
    bad = ex.submit(give_lock)
    err = bad.exception()
    assert isinstance(err, RemoteTaskError)
    after = [ex.submit(whoami, i) for i in range(20)]
    strange = ex.submit(give_only_on_workers).exception()
    assert isinstance(strange, RemoteTaskError)
    local = ex.submit(lambda: 1).exception()
    return {"error": str(err), "type_name": err.type_name, "rank": err.rank, "bad_rank": bad.rank,
            "after": [f.result()[1] for f in after], "after_ranks": sorted({f.rank for f in after}),
            "strange": str(strange), "local": f"{type(local).__name__}: {local}"}


def stop(ex: RankExecutor) -> Any:
    futures = [ex.submit(until_stopped, i) for i in range(ex.slots)]
    wait_for(lambda: len(list(DIR.glob("started-*"))) == ex.slots)
    queued = [ex.submit(square, i) for i in range(3)]  # no free slot: they wait on rank 0
    ex.stop_tasks()
    results = [f.result() for f in futures]
    concurrent.futures.wait(queued)
    return {"results": results, "stopped_files": sorted(p.name for p in DIR.glob("stopped-*")),
            "queued_cancelled": sum(f.cancelled() for f in queued), "still_serving": ex.submit(square, 9).result()}


def cancel(ex: RankExecutor) -> Any:
    blockers = [ex.submit(hold, "go", str(i)) for i in range(len(ex.workers))]
    wait_for(lambda: len(list(DIR.glob("started-*"))) == len(blockers))
    queued = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    try:
        ex.submit(square, 1)
        refused = "no"
    except RuntimeError as exc:
        refused = str(exc)
    (DIR / "go").touch()
    ex.shutdown(wait=True)
    return {"queued_cancelled": [f.cancelled() for f in queued], "blockers": [b.result()[1] for b in blockers],
            "refused": refused}


def idle_cpu(ex: RankExecutor) -> Any:
    ex.submit(square, 1).result()
    c0 = time.process_time()
    f = ex.submit(sleep_cpu, 1.0)
    worker_cpu = f.result()
    return {"rank0_cpu": time.process_time() - c0, "worker_cpu": worker_cpu}


def main_raises(ex: RankExecutor) -> Any:
    for i in range(ex.slots):
        ex.submit(until_stopped, i)
    wait_for(lambda: len(list(DIR.glob("started-*"))) == ex.slots)
    raise RuntimeError("planned failure of rank 0's main")


def interrupt(ex: RankExecutor) -> Any:
    futures = [ex.submit(until_stopped, i) for i in range(ex.slots)]
    wait_for(lambda: len(list(DIR.glob("started-*"))) == ex.slots)
    print("READY", flush=True)  # the test sends SIGINT to mpiexec, which passes it to every rank
    return [f.result() for f in futures]


def rank0_killed(ex: RankExecutor) -> Any:
    ex.submit(until_stopped, 0)
    wait_for((DIR / "started-0").exists)
    os.kill(os.getpid(), signal.SIGKILL)


def queued_behind_one_slot(ex: RankExecutor) -> Any:
    """One worker, one slot, calls that take a while: each result must send the next queued call
    (a queued call left behind when the last one in flight came back once hung the executor)."""
    futures = [ex.submit(time.sleep, 0.02) for _ in range(30)]
    return sum(1 for f in futures if f.result(timeout=60) is None)


def priority_order(ex: RankExecutor) -> Any:
    """One worker, one slot, one call sent ahead: the calls queued on rank 0 go out the most urgent first
    (submission order among equals), whatever order they were submitted in."""
    first = ex.submit(hold, "go", "first")
    wait_for((DIR / "started-first").exists)
    ahead = ex.submit(stamp, 0)
    wait_for(lambda: ahead.rank is not None)
    queued = [ex.submit_with_priority(p, stamp, p) for p in (1, 3, 2)] + [ex.submit(stamp, 10), ex.submit(stamp, 11)]
    (DIR / "go").touch()
    first.result(timeout=60)
    done = [f.result(timeout=60) for f in [ahead, *queued]]
    return [i for i, _, _ in sorted(done, key=lambda r: r[2])]


def paced(ex: RankExecutor) -> Any:
    """Two workers with one slot, 2 to 9 calls each (up to 8 waiting), covering 0.5 s of work: until the
    pace is known one call waits behind a long one on each rank; after many short calls, 8 do."""
    long = [ex.submit(hold, "go", f"long-{i}") for i in range(6)]
    wait_for(lambda: (DIR / "started-long-0").exists() and (DIR / "started-long-1").exists())
    time.sleep(0.2)  # had they been sent ahead, they would be on a rank by now
    long_sent = sum(f.rank is not None for f in long)
    (DIR / "go").touch()
    for f in long:
        f.result(timeout=60)
    for f in [ex.submit(time.sleep, 0.001) for _ in range(200)]:
        f.result(timeout=60)
    held = [ex.submit(hold, "go-2", f"held-{i}") for i in range(2)]  # one on each rank
    wait_for(lambda: (DIR / "started-held-0").exists() and (DIR / "started-held-1").exists())
    behind = [ex.submit(time.sleep, 0) for _ in range(20)]
    wait_for(lambda: sum(f.rank is not None for f in behind) >= 16)
    time.sleep(0.2)  # and no more go
    short_sent = sum(f.rank is not None for f in behind)
    (DIR / "go-2").touch()
    for f in held + behind:
        f.result(timeout=60)
    return {"long_sent": long_sent, "short_sent": short_sent}


def full(ex: RankExecutor) -> Any:
    """One worker, one slot and one call waiting behind it: full (``full=2``) once the pace is known, so
    rank 0's thread polls at its relaxed interval and calls submitted meanwhile do not wake it. They
    still go out the most urgent first once the worker has room, and every call comes back."""
    warm = [ex.submit(time.sleep, 0.03) for _ in range(20)]  # the pace: an end every 30 ms
    for f in warm:
        f.result(timeout=60)
    held = [ex.submit(hold, "go", f"held-{i}") for i in range(2)]  # one runs, one waits behind it
    wait_for(lambda: (DIR / "started-held-0").exists() and held[1].rank is not None)
    queued = [ex.submit_with_priority(p, stamp, p) for p in (1, 3, 2)] + [ex.submit(stamp, 10), ex.submit(stamp, 11)]
    time.sleep(0.1)  # several of the thread's relaxed polls: none sends a queued call, there is no room
    sent_early = [f.rank is not None for f in queued]
    (DIR / "go").touch()
    done = [f.result(timeout=60) for f in queued]
    return {"sent_early": sent_early, "held": [f.result(timeout=60)[0] for f in held],
            "order": [i for i, _, _ in sorted(done, key=lambda r: r[2])]}


def routed(ex: RankExecutor) -> Any:
    """Node ``a`` is rank 1, node ``b`` rank 2, one slot each and nothing sent ahead: while ``a``'s worker
    is busy, a call bound to ``a`` waits on rank 0, and those bound to ``b`` go on past it."""
    hellos = ex.hellos(60)
    ex.route({"a": [1], "b": [2]})
    blocker = ex.submit_call(hold, ("go", "a0"), node="a")
    wait_for((DIR / "started-a0").exists)
    behind = ex.submit_call(stamp, (1,), node="a", priority=5.0)  # more urgent than those of b: still waits
    others = [ex.submit_call(whoami, (i,), node="b") for i in range(5)]
    other_ranks = sorted({f.result(timeout=60)[1] for f in others})
    sent_early = behind.rank is not None
    (DIR / "go").touch()
    try:
        ex.submit_call(square, (1,), node="c")
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {"hellos": {str(r): list(h) for r, h in sorted(hellos.items())}, "blocker": blocker.result()[1],
            "behind": behind.result(timeout=60)[1], "sent_early": sent_early, "others": other_ranks, "error": error}


SCENARIOS: dict[str, Callable[[RankExecutor], Any]] = {
    f.__name__: f for f in (placement, many, overlap, failure, unpicklable, stop, cancel, idle_cpu, main_raises,
                            interrupt, rank0_killed, queued_behind_one_slot, priority_order, paced, full, routed)
}
SLOTS = {"overlap": 3, "stop": 2}
OPTIONS: dict[str, dict[str, Any]] = {"paced": {"ahead": 8, "least": 2, "cover": 0.5}, "routed": {"ahead": 0},
                                      "full": {"ahead": 1, "least": 2, "cover": 0.5, "full": 2}}


def run(name: str) -> int:
    def main(ex: RankExecutor) -> int:
        print("RESULT " + json.dumps(SCENARIOS[name](ex)), flush=True)
        return 0

    try:
        return run_in_world(main, SLOTS.get(name, 1), on_stop=on_stop, **OPTIONS.get(name, {}))
    except KeyboardInterrupt:  # rank 0 only: the workers ignore SIGINT while serving
        stopped = sorted(p.name for p in DIR.glob("stopped-*"))
        print("RESULT " + json.dumps({"interrupted": True, "stopped": stopped}), flush=True)
        return 130


if __name__ == "__main__":
    DIR = Path(sys.argv[2])
    if sys.argv[1] == "single":  # started without mpiexec: one rank
        try:
            run_in_world(lambda ex: 0, 1)
        except NoWorkerRanks as exc:
            print("RESULT " + json.dumps({"error": str(exc)}), flush=True)
        sys.exit(0)
    _, RANK, _ = world()
    if RANK == 0:
        del OnlyOnWorkers  # so a worker's OnlyOnWorkers() cannot be unpickled here
    sys.exit(run(sys.argv[1]))
