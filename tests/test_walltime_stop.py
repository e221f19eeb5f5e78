"""A clean stop before the walltime: ``run --walltime-grace SECONDS`` and SIGUSR1.

The scheduler's drain with fake pools (pure logic), ``LocalPools.hold`` and ``RankExecutor.hold_tasks``
on real threads, processes and ranks, then the CLI in a subprocess (local backend, and ``mpiexec -n 3``
with the signal sent to every rank as ``srun`` does). Tasks wait for a release file the test creates, so
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import psutil
import pytest

from cmbagent_batch.attempt import Attempt, Payload, Stopped, TaskContext
from cmbagent_batch.backends.local import LocalPools
from cmbagent_batch.execute.runs import DrainEvent, DrainStep
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.execute.stop import drain_message
from cmbagent_batch.states import StopReason, TaskState
from tests.helpers.cli import Runner, clean_env, cli, journal, q, wait_until, write_spec
from tests.helpers.fake_scheduler import FakeClock, FakePools, Job, fail
from tests.helpers.processes import live_in_group
from tests.helpers.runs import read_run

HERE = Path(__file__).resolve().parent
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="MPI tests need mpiexec and mpi4py: pip install 'cmbagent-batch[mpi]'")


# --- the scheduler's drain, with fake pools -----------------------------------------------------------


class HoldingPools(FakePools):
    """Fake pools that can hold (``hold_tasks``, as the Pools protocol's ``hold``; ``hold`` is the fake's
    set of tasks whose attempts run until released): attempts in ``ahead`` were handed over ahead of a
    free worker, which refuses them on a hold (their futures fail with ``CancelledError``, as a worker
    rank's do)."""

    def __init__(self, hold: Iterable[str], ahead: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(hold=set(hold) | set(ahead), **kwargs)
        self.ahead = set(ahead)
        self.holds = 0

    def hold_tasks(self) -> None:
        self.holds += 1
        for tid in sorted(self.ahead):
            if any(t == tid for t, _ in self.held):
                self.release(tid, CancelledError())


class AsPools:
    """What the scheduler sees of ``HoldingPools``."""

    def __init__(self, fake: HoldingPools) -> None:
        self.fake = fake

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)

    def hold(self) -> None:
        self.fake.hold_tasks()


def drain_job(tasks: dict[str, dict[str, Any]], pools: HoldingPools, tick: Any, **kwargs: Any
              ) -> tuple[Job, list[DrainEvent]]:
    """A ``Job`` whose scheduler reports its drain events."""
    job = Job(tasks, pools=pools, tick=tick, **kwargs)
    events: list[DrainEvent] = []
    s = job.sched
    job.sched = Scheduler(job.runs, AsPools(pools), s.limits, s.options, job.prepare, job.record, tick=job.tick,
                          clock=FakeClock(), on_drain=events.append)
    return job, events


def running(pools: FakePools, *tids: str) -> bool:
    return {t for t, _ in pools.held} >= set(tids)


def test_a_drain_lets_running_attempts_finish_and_starts_nothing_more() -> None:
    pools = HoldingPools(hold={"a", "b"}, ahead={"c", "d"})

    def tick(job: Job, sched: Scheduler) -> None:
        if sched.stop_reason is None and running(pools, "a", "b"):
            sched.request_stop(StopReason.SIGUSR1, drain=100)
        elif pools.holds and running(pools, "a", "b"):
            pools.release("a")
            pools.release("b")

    tasks: dict[str, dict[str, Any]] = {t: {} for t in "abcde"}
    job, events = drain_job(tasks, pools, tick, workers=2,
                            limits={"prefetch_kinds": frozenset({"shell"}), "prefetch": 2})
    job.run()
    assert pools.submitted == ["a", "b", "c", "d"]  # c and d handed over ahead of a free worker
    assert job.states() == {"a": TaskState.SUCCEEDED, "b": TaskState.SUCCEEDED, "c": TaskState.INTERRUPTED,
                            "d": TaskState.INTERRUPTED, "e": TaskState.PENDING}
    assert job.runs["c"].reason == "cancelled before it started (SIGUSR1)"
    assert (pools.holds, pools.terminated, job.sched.stop_reason) == (1, [], "SIGUSR1")
    assert events == [DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 2, 100)]  # at most one running attempt per worker
    job.check_counts()


