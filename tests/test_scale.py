"""Every command's work grows linearly with a job's tasks: 10x the tasks costs at most 15x the steps of
the command (above those of the same command on a 1-task job).

Steps are counted in the command's own process: the real CLI runs in a subprocess whose interpreter
traces it (``sys.settrace`` in every thread) and writes the total when the command ends. A step is a
Python function call (anyone's: the standard library's too), or a line run of cmbagent-batch's own code,
so that a loop with no call in it (a linear search by id) counts its iterations. Counts, not times: a
busy machine changes them little.
Python jobs are 10^3 and 10^4 no-op tasks in a process pool; shell jobs, whose tasks each start a
process, 200 and 2,000 tasks (the same factor of 10).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env

GROWTH_LIMIT = 15.0  # steps at 10x the tasks, at most this many times the steps at 1x
PYTHON_SIZES = (1, 1_000, 10_000)  # the first is the start-up that is subtracted
SHELL_SIZES = (1, 200, 2_000)

COUNTING = r"""
import os, runpy, sys, threading
out = sys.argv[1]
sys.argv = ["cmbagent-batch", *sys.argv[2:]]
import cmbagent_batch
ours = os.path.dirname(cmbagent_batch.__file__) + os.sep
steps = 0
me = os.getpid()


def line(frame, event, arg):
    global steps
    steps += 1
    return line


def call(frame, event, arg):
    global steps
    steps += 1
    return line if frame.f_code.co_filename.startswith(ours) else None


threading.settrace(call)
sys.settrace(call)
code = 0
try:
    runpy.run_module("cmbagent_batch", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
finally:
    sys.settrace(None)
    threading.settrace(None)
    if os.getpid() == me:  # not in a process forked from the command
        with open(out, "w") as fh:
            fh.write(str(steps))
sys.exit(code)
"""


@dataclass(frozen=True)
class Job:
    """A generated job of ``n`` tasks ``t-A-B`` and the run directory of its first run."""

    n: int
    spec: Path
    run_dir: Path
    cache: Path


class Steps:
    """Runs the CLI with its steps counted."""

    _ids = itertools.count()

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = clean_env(root)

    def __call__(self, *args: str | Path) -> int:
        out = self.root / f"steps-{next(self._ids)}.txt"
        r = subprocess.run([sys.executable, "-c", COUNTING, str(out), *map(str, args)], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        return int(out.read_text())

    def fresh(self, name: str) -> Path:
        return self.root / f"{name}-{next(self._ids)}"


def job_text(kind: str, n: int) -> str:
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    head, body = {"python": ("  use_process_pool: true\n", "    kind: python\n    call: noop:run\n"),
                  "shell": ("", "    kind: shell\n    run: echo {a}{b} > out.txt\n    outputs: [out.txt]\n")}[kind]
    return (f"version: 1\njob:\n  name: growth\nexecution:\n{head}  max_workers: 2\ntasks:\n"
            f"  - id: t-{{a}}-{{b}}\n{body}    matrix:\n"
            f"      a: [{', '.join(map(str, range(a)))}]\n      b: [{', '.join(map(str, range(n // a)))}]\n")


@dataclass(frozen=True)
class Jobs:
    """Jobs of each size and the counter; ``first_runs``: the steps of each job's first run, if made."""

    steps: Steps
    jobs: tuple[Job, ...]
    first_runs: tuple[int, ...] = ()


def write_jobs(root: Path, kind: str, sizes: tuple[int, ...]) -> Jobs:
    root.mkdir()
    (root / "noop.py").write_text("def run(**kw):\n    return None\n")
    jobs = []
    for n in sizes:
        spec = root / f"{kind}-{n}.yaml"
        spec.write_text(job_text(kind, n))
        jobs.append(Job(n, spec, root / f"run-{n}", root / f"cache-{n}"))
    return Jobs(Steps(root), tuple(jobs))


def run_jobs(jobs: Jobs) -> Jobs:
    """``jobs`` after a first run of each, its steps counted."""
    first = tuple(jobs.steps(*rerun(j)) for j in jobs.jobs)
    return Jobs(jobs.steps, jobs.jobs, first)


@pytest.fixture(scope="module")
def python_specs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return write_jobs(tmp_path_factory.mktemp("growth") / "specs", "python", PYTHON_SIZES)


@pytest.fixture(scope="module")
def python_jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return run_jobs(write_jobs(tmp_path_factory.mktemp("growth") / "python", "python", PYTHON_SIZES))


@pytest.fixture(scope="module")
def shell_jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return run_jobs(write_jobs(tmp_path_factory.mktemp("growth") / "shell", "shell", SHELL_SIZES))


def assert_linear(what: str, counts: tuple[int, ...] | list[int], sizes: tuple[int, ...]) -> None:
    """``counts`` at ``sizes`` (start-up, n, 10n): the steps above start-up grow at most GROWTH_LIMIT
    times. A command whose steps barely move with the tasks (under 1% of its start-up) passes."""
    start, small, big = counts
    growth = (big - start) / max(small - start, start // 100, 1)
    assert growth <= GROWTH_LIMIT, (
        f"{what}: {small - start:,} steps above start-up at {sizes[1]:,} tasks, {big - start:,} at {sizes[2]:,}: "
        f"{growth:.1f}x for {sizes[2] // sizes[1]}x the tasks ({start:,} steps at 1 task)")


def rerun(j: Job) -> list[str | Path]:
    return ["run", j.spec, "--quiet", "--run-dir", j.run_dir, "--cache-dir", j.cache]


Command = Callable[[Job, Steps], list[str | Path]]

SPEC_COMMANDS: dict[str, Command] = {
    "validate": lambda j, c: ["validate", j.spec],
    "plan with an empty cache": lambda j, c: ["plan", j.spec, "--cache-dir", c.fresh("cache")],
}
RUN_DIR_COMMANDS: dict[str, Command] = {
    "rerun with every task up to date": lambda j, c: rerun(j),
    "status": lambda j, c: ["status", j.run_dir],
    "run --dry-run": lambda j, c: ["run", j.spec, "--dry-run", "--run-dir", j.run_dir, "--cache-dir", j.cache],
    "run --only one task": lambda j, c: [*rerun(j), "--only", "t-0-0"],
}


def assert_counted(what: str, jobs: Jobs, command: Command) -> None:
    counts = [jobs.steps(*command(j, jobs.steps)) for j in jobs.jobs]
    assert_linear(what, counts, tuple(j.n for j in jobs.jobs))


@pytest.mark.parametrize("command", SPEC_COMMANDS)
def test_spec_command_steps_grow_linearly_with_tasks(command: str, python_specs: Jobs) -> None:
    assert_counted(command, python_specs, SPEC_COMMANDS[command])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "shell"])
def test_first_run_steps_grow_linearly_with_tasks(kind: str, request: pytest.FixtureRequest) -> None:
    jobs: Jobs = request.getfixturevalue(f"{kind}_jobs")
    assert_linear(f"first run of a {kind} job", jobs.first_runs, tuple(j.n for j in jobs.jobs))


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN_DIR_COMMANDS)
def test_run_dir_command_steps_grow_linearly_with_tasks(command: str, python_jobs: Jobs) -> None:
    assert_counted(command, python_jobs, RUN_DIR_COMMANDS[command])


@pytest.mark.slow
def test_shell_job_rerun_steps_grow_linearly_with_tasks(shell_jobs: Jobs) -> None:
    assert_counted("rerun of a shell job with every task up to date", shell_jobs, lambda j, c: rerun(j))
