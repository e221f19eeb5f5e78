"""Python tasks run in worker processes by default (``execution.isolation: process``): a segfault, a call
that never returns or an ``os.chdir`` touches no other task and not the runner, a dead worker is named
by its signal and retried per ``retries``, and a ``timeout`` holds, locally and on MPI worker ranks.

Real runs through the command line: real worker processes, real signals, real ``mpiexec -n 3``."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from cmbagent_batch.attempt import Attempt, Payload, TaskContext
from cmbagent_batch.backends.processes import WorkerProcesses
from cmbagent_batch.states import OutcomeReason
from tests.helpers.cli import Runner, clean_env, cli, wait_until, write_spec
from tests.helpers.mpi_run import MPIEXEC, manifest, mpirun
from tests.helpers.runs import published, work_dir

pytestmark = pytest.mark.slow  # runs, each a CLI in a subprocess

TASKS = """
import ctypes
import os
import signal
import time


def ok(n):
    return {"n": n, "pid": os.getpid()}


def crash():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def crash_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        ctypes.string_at(0)
    return "second time lucky"


def nap(seconds):
    time.sleep(seconds)


def write_then_die(name):
    with open(name, "w") as fh:
        fh.write("half a result\\n")
    os.kill(os.getpid(), signal.SIGKILL)


def write_then_nap(name, seconds):
    with open(name, "w") as fh:
        fh.write("half a result\\n")
    time.sleep(seconds)


def deaf(seconds):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # as a C call that never returns to Python would be
    time.sleep(seconds)


def pool_of_two(n):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return sum(pool.map(abs, range(-n, 0)))


def crash_leaving_a_child(pids):
    child = os.fork()
    if child == 0:  # a helper that would hold the worker's pipe open for 60 s
        time.sleep(60)
        os._exit(0)
    with open(pids, "w") as fh:
        fh.write(str(child))
    ctypes.string_at(0)


def wander():
    os.chdir("/")
    os.environ["WANDERED"] = "yes"


def stay():
    return {"cwd": os.getcwd(), "wandered": os.environ.get("WANDERED")}
"""


def job(tmp_path: Path, tasks: str, execution: str = "{keep_going: true, retry_backoff: 0}") -> Path:
    (tmp_path / "science.py").write_text(textwrap.dedent(TASKS))
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: iso}}
        execution: {execution}
        tasks:
    """ + textwrap.indent(textwrap.dedent(tasks), " " * 10))
    return tmp_path / "runs" / "iso"


def tasks_of(run_dir: Path) -> dict[str, Any]:
    return manifest(run_dir)["tasks"]  # type: ignore[no-any-return]


CRASH_AMONG_OTHERS = """
    - id: ok-{i}
      kind: python
      matrix: {i: [1, 2, 3, 4]}
      call: science:ok
      args: {n: "{i}"}
    - id: crash
      kind: python
      call: science:crash
"""


def test_a_segfault_fails_its_task_by_name_and_the_others_succeed(tmp_path: Path) -> None:
    run_dir = job(tmp_path, CRASH_AMONG_OTHERS)
    result = cli(tmp_path, "run", "job.yaml")
    assert result.returncode == 1, result.stdout + result.stderr  # the runner lives to say it
    assert "  failed: crash (attempt 1): worker died: SIGSEGV" in result.stderr
    tasks = tasks_of(run_dir)
    assert tasks["crash"]["state"] == "failed"
    assert tasks["crash"]["reason"] == "worker died: SIGSEGV", tasks["crash"]
    assert [tasks[f"ok-{i}"]["state"] for i in range(1, 5)] == ["succeeded"] * 4
    for i in range(1, 5):  # their return values were published
        assert json.loads((published(run_dir, f"ok-{i}") / "return.json").read_text())["n"] in (i, str(i))