@pytest.mark.slow
def test_at_the_deadline_the_attempts_still_running_are_terminated() -> None:
    pools = HoldingPools(hold={"a", "b"}, on_terminate=FakePools.terminate_held)

    def tick(job: Job, sched: Scheduler) -> None:
        if sched.stop_reason is None and running(pools, "a", "b"):
            sched.request_stop(StopReason.SIGUSR1, drain=5)

    job, events = drain_job({"a": {}, "b": {}, "c": {"deps": ["a"]}}, pools, tick, workers=2, kill_grace=3.0)
    job.run()
    assert job.states() == {"a": TaskState.INTERRUPTED, "b": TaskState.INTERRUPTED, "c": TaskState.PENDING}
    assert job.runs["a"].reason == "terminated by the runner (SIGUSR1)"
    assert pools.terminated == [3.0]
    assert events == [DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 2, 5), DrainEvent(DrainStep.DEADLINE, StopReason.SIGUSR1, 2, 5)]
    job.check_counts()


@pytest.mark.parametrize("second", [StopReason.SIGTERM, StopReason.SIGUSR1])
def test_a_second_stop_request_during_the_drain_terminates_at_once(second: StopReason) -> None:
    pools = HoldingPools(hold={"a", "b"}, on_terminate=FakePools.terminate_held)

    def tick(job: Job, sched: Scheduler) -> None:
        if sched.stop_reason is None and running(pools, "a", "b"):
            sched.request_stop(StopReason.SIGUSR1, drain=10**6)
        elif pools.holds:
            sched.request_stop(second)

    job, events = drain_job({"a": {}, "b": {}}, pools, tick, workers=2)
    job.run()
    assert job.states() == {"a": TaskState.INTERRUPTED, "b": TaskState.INTERRUPTED}
    assert job.sched.stop_reason == "SIGUSR1"  # the exit code stays the walltime stop's
    assert events == [DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 2, 10**6), DrainEvent(DrainStep.HURRY, second, 2, 10**6)]
    assert len(pools.terminated) == 1


@pytest.mark.parametrize("keep_going", [True, False])
def test_an_attempt_that_fails_during_the_drain_has_failed(keep_going: bool) -> None:
    pools = HoldingPools(hold={"a", "b"}, on_terminate=FakePools.terminate_held)

    def tick(job: Job, sched: Scheduler) -> None:
        if sched.stop_reason is None and running(pools, "a", "b"):
            sched.request_stop(StopReason.SIGUSR1, drain=10**6)
        elif pools.holds and running(pools, "a"):
            pools.release("a", fail())
        elif pools.holds and running(pools, "b") and keep_going:
            pools.release("b")

    job, events = drain_job({"a": {}, "b": {}, "c": {"deps": ["a"]}}, pools, tick, workers=2,
                            keep_going=keep_going)
    job.run()
    assert job.runs["a"].state is TaskState.FAILED and job.runs["a"].reason == "exit code 1"
    assert job.runs["c"].state is TaskState.UPSTREAM_FAILED
    if keep_going:
        assert job.runs["b"].state is TaskState.SUCCEEDED and pools.terminated == []
        assert events == [DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 2, 10**6)]
    else:  # fail-fast ends the drain: what runs is terminated, as after any failure
        assert job.runs["b"].state is TaskState.INTERRUPTED
        assert events[-1] == DrainEvent(DrainStep.HURRY, StopReason.FAIL_FAST, 1, 10**6)
    assert job.sched.stop_reason == "SIGUSR1"


def test_without_a_drain_a_stop_terminates_at_once_and_holds_nothing() -> None:
    pools = HoldingPools(hold={"a"}, on_terminate=FakePools.terminate_held)

    def tick(job: Job, sched: Scheduler) -> None:
        if sched.stop_reason is None and running(pools, "a"):
            sched.request_stop(StopReason.SIGUSR1)

    job, events = drain_job({"a": {}, "b": {"deps": ["a"]}}, pools, tick, workers=2)
    job.run()
    assert job.states() == {"a": TaskState.INTERRUPTED, "b": TaskState.PENDING}
    assert (pools.holds, len(pools.terminated), events) == (0, 1, [])


