"""What bench_run.py and bench_mpi.py share: the generated specs (shell tasks, no-op python tasks, the
layered DAG of ``sleep`` tasks), numbered fresh directories, one checked run of ``cmbagent-batch run``
with the local backend, reading a run's ``run.json`` and journals (the span from the first ``running``
to the last ``succeeded`` record), the DAG's lower bound and the level-barrier baseline.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import specgen
from ab import Install
from specgen import CommandFailed

from cmbagent_batch.rundir.runview import run_tasks

DAG_SEED = 1

NOOP_MODULE = "def run():\n    return None\n"


# ---------------------------------------------------------------------------------------------------
# Specs


def shell_spec(n: int) -> str:
    parts = ["version: 1\njob:\n  name: bench-shell\ntasks:\n"]
    for i in range(n):
        parts.append(f"  - id: t{i:06d}\n    kind: shell\n    run: echo {i} > out.txt\n    outputs: [out.txt]\n")
    return "".join(parts)


def python_spec(n: int) -> str:
    # use_process_pool: true is the older spelling of isolation: process (the default), which versions
    # from before isolation read too (--against). Under MPI those versions ran python tasks in threads.
    parts = ["version: 1\njob:\n  name: bench-python\nexecution:\n  use_process_pool: true\n  max_workers: 2\n"
             "tasks:\n"]
    for i in range(n):
        parts.append(f"  - id: p{i:06d}\n    kind: python\n    call: noop:run\n")
    return "".join(parts)


@dataclass(frozen=True)
class DagTask:
    id: str
    level: int
    ms: int  # sleep duration
    parents: tuple[str, ...]

    @property
    def command(self) -> str:
        return f"sleep {self.ms / 1000:.3f}"


def layered_dag(levels: int, width: int, seed: int) -> list[DagTask]:
    """``levels`` x ``width`` tasks; each below the first has two distinct parents in the level above."""
    rng = random.Random(seed)
    tasks: list[DagTask] = []
    for lv in range(levels):
        for j in range(width):
            ms = min(50, max(1, round(rng.paretovariate(1.0))))  # heavy tail: P(> x ms) = 1/x
            parents = tuple(f"L{lv - 1:02d}-{k:03d}" for k in sorted(rng.sample(range(width), 2))) if lv else ()
            tasks.append(DagTask(f"L{lv:02d}-{j:03d}", lv, ms, parents))
    return tasks


def dag_spec(tasks: list[DagTask]) -> str:
    parts = ["version: 1\njob:\n  name: bench-dag\ntasks:\n"]
    for t in tasks:
        deps = f"    depends_on: [{', '.join(t.parents)}]\n" if t.parents else ""
        parts.append(f"  - id: {t.id}\n    kind: shell\n    run: {t.command}\n{deps}")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# Running ours


class Fresh:
    """Numbered fresh directories under ``root`` (a run directory, a cache directory, a baseline's cwd);
    numbers are unique in the whole benchmark, since nothing is deleted before its end."""

    n = 0

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(self, name: str) -> str:
        Fresh.n += 1
        path = os.path.join(self.root, f"{name}-{Fresh.n}")
        os.makedirs(path)
        return path


def run_cmd(side: Install, spec: str, run_dir: str, cache_dir: str, workers: int | None) -> list[str]:
    flags = ["--workers", str(workers)] if workers else []
    return [*side.cli(), "run", spec, *flags, "--quiet", "--run-dir", run_dir, "--cache-dir", cache_dir]


def run_ours(side: Install, spec: str, fresh: Fresh, env: dict[str, str], n_tasks: int,
             workers: int | None = None) -> tuple[specgen.Run, str]:
    """One run of ``side``'s ``cmbagent-batch run`` in fresh directories; checks every task succeeded."""
    run_dir = os.path.join(fresh("run"), "rd")  # run --fresh is not needed: it does not exist yet
    cache_dir = fresh("cache")
    cmd = run_cmd(side, spec, run_dir, cache_dir, workers)
    run = specgen.run_once(cmd, cwd=os.path.dirname(spec), env=side.env(env))
    manifest = read_manifest(os.path.join(run_dir, "run.json"), cmd)
    counts = manifest.get("counts")
    if counts != {"succeeded": n_tasks}:
        raise CommandFailed(f"{' '.join(cmd)}\n  run.json counts {counts}, expected {{'succeeded': {n_tasks}}}")
    return run, run_dir


def read_manifest(path: str, cmd: list[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"{' '.join(cmd)}\n  exited 0 but {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise CommandFailed(f"{' '.join(cmd)}\n  {path} is not a JSON object")
    return data


def task_walls(run_dir: str) -> dict[str, float]:
    """Each task's wall time, as the run recorded it (``runview.run_tasks``: run.json lists no tasks)."""
    return {tid: float(t["wall_s"]) for tid, t in run_tasks(run_dir).items()}


def count_outputs(directory: str) -> int:
    d = os.path.join(directory, "d")
    return sum(1 for name in os.listdir(d) if os.path.isfile(os.path.join(d, name, "out.txt"))) \
        if os.path.isdir(d) else 0


# ---------------------------------------------------------------------------------------------------
# Reading a run, and the DAG's baselines


def journal_span(run_dir: str) -> tuple[float, float]:
    """(first ``running`` time, last ``succeeded`` time) over the run's journals."""
    first, last = float("inf"), float("-inf")
    directory = os.path.join(run_dir, "journal")
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".jsonl")):  # the journals, not their index
        with open(os.path.join(directory, name), encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("state") == "running":
                    first = min(first, rec["t"])
                elif rec.get("state") == "succeeded":
                    last = max(last, rec["t"])
    return first, last


def lower_bound(tasks: list[DagTask], walls: dict[str, float], workers: int) -> tuple[float, float]:
    """(critical path, total work / workers) with ``walls`` as task weights; tasks are in level order."""
    finish: dict[str, float] = {}
    for t in tasks:
        finish[t.id] = max((finish[p] for p in t.parents), default=0.0) + walls[t.id]
    return max(finish.values()), sum(walls[t.id] for t in tasks) / workers


def _cpu_so_far() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def level_barrier(tasks: list[DagTask], workers: int, cwd: str) -> tuple[float, float]:
    """(makespan, CPU seconds) of running ``tasks`` level by level on a thread pool, each level waiting
    for the one before; the CPU is this process's and its children's over the run."""
    bash = shutil.which("bash") or "bash"
    levels: dict[int, list[DagTask]] = {}
    for t in tasks:
        levels.setdefault(t.level, []).append(t)

    def one(t: DagTask) -> int:
        return subprocess.run([bash, "-c", t.command], cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode

    with ThreadPoolExecutor(workers) as pool:
        cpu0 = _cpu_so_far()
        t0 = time.perf_counter()
        for lv in sorted(levels):
            codes = list(pool.map(one, levels[lv]))
            if any(codes):
                raise CommandFailed(f"level-barrier baseline: a 'bash -c sleep' of level {lv} exited {max(codes)}")
        return time.perf_counter() - t0, _cpu_so_far() - cpu0
