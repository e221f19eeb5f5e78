"""How bench_mpi.py runs MPI jobs: the spec's ``execution:`` block for the MPI backend, the ``mpiexec`` of
an install and the commands under it (killed past a time limit), one checked run of ours on N worker ranks
and what its run directory says (the span, the walls, each result's way back to rank 0, the tasks and busy
time per worker rank, rank 0's own CPU time); a py-spy profile of rank 0 and its top lines; and the helpers
around the figures: the ``mpi4py.futures`` baseline script, the filesystem probe, the kernel's autogroup
setting and the MPI packages' versions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import specgen
from ab import Install
from runs import DagTask, Fresh, journal_span, read_manifest
from specgen import CommandFailed

from cmbagent_batch.rundir.runview import run_tasks

# ---------------------------------------------------------------------------------------------------
# Specs


def with_execution(spec: str, **settings: object) -> str:
    """A generator's spec text with its ``execution:`` block (if any) replaced by ``settings``."""
    head, sep, tasks = spec.partition("\ntasks:\n")
    if not sep:
        raise ValueError("the spec has no top-level 'tasks:' line")
    kept: list[str] = []
    in_execution = False
    for line in head.split("\n"):
        if line == "execution:":
            in_execution = True
            continue
        if in_execution and line.startswith("  "):
            continue
        in_execution = False
        kept.append(line)
    block = ["execution:", *(f"  {key}: {json.dumps(value)}" for key, value in settings.items())]
    return "\n".join(kept + block) + sep + tasks


def mpi_spec(spec: str, tasks_per_rank: int) -> str:
    return with_execution(spec, backend="mpi", tasks_per_rank=tasks_per_rank)


def sleep_tasks(n: int, ms: int) -> list[DagTask]:
    """``n`` independent ``sleep`` tasks (a one-level DAG with no edges, for ``dag_spec``)."""
    return [DagTask(f"s{i:04d}", 0, ms, ()) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Running under mpiexec


def find_mpiexec(side: Install) -> str | None:
    """The ``mpiexec`` next to ``side``'s python; for this interpreter, else the first on PATH."""
    return side.tool("mpiexec") or (shutil.which("mpiexec") if side.own else None)


@dataclass(frozen=True)
class Mpi:
    """How the benchmark starts MPI jobs with one install of cmbagent-batch."""

    mpiexec: str
    env: dict[str, str]
    time_limit: float
    side: Install

    def cmd(self, ranks: int, *args: str) -> list[str]:
        """``mpiexec -n ranks ARGS``, under coreutils ``timeout`` (when there is one) so that a hung job is
        ended: ``mpiexec`` (Hydra) gets SIGTERM and ends its ranks. ``--foreground`` keeps the job in the
        terminal's process group, so that Ctrl-C still reaches every rank."""
        limit = shutil.which("timeout")
        guard = [limit, "--foreground", "-k", "10", f"{self.time_limit:g}"] if limit else []
        return [*guard, self.mpiexec, "-n", str(ranks), *args]

    def run_once(self, cmd: list[str], cwd: str, stdout_path: str | None = None) -> specgen.Run:
        try:
            return specgen.run_once(cmd, cwd=cwd, env=self.env, stdout_path=stdout_path)
        except CommandFailed as exc:
            if "\n  exited 124," in str(exc) or "\n  exited 137," in str(exc):
                raise CommandFailed(f"{exc}\n  (killed: still running after {self.time_limit:g} s)") from None
            raise


@dataclass(frozen=True)
class Rank0Cpu:
    """Rank 0's own CPU seconds (user + system) over a run, and the tasks it ran, as rank 0 read them."""

    cpu_s: float
    tasks: int
    source: str  # "run.json" (its ``runner``) or "wrapper" (``RANK0_WRAPPER``, for versions without it)

    @property
    def us_per_task(self) -> float:
        return self.cpu_s / max(self.tasks, 1) * 1e6


@dataclass
class OurRun:
    run: specgen.Run
    run_dir: str
    manifest: dict[str, Any]
    rank0: Rank0Cpu | None = None

    @functools.cached_property
    def span(self) -> float:
        """Makespan: first ``running`` to last ``succeeded`` record over all ranks' journals."""
        first, last = journal_span(self.run_dir)
        return last - first

    @functools.cached_property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Each task's detail (``runview.run_tasks``: run.json lists no tasks)."""
        return run_tasks(self.run_dir)

    def walls(self) -> dict[str, float]:
        return {tid: float(t["wall_s"]) for tid, t in self.tasks.items()}

    def returns(self) -> list[float]:
        """Per task: its worker's ``succeeded`` record to rank 0's (the result's way back, and rank 0
        noticing it)."""
        worker: dict[str, float] = {}
        rank0: dict[str, float] = {}
        directory = os.path.join(self.run_dir, "journal")
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".jsonl")):  # not their index
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    if rec.get("state") == "succeeded":
                        (worker if rec.get("by") == "worker" else rank0)[rec["task"]] = rec["t"]
        return [rank0[tid] - t for tid, t in worker.items() if tid in rank0]

    def per_rank(self) -> tuple[Counter[int], defaultdict[int, float]]:
        """(tasks, busy seconds) per worker rank."""
        tasks: Counter[int] = Counter()
        busy: defaultdict[int, float] = defaultdict(float)
        for t in self.tasks.values():
            tasks[t["rank"]] += 1
            busy[t["rank"]] += float(t["wall_s"])
        return tasks, busy