def test_what_the_user_reads_about_a_drain() -> None:
    assert drain_message(DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 3, 40)) == (
        "cmbagent-batch: SIGUSR1 (walltime warning): no new task starts; 3 running tasks get up to 40 s to finish")
    assert drain_message(DrainEvent(DrainStep.HOLD, StopReason.SIGUSR1, 1, 2.5)) == (
        "cmbagent-batch: SIGUSR1 (walltime warning): no new task starts; 1 running task gets up to 2.5 s to finish")
    assert drain_message(DrainEvent(DrainStep.DEADLINE, StopReason.SIGUSR1, 2, 40)) == (
        "cmbagent-batch: SIGUSR1 (walltime warning): 2 tasks still running after 40 s: terminating them")
    assert drain_message(DrainEvent(DrainStep.DEADLINE, StopReason.SIGUSR1, 1, 40)) == (
        "cmbagent-batch: SIGUSR1 (walltime warning): 1 task still running after 40 s: terminating it")
    assert drain_message(DrainEvent(DrainStep.HURRY, StopReason.SIGTERM, 2, 40)) == (
        "cmbagent-batch: SIGTERM during the walltime grace: terminating the 2 running tasks now")


# --- LocalPools.hold and RankExecutor.hold_tasks: real threads, processes and ranks ------------------------


def started_then_wait(started: str, go: str) -> int:
    """A python task: create ``started``, wait for ``go`` to exist; return this worker's pid."""
    Path(started).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        assert time.monotonic() < deadline, f"{go} never came"
        time.sleep(0.01)
    return os.getpid()


def waiting_attempt(tmp_path: Path, name: str, go: Path) -> Attempt:
    """An attempt of a python task calling ``started_then_wait`` (this module, imported by the worker)."""
    run_dir = tmp_path / "run"
    ctx = TaskContext(name, str(run_dir), str(run_dir / name), 0, 1, "here")
    payload = Payload(name, "python", call="tests.test_walltime_stop:started_then_wait",
                      args={"started": str(tmp_path / f"started-{name}"), "go": str(go)},
                      python_path=(str(HERE.parent),))
    return Attempt(payload, ctx, (), {}, True, ())


def test_local_pools_hold_refuses_what_has_not_started_and_lets_the_rest_run(tmp_path: Path) -> None:
    pools = LocalPools(workers=1, isolated=True)
    go = tmp_path / "go"
    try:
        executor = pools.executor_for("python")
        running = pools.submit(executor, [waiting_attempt(tmp_path, "a", go)], None)
        wait_until("the call runs", (tmp_path / "started-a").exists)
        later = [pools.submit(executor, [waiting_attempt(tmp_path, f"b{i}", go)], None) for i in range(3)]
        gate = pools.gate("shell", lambda: None)  # a thread pool attempt handed over ahead of a slot
        assert gate is not None
        pools.hold()
        with pytest.raises(Stopped, match="terminated by the runner before it started"):
            gate.enter()
        go.touch()
        assert running.result(timeout=60).ok
        for f in later:
            with pytest.raises(CancelledError):
                f.result(timeout=60)
        assert sorted(p.name for p in tmp_path.glob("started*")) == ["started-a"]
        with pytest.raises(CancelledError):  # nor what is handed over after the hold
            pools.submit(executor, [waiting_attempt(tmp_path, "c", go)], None).result(timeout=60)
    finally:
        pools.shutdown(wait=True)


@pytest.mark.slow
@needs_mpi
def test_a_hold_cancels_the_calls_not_started_on_rank_0_and_on_the_workers(tmp_path: Path) -> None:
    assert MPIEXEC is not None
    env = dict(clean_env(tmp_path), PYTHONPATH=str(HERE.parent))
    env["PATH"] = os.path.dirname(MPIEXEC) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(HERE / "mpi_scripts" / "hold.py"), str(tmp_path)],
                       check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out == {
        "late": 0,
        "running": [["run-0", 1], ["run-1", 2]],
        "ahead": ["CancelledError", "CancelledError"],
        "ahead_messages": ["cancelled on rank 1 before it started: the run is stopping",
                           "cancelled on rank 2 before it started: the run is stopping"],
        "queued": ["cancelled"] * 3,
        "started": ["started-run-0", "started-run-1"],  # nothing held started
        "stopped": [],  # a hold is not a stop: the workers' stop hook was not called
        "still_serving": 81,
    }