def test_a_dead_worker_is_retried_per_retries(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    run_dir = job(tmp_path, f"""
        - id: flaky
          kind: python
          call: science:crash_once
          args: {{marker: "{marker}"}}
        - id: crash
          kind: python
          call: science:crash
    """, "{keep_going: true, retries: 2, retry_backoff: 0}")
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    tasks = tasks_of(run_dir)
    assert tasks["flaky"]["state"] == "succeeded" and tasks["flaky"]["attempts"] == 2, tasks["flaky"]
    assert json.loads((published(run_dir, "flaky") / "return.json").read_text()) == "second time lucky"
    assert tasks["crash"]["state"] == "failed" and tasks["crash"]["attempts"] == 3, tasks["crash"]
    assert tasks["crash"]["reason"] == "worker died: SIGSEGV"


def test_what_a_task_wrote_before_its_worker_died_is_in_its_work_directory(tmp_path: Path) -> None:
    """The task ran in its worker's scratch directory: the runner moves it to the task's work directory."""
    run_dir = job(tmp_path, """
        - id: dies
          kind: python
          call: science:write_then_die
          args: {name: partial.txt}
    """)
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    assert tasks_of(run_dir)["dies"]["reason"] == "worker died: SIGKILL (killed: out of memory, or by another process)"
    assert (work_dir(run_dir, "dies") / "partial.txt").read_text() == "half a result\n"
    assert not (run_dir / "ranks" / "rank-0000" / "scratch").exists()


def test_what_a_task_wrote_when_its_runner_was_killed_is_kept_and_said(tmp_path: Path) -> None:
    run_dir = job(tmp_path, """
        - id: naps
          kind: python
          call: science:write_then_nap
          args: {name: partial.txt, seconds: 60}
    """)
    runner = Runner(tmp_path, "job.yaml", "--quiet")
    scratch = run_dir / "ranks" / "rank-0000" / "scratch"
    wait_until("the task wrote its file", lambda: list(scratch.glob("*/partial.txt")), runner)
    [left] = list(scratch.glob("*/partial.txt"))
    runner.kill()  # SIGKILL: its worker process is ended by the runner's watchdog
    worker = int(left.parent.name)
    wait_until("the worker is gone", lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie")
    (tmp_path / "science.py").write_text(textwrap.dedent(TASKS).replace("time.sleep(seconds)\n\n\ndef deaf", "pass\n\n\ndef deaf"))
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"cmbagent-batch: warning: {left.parent} holds what a python task left when an earlier run was killed "
            "(which task is not recorded; the task runs again): it is kept as it is, to look at or remove") in result.stderr
    assert left.read_text() == "half a result\n"


TIMED = """
    - id: sleepy
      kind: python
      call: science:nap
      args: {seconds: 30}
      timeout: 2
    - id: deaf
      kind: python
      call: science:deaf
      args: {seconds: 30}
      timeout: 2
    - id: fine
      kind: python
      call: science:ok
      args: {n: 1}
"""


@pytest.mark.parametrize("backend", ["local", pytest.param("mpi", marks=pytest.mark.skipif(
    MPIEXEC is None, reason="mpiexec not installed"))])
def test_a_timeout_holds_even_for_a_call_that_never_returns_to_python(tmp_path: Path, backend: str) -> None:
    """``sleepy`` is interrupted at its timeout; ``deaf`` ignores the interruption (as a long C call
    would), so its worker process is killed ``kill_grace`` later."""
    run_dir = job(tmp_path, TIMED, f"{{backend: {backend}, keep_going: true, kill_grace: 1}}")
    started = time.monotonic()
    if backend == "mpi":
        result = mpirun(tmp_path, 3, "run", "job.yaml", "--quiet")
    else:
        result = cli(tmp_path, "run", "job.yaml", "--quiet")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    tasks = tasks_of(run_dir)
    assert tasks["sleepy"]["state"] == "failed", tasks["sleepy"]
    assert tasks["sleepy"]["reason"] == "timed out after 2 s (python call interrupted)"
    assert tasks["deaf"]["state"] == "failed", tasks["deaf"]
    assert tasks["deaf"]["reason"].startswith("timed out after 2 s (the call did not return to Python"), tasks["deaf"]
    assert tasks["fine"]["state"] == "succeeded"
    assert elapsed < 25, elapsed  # a guard against the 30 s sleeps running out, not a speed figure


def test_a_task_that_changes_directory_or_environment_touches_no_other(tmp_path: Path) -> None:
    run_dir = job(tmp_path, """
        - id: wander
          kind: python
          call: science:wander
        - id: stay
          kind: python
          call: science:stay
          depends_on: [wander]
    """, "{max_workers: 1}")  # one worker process: the second task runs where the first one ran
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    stayed = json.loads((published(run_dir, "stay") / "return.json").read_text())
    assert stayed["wandered"] is None
    assert os.path.dirname(stayed["cwd"]) == str(run_dir / "ranks" / "rank-0000" / "scratch")  # its worker's


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")
def test_on_mpi_ranks_a_segfault_fails_its_task_and_the_job_goes_on(tmp_path: Path) -> None:
    run_dir = job(tmp_path, CRASH_AMONG_OTHERS.replace("call: science:crash\n", "call: science:crash\n      retries: 1\n"),
                  "{backend: mpi, tasks_per_rank: 2, keep_going: true, retry_backoff: 0}")
    result = mpirun(tmp_path, 3, "run", "job.yaml", "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BAD TERMINATION" not in result.stdout + result.stderr
    tasks = tasks_of(run_dir)
    assert tasks["crash"]["state"] == "failed" and tasks["crash"]["attempts"] == 2, tasks["crash"]
    assert tasks["crash"]["reason"] == "worker died: SIGSEGV", tasks["crash"]
    assert tasks["crash"]["rank"] in (1, 2)
    assert [tasks[f"ok-{i}"]["state"] for i in range(1, 5)] == ["succeeded"] * 4
    assert {tasks[f"ok-{i}"]["rank"] for i in range(1, 5)} <= {1, 2}


def attempt_of(tmp_path: Path, name: str, call: str, args: dict[str, Any] | None = None) -> Attempt:
    run_dir = tmp_path / "runs" / "direct"
    ctx = TaskContext(name, str(run_dir), str(run_dir / "tasks" / name), 0, 1, "here")
    return Attempt(Payload(name, "python", call=call, args=args, python_path=(str(tmp_path),)), ctx, (), {}, True, ())


def test_a_worker_dying_in_a_batch_fails_only_the_attempt_it_was_running(tmp_path: Path) -> None:
    (tmp_path / "science.py").write_text(textwrap.dedent(TASKS))
    (tmp_path / "runs" / "direct" / "tasks").mkdir(parents=True)
    batch = [attempt_of(tmp_path, f"ok-{i}", "science:ok", {"n": i}) for i in range(40)]
    batch[25] = attempt_of(tmp_path, "crash", "science:crash")
    workers = WorkerProcesses(2)
    try:
        outcomes = workers.submit_attempts(batch).result(timeout=120)
        again = workers.submit_attempts([attempt_of(tmp_path, "after", "science:ok", {"n": 0})], single=True)
        assert again.result(timeout=120).ok  # a fresh worker took over
    finally:
        workers.shutdown()
    assert [o.ok for o in outcomes] == [i != 25 for i in range(40)]
    assert outcomes[25].error == "worker died: SIGSEGV" and outcomes[25].worker_died
    assert outcomes[25].reason is OutcomeReason.WORKER_DIED and outcomes[25].exit_code == -11
    for i in (*range(25), *range(26, 40)):  # each ran and returned its own value
        returned = json.loads((tmp_path / "runs" / "direct" / "outputs" / f"ok-{i}" / "return.json").read_text())
        assert returned["n"] == i


def test_a_task_may_start_processes_of_its_own(tmp_path: Path) -> None:
    run_dir = job(tmp_path, """
        - id: pool
          kind: python
          call: science:pool_of_two
          args: {n: 4}
    """, "{}")
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert json.loads((published(run_dir, "pool") / "return.json").read_text()) == 10


def test_a_dead_worker_is_seen_at_once_and_what_its_task_started_ends_with_it(tmp_path: Path) -> None:
    pids = tmp_path / "child.pid"
    run_dir = job(tmp_path, f"""
        - id: crash
          kind: python
          call: science:crash_leaving_a_child
          args: {{pids: "{pids}"}}
    """, "{}")
    started = time.monotonic()
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert tasks_of(run_dir)["crash"]["reason"] == "worker died: SIGSEGV"
    assert elapsed < 30, elapsed  # not after the helper's 60 s, which held the worker's pipe open
    assert not psutil.pid_exists(int(pids.read_text())) or psutil.Process(int(pids.read_text())).status() == "zombie"


def test_worker_processes_that_cannot_start_fail_their_tasks_with_the_reason(tmp_path: Path) -> None:
    """A TMPDIR too deep for a Unix socket's path: the forkserver cannot start."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    run_dir = job(tmp_path, """
        - id: ok-{i}
          kind: python
          matrix: {i: [1, 2]}
          call: science:ok
          args: {n: "{i}"}
        - id: sh
          kind: shell
          run: echo fine
    """)
    result = cli(tmp_path, "run", "job.yaml", "--quiet", env=clean_env(tmp_path, TMPDIR=str(deep)))
    assert result.returncode == 1, result.stdout + result.stderr
    tasks = tasks_of(run_dir)
    assert tasks["sh"]["state"] == "succeeded"
    for tid in ("ok-1", "ok-2"):
        assert tasks[tid]["state"] == "failed"
        assert tasks[tid]["reason"].startswith("cannot start a worker process for python tasks: "), tasks[tid]
        assert "AF_UNIX path too long" in tasks[tid]["reason"], tasks[tid]