def run_ours(mpi: Mpi, spec: str, fresh: Fresh, worker_ranks: int, n_tasks: int, *,
             rank0_cpu: bool = False) -> OurRun:
    """One ``run`` of ``spec`` on ``worker_ranks`` worker ranks in fresh directories; checks that every
    task succeeded on a worker rank and that the run really used the MPI backend. With ``rank0_cpu``,
    the ranks start through ``RANK0_WRAPPER`` and the run's ``rank0`` says rank 0's CPU time."""
    run_dir = os.path.join(fresh("run"), "rd")
    cache_dir = fresh("cache")
    ranks = worker_ranks + 1
    cpu_file = os.path.join(os.path.dirname(run_dir), "rank0-cpu.json")
    cli = rank0_cli(mpi.side, cpu_file) if rank0_cpu else mpi.side.cli()
    cmd = mpi.cmd(ranks, *cli, "run", spec, "--quiet", "--run-dir", run_dir, "--cache-dir", cache_dir)
    run = mpi.run_once(cmd, cwd=os.path.dirname(spec))
    manifest = check_mpi_run(cmd, run_dir, ranks, n_tasks)
    return OurRun(run, run_dir, manifest, read_rank0_cpu(manifest, cpu_file, cmd) if rank0_cpu else None)


def check_mpi_run(cmd: list[str], run_dir: str, ranks: int, n_tasks: int) -> dict[str, Any]:
    """``run.json`` of a run that must have run ``n_tasks`` tasks, all succeeded on worker ranks of ``ranks``."""
    manifest = read_manifest(os.path.join(run_dir, "run.json"), cmd)
    problems = []
    if manifest.get("counts") != {"succeeded": n_tasks}:
        problems.append(f"counts {manifest.get('counts')}, expected {{'succeeded': {n_tasks}}}")
    if manifest.get("backend") != "mpi" or manifest.get("ranks") != ranks:
        problems.append(f"backend {manifest.get('backend')!r} with {manifest.get('ranks')} ranks, "
                        f"expected 'mpi' with {ranks}")
    on_rank0 = sorted(tid for tid, t in run_tasks(run_dir).items() if not t.get("rank"))
    if on_rank0:
        problems.append(f"{len(on_rank0)} tasks ran on rank 0 (e.g. {on_rank0[0]}), not on a worker rank")
    if problems:
        raise CommandFailed(f"{' '.join(cmd)}\n  " + "\n  ".join(problems))
    return manifest


def rank_cells(runs: list[OurRun], worker_ranks: int, slots_per_rank: int = 1) -> tuple[str, str]:
    """Tasks per worker rank (summed over the runs) and each rank's busy fraction of its slots over the
    makespan (median over the runs)."""
    tasks: Counter[int] = Counter()
    busy: dict[int, list[float]] = {r: [] for r in range(1, worker_ranks + 1)}
    for one in runs:
        counted, seconds = one.per_rank()
        tasks.update(counted)
        for rank, fractions in busy.items():
            fractions.append(seconds[rank] / (one.span * slots_per_rank))
    per = len(runs)
    count = " | ".join(f"r{r}: {tasks[r] / per:,.0f}" for r in sorted(busy))
    use = " | ".join(f"r{r}: {statistics.median(v):.0%}" for r, v in sorted(busy.items()))
    return count, use