# --- the CLI: local backend -------------------------------------------------------------------------------


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def waiting_task(starts: Path, side: Path, release: Path, pids: Path | None = None) -> str:
    """A shell command: note the start, wait for the release file, note the end (the side effect)."""
    pid = f"echo $$ >> {q(pids)}; " if pids is not None else ""
    return (f"echo $CMBAGENT_TASK_ID >> {q(starts)}; {pid}until [ -e {q(release)} ]; do sleep 0.05; done; "
            f"echo $CMBAGENT_TASK_ID >> {q(side)}")


def manifest(run_dir: Path) -> dict[str, Any]:
    return read_run(run_dir)


def stderr_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("cmbagent-batch: ")]


HOLD_2_FOR_30 = "cmbagent-batch: SIGUSR1 (walltime warning): no new task starts; 2 running tasks get up to 30 s to finish"


def six_and_final(tmp_path: Path, extra: str = "") -> tuple[Path, Path, Path]:
    starts, side, release = tmp_path / "starts", tmp_path / "side", tmp_path / "release"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: drain}}
        execution: {{max_workers: 2, kill_grace: 2{extra}}}
        tasks:
          - id: a-{{i}}
            kind: shell
            matrix: {{i: [1, 2, 3, 4, 5, 6]}}
            run: "{waiting_task(starts, side, release)}"
          - id: final
            kind: shell
            depends_on: ["a-*"]
            run: "echo $CMBAGENT_TASK_ID >> {q(starts)}; echo $CMBAGENT_TASK_ID >> {q(side)}"
    """)
    return starts, side, release


@pytest.mark.slow
def test_sigusr1_with_a_grace_lets_running_tasks_finish_and_a_rerun_completes(
        tmp_path: Path, runners: list[Runner]) -> None:
    starts, side, release = six_and_final(tmp_path)
    run_dir = tmp_path / "runs" / "drain"
    first = Runner(tmp_path, "job.yaml", "--quiet", "--walltime-grace", "30")
    runners.append(first)
    wait_until("two tasks run", lambda: len(lines(starts)) == 2, first)
    first.proc.send_signal(signal.SIGUSR1)
    wait_until("the drain starts", lambda: HOLD_2_FOR_30 in first.stderr(), first)
    release.touch()  # the running tasks may end now; a task that starts from now on would be seen
    assert first.wait() == 138, first.stderr()
    assert stderr_lines(first.stderr()) == [HOLD_2_FOR_30]
    ran = set(lines(starts))
    assert len(ran) == 2 and sorted(lines(starts)) == sorted(lines(side)) == sorted(ran)  # none started after
    m = manifest(run_dir)
    assert (m["status"], m["stop_reason"], m["exit_code"]) == ("interrupted", "SIGUSR1", 138)
    states = {tid: t["state"] for tid, t in m["tasks"].items()}
    held = {f"a-{i}" for i in range(1, 7)} - ran  # handed over ahead of a slot, held back at their gate
    assert states == {tid: "succeeded" if tid in ran else "interrupted" if tid in held else "pending" for tid in states}
    assert {t["attempts"] for tid, t in m["tasks"].items() if tid not in ran} == {0}  # held back: not counted
    assert {m["tasks"][tid]["reason"] for tid in held} == {"not run: the job stopped (SIGUSR1)"}
    records = journal(run_dir)
    assert {(r["task"], r["state"]) for r in records} == (
        {(t, s) for t in ran for s in ("running", "succeeded")} | {(t, "interrupted") for t in held})

    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    every = {f"a-{i}" for i in range(1, 7)} | {"final"}
    assert Counter(lines(side)) == Counter(lines(starts)) == Counter(every)  # each task ran once overall
    m = manifest(run_dir)
    assert {tid: t["state"] for tid, t in m["tasks"].items()} == {
        tid: "skipped" if tid in ran else "succeeded" for tid in every}


@pytest.mark.slow
def test_a_task_still_running_at_the_end_of_the_grace_is_terminated_and_reruns(
        tmp_path: Path, runners: list[Runner]) -> None:
    starts, side, release, pids = tmp_path / "starts", tmp_path / "side", tmp_path / "release", tmp_path / "pids"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: short}}
        execution: {{max_workers: 2, kill_grace: 1}}
        tasks:
          - {{id: quick, kind: shell, run: "echo $CMBAGENT_TASK_ID >> {q(side)}"}}
          - {{id: slow, kind: shell, depends_on: [quick], run: "{waiting_task(starts, side, release, pids)}"}}
    """)
    run_dir = tmp_path / "runs" / "short"
    first = Runner(tmp_path, "job.yaml", "--quiet", "--walltime-grace", "1")
    runners.append(first)
    wait_until("slow runs", lambda: lines(starts) == ["slow"] and len(lines(pids)) == 1, first)
    first.proc.send_signal(signal.SIGUSR1)
    assert first.wait() == 138, first.stderr()
    assert stderr_lines(first.stderr()) == [
        "cmbagent-batch: SIGUSR1 (walltime warning): no new task starts; 1 running task gets up to 1 s to finish",
        "cmbagent-batch: SIGUSR1 (walltime warning): 1 task still running after 1 s: terminating it",
    ]
    assert live_in_group(int(lines(pids)[0])) == []
    m = manifest(run_dir)
    assert (m["status"], m["stop_reason"], m["exit_code"]) == ("interrupted", "SIGUSR1", 138)
    assert (m["tasks"]["slow"]["state"], m["tasks"]["slow"]["reason"]) == (
        "interrupted", "terminated by the runner (SIGUSR1)")
    assert m["tasks"]["quick"]["state"] == "succeeded"

    release.touch()
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    assert Counter(lines(side)) == {"quick": 1, "slow": 1}  # each succeeded task once
    assert Counter(lines(starts)) == {"slow": 2}  # terminated once, then run to its end
    assert manifest(run_dir)["tasks"]["slow"]["attempts"] == 2


@pytest.mark.slow
def test_sigterm_during_the_grace_terminates_at_once(tmp_path: Path, runners: list[Runner]) -> None:
    starts, side, release, pids = tmp_path / "starts", tmp_path / "side", tmp_path / "release", tmp_path / "pids"
    task = waiting_task(starts, side, release, pids)
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: twice}}
        execution: {{max_workers: 2, kill_grace: 1}}
        tasks:
          - {{id: w1, kind: shell, run: "{task}"}}
          - {{id: w2, kind: shell, run: "{task}"}}
    """)
    first = Runner(tmp_path, "job.yaml", "--quiet", "--walltime-grace", "3600")
    runners.append(first)
    wait_until("both run", lambda: len(lines(starts)) == 2 and len(lines(pids)) == 2, first)
    first.proc.send_signal(signal.SIGUSR1)
    hold = "cmbagent-batch: SIGUSR1 (walltime warning): no new task starts; 2 running tasks get up to 3600 s to finish"
    wait_until("the drain starts", lambda: hold in first.stderr(), first)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 138, first.stderr()  # well before the hour: terminated at once
    assert stderr_lines(first.stderr()) == [
        hold, "cmbagent-batch: SIGTERM during the walltime grace: terminating the 2 running tasks now"]
    assert [p for p in map(int, lines(pids)) if live_in_group(p)] == []
    m = manifest(tmp_path / "runs" / "twice")
    assert (m["status"], m["stop_reason"], m["exit_code"]) == ("interrupted", "SIGUSR1", 138)
    assert {(t["state"], t["reason"]) for t in m["tasks"].values()} == {
        ("interrupted", "terminated by the runner (SIGUSR1)")}
    assert not side.exists()


def test_the_walltime_grace_flag_is_checked(tmp_path: Path) -> None:
    res = cli(tmp_path, "run", "job.yaml", "--walltime-grace", "-1")
    assert res.returncode == 2
    assert "argument --walltime-grace: expected a number of seconds, 0 or more, got '-1'" in res.stderr


# --- the CLI under mpiexec: srun passes SIGUSR1 to every rank ------------------------------------------------


def rank_processes(launcher: int) -> list[psutil.Process]:
    """The ranks of the job that ``launcher`` (mpiexec) started: its python descendants running us."""
    found = []
    for p in psutil.Process(launcher).children(recursive=True):
        try:
            if "cmbagent_batch" in p.cmdline():
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
@needs_mpi
def test_sigusr1_to_every_rank_with_a_grace_lets_the_workers_tasks_finish(tmp_path: Path) -> None:
    assert MPIEXEC is not None
    starts, side, release = six_and_final(tmp_path, extra=", backend: mpi, tasks_per_rank: 1")
    run_dir = tmp_path / "runs" / "drain"
    env = clean_env(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    argv = [MPIEXEC, "-n", "3", sys.executable, "-m", "cmbagent_batch", "run", "job.yaml", "--quiet"]
    err_path = tmp_path / "mpiexec.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*argv, "--walltime-grace", "30"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_until("a task runs on each worker", lambda: len(lines(starts)) == 2)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 3
        for p in ranks:
            p.send_signal(signal.SIGUSR1)
        wait_until("the drain starts", lambda: HOLD_2_FOR_30 in err_path.read_text())
        # The hold reaches the workers a moment after rank 0 says so: a task ending in between would let
        # one sent ahead to its rank start. Release the running tasks once the held ones are back: the
        # other four a-* tasks, one sent ahead to each worker (prepared there, at the gate) and two queued
        # on rank 0, end not run (interrupted).
        wait_until("the tasks sent ahead are held back", lambda: sum(
            r["state"] == "interrupted" for r in journal(run_dir)) == 4)
        release.touch()
        assert proc.wait(timeout=60) == 138, err_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert stderr_lines(err_path.read_text()) == [HOLD_2_FOR_30]
    ran = set(lines(starts))
    assert len(ran) == 2 and sorted(lines(starts)) == sorted(lines(side)) == sorted(ran)  # none started after
    m = manifest(run_dir)
    assert (m["status"], m["stop_reason"], m["exit_code"]) == ("interrupted", "SIGUSR1", 138)
    assert {m["tasks"][tid]["rank"] for tid in ran} == {1, 2}
    states = {tid: t["state"] for tid, t in m["tasks"].items()}
    assert {tid for tid, s in states.items() if s == "succeeded"} == ran
    # held back, nothing failed: 2 ran, 2 sent ahead and 2 queued on rank 0 came back, "final" waits
    assert Counter(states.values()) == {"succeeded": 2, "interrupted": 4, "pending": 1}
    for t in m["tasks"].values():
        if t["state"] == "interrupted":  # handed over, held back
            assert (t["reason"], t["attempts"]) == ("not run: the job stopped (SIGUSR1)", 0), t

    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    every = {f"a-{i}" for i in range(1, 7)} | {"final"}
    assert Counter(lines(side)) == Counter(lines(starts)) == Counter(every)  # each task ran once overall


@pytest.mark.slow
def test_a_drain_that_sees_the_last_task_finish_ends_the_run_as_finished(
        tmp_path: Path, runners: list[Runner]) -> None:
    starts, side, release = tmp_path / "starts", tmp_path / "side", tmp_path / "release"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: last}}
        tasks:
          - {{id: only, kind: shell, run: "{waiting_task(starts, side, release)}"}}
    """)
    first = Runner(tmp_path, "job.yaml", "--quiet", "--walltime-grace", "60")
    runners.append(first)
    wait_until("the task runs", lambda: lines(starts) == ["only"], first)
    first.proc.send_signal(signal.SIGUSR1)
    wait_until("the drain starts", lambda: "no new task starts" in first.stderr(), first)
    release.touch()
    assert first.wait() == 0, first.stderr()  # nothing left undone: not a walltime stop
    m = manifest(tmp_path / "runs" / "last")
    assert (m["status"], m["stop_reason"], m["exit_code"], m["counts"]) == ("finished", None, 0, {"succeeded": 1})
    assert lines(side) == ["only"]