# ---------------------------------------------------------------------------------------------------
# Rank 0's own CPU time, and its profile

# Every rank starts through this instead of ``python -m cmbagent_batch``; on rank 0 it writes the pid to
# argv[2] (when given) as the run starts, and getrusage(RUSAGE_SELF) of the process to argv[1] as it ends:
# rank 0's CPU for versions whose run.json has no ``runner`` (it includes the last lines of the command,
# after run.json is written). Under ``-c``, worker processes started by spawn do not run it again.
RANK0_WRAPPER = r"""
import json, os, resource, sys
out, pid_file = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
ranks = [os.environ[k] for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK") if k in os.environ]
rank0 = ranks[:1] == ["0"]
if rank0 and pid_file:
    with open(pid_file + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
from cmbagent_batch.cli.main import main
try:
    code = main()
finally:
    if rank0:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open(out, "w") as fh:
            json.dump({"cpu_s": ru.ru_utime + ru.ru_stime}, fh)
raise SystemExit(code)
"""


def rank0_cli(side: Install, cpu_file: str, pid_file: str = "") -> list[str]:
    """``side``'s command line, started through ``RANK0_WRAPPER``."""
    return [side.python, "-c", RANK0_WRAPPER, cpu_file, pid_file]


def read_rank0_cpu(manifest: dict[str, Any], cpu_file: str, cmd: list[str]) -> Rank0Cpu:
    """Rank 0's CPU time: run.json's ``runner`` (``cpu_s``, ``tasks_run``) when the version writes it, else
    what ``RANK0_WRAPPER`` wrote."""
    runner = manifest.get("runner")
    if isinstance(runner, dict) and isinstance(runner.get("cpu_s"), (int, float)):
        tasks = runner.get("tasks_run")
        return Rank0Cpu(float(runner["cpu_s"]), int(tasks) if isinstance(tasks, int) else
                        sum(manifest.get("counts", {}).values()), "run.json")
    try:
        with open(cpu_file, encoding="utf-8") as fh:
            cpu = float(json.load(fh)["cpu_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandFailed(f"{' '.join(cmd)}\n  run.json has no 'runner' and rank 0 left no CPU time in "
                            f"{cpu_file}: {exc}") from None
    return Rank0Cpu(cpu, sum(manifest.get("counts", {}).values()), "wrapper")


def find_py_spy(side: Install) -> str | None:
    return side.tool("py-spy") or shutil.which("py-spy")


def profile_rank0(mpi: Mpi, py_spy: str, spec: str, fresh: Fresh, worker_ranks: int, n_tasks: int,
                  raw: str) -> float:
    """One checked run of ``spec`` with py-spy sampling rank 0 (the thread holding the GIL, 250 Hz, without
    pausing it) into ``raw`` (collapsed stacks); returns rank 0's CPU seconds. py-spy needs ptrace rights
    (root, or kernel.yama.ptrace_scope 0)."""
    run_dir = os.path.join(fresh("run"), "rd")
    cache_dir = fresh("cache")
    cpu_file = os.path.join(os.path.dirname(run_dir), "rank0-cpu.json")
    pid_file = os.path.join(os.path.dirname(run_dir), "rank0.pid")
    cmd = mpi.cmd(worker_ranks + 1, *rank0_cli(mpi.side, cpu_file, pid_file), "run", spec, "--quiet",
                  "--run-dir", run_dir, "--cache-dir", cache_dir)
    with open(os.devnull, "wb") as null:
        job = subprocess.Popen(cmd, cwd=os.path.dirname(spec), env=mpi.env, stdout=null, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
        spy = None
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(pid_file) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if os.path.exists(pid_file):
                with open(pid_file, encoding="ascii") as fh:
                    pid = fh.read().strip()
                spy = subprocess.Popen([py_spy, "record", "--rate", "250", "--gil", "--nonblocking", "--format",
                                        "raw", "--output", raw, "--pid", pid], stdout=null, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
            _, err = job.communicate(timeout=mpi.time_limit)
        except subprocess.TimeoutExpired:
            job.kill()
            raise CommandFailed(f"{' '.join(cmd)}\n  (killed: still running after {mpi.time_limit:g} s)") from None
        finally:
            spy_err = spy.communicate(timeout=60)[1] if spy is not None else b"rank 0 never wrote its pid"
    if job.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)}\n  exited {job.returncode}: {err.decode(errors='replace')[-2000:]}")
    if not os.path.exists(raw):
        raise CommandFailed(f"{py_spy} record --pid (rank 0) wrote no profile: {spy_err.decode(errors='replace')[-500:]}")
    return read_rank0_cpu(check_mpi_run(cmd, run_dir, worker_ranks + 1, n_tasks), cpu_file, cmd).cpu_s


_PACKAGE_FRAME = re.compile(r"^(?P<fn>[^ ]+) \(.*?(?P<file>cmbagent_batch/[\w/]+\.py)(:\d+)?\)$")


def profile_top(raw: str, n: int) -> tuple[int, list[tuple[float, str]], list[tuple[float, str]]]:
    """A py-spy raw profile's samples, and its top ``n`` by package function and by module: each sample
    counted once, for the innermost frame of cmbagent_batch on its stack (the library code that frame
    called is charged to it), else as ``(outside the package)``."""
    by_fn: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    total = 0
    with open(raw, encoding="utf-8") as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            samples = int(count)
            total += samples
            fn, module = "(outside the package)", "(outside the package)"
            for frame in reversed(stack.split(";")[1:]):
                m = _PACKAGE_FRAME.match(frame)
                if m and not m["file"].startswith("cmbagent_batch/cli/main.py"):
                    fn, module = f"{m['fn']} ({m['file']})", m["file"]
                    break
            by_fn[fn] += samples
            by_module[module] += samples
    share = max(total, 1)
    return (total, [(k / share, fn) for fn, k in by_fn.most_common(n)],
            [(k / share, mod) for mod, k in by_module.most_common(n)])


# ---------------------------------------------------------------------------------------------------
# The baseline, and probes of the machine

FUTURES_BASELINE = """
import json, sys, time
from concurrent.futures import wait
from mpi4py import MPI
from mpi4py.futures import MPICommExecutor
n, here = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, here)
import noop
with MPICommExecutor(MPI.COMM_WORLD, root=0) as pool:
    if pool is not None:
        t0 = time.perf_counter()
        futures = [pool.submit(noop.run) for _ in range(n)]
        wait(futures)
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
        print(json.dumps({"wall": wall, "workers": MPI.COMM_WORLD.Get_size() - 1,
                          "library": " ".join(MPI.Get_library_version().split("\\n")[0].split())}))
"""


def autogroup_note(ranks: int) -> str | None:
    """What the kernel's autogroup setting means for the DAG figure (run by ``ranks`` ranks), when the
    kernel says."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="ascii") as fh:
            enabled = fh.read().strip() == "1"
    except OSError:
        return None
    if not enabled:
        return "kernel.sched_autogroup_enabled=0: every thread and process competes for the cores alone"
    return ("kernel.sched_autogroup_enabled=1: the kernel shares the cores between sessions before threads. "
            "Each shell task runs in a session of its own (so that it can be ended as a group) and the "
            f"{ranks} ranks share the one mpiexec started them in, so their threads compete as one session against every "
            "task that is starting up; rank 0's scheduler thread waited for a core about 3x as long as it ran "
            "(its schedstat, seen with this DAG)")


def fs_probe(root: str, n: int) -> float:
    """CPU seconds this process spends making ``n`` work-directory skeletons under ``root`` (kept: deleting
    them would slow the next allocations down)."""
    start = time.process_time()
    for i in range(n):
        logs = os.path.join(root, "tasks", f"T{i:05d}", "logs")
        os.makedirs(logs)
        for name in ("stdout.log", "stderr.log"):
            with open(os.path.join(logs, name), "wb"):
                pass
    return time.process_time() - start


def versions() -> str:
    found = []
    for dist in ("mpich", "mpi4py"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist}: no such distribution installed")
    return ", ".join(found)
