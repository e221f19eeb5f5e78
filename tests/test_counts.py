"""One tally of task states behind every count the user reads: the progress line, the run's last line,
``status`` (text and json), ``run.json`` and the Slurm job's log. ``running`` means started: work handed
over ahead of a free worker is ``queued``, and never counted as running."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.attempt import Attempt, Gate
from cmbagent_batch.backends.slots import StartNotice
from cmbagent_batch.execute.progress import Progress
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.states import Tally, TaskState
from tests.helpers.cli import COMMAND, Runner, clean_env, cli, journal, q, wait_until, write_spec
from tests.helpers.fake_scheduler import FakePools, Job
from tests.helpers.mpi_run import MPIEXEC, run_env
from tests.helpers.runs import read_run, work_dir

needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="MPI tests need mpiexec and mpi4py: pip install 'cmbagent-batch[mpi]'")

S = TaskState


# --- the tally and the progress line ---------------------------------------------------------------------


def test_a_tally_names_every_state_with_tasks_and_lumps_none_together() -> None:
    tally = Tally.of([S.SUCCEEDED] * 8 + [S.FAILED, S.UPSTREAM_FAILED] + [S.CANCELLED] * 7)
    assert tally.text() == "8 succeeded, 1 failed, 1 upstream_failed, 7 cancelled"
    assert tally.to_json() == {"cancelled": 7, "failed": 1, "succeeded": 8, "upstream_failed": 1}
    assert (tally.total, tally.done, tally.left) == (17, 8, 0)
    live = Tally.from_counts({S.PENDING: 4, S.QUEUED: 3, S.RUNNING: 2, S.SKIPPED: 1, S.FAILED: 0})
    assert live.text() == "2 running, 3 queued, 4 pending, 1 skipped"
    assert Tally.from_json({"pending": 4, "interrupted": 1, "succeeded": 3}).text() == (
        "4 pending, 3 succeeded, 1 interrupted")
    assert Tally.from_json({"pending": 4, "interrupted": 1, "succeeded": 3}).left == 5
    assert Tally.of([]).text() == "no tasks"


def test_the_progress_line_shows_each_state_by_the_name_the_last_line_gives_it() -> None:
    progress = Progress(17, io.StringIO())
    live = Tally.from_counts({S.RUNNING: 2, S.QUEUED: 3, S.PENDING: 4, S.SUCCEEDED: 8})
    assert progress.line(live) == "8/17 done: 2 running, 3 queued, 4 pending, 8 succeeded; 0:00 elapsed, ETA 0:00"
    ended = Tally.from_counts({S.SUCCEEDED: 8, S.FAILED: 1, S.UPSTREAM_FAILED: 1, S.CANCELLED: 7})
    assert progress.line(ended, finished=True) == (
        "8/17 done: 8 succeeded, 1 failed, 1 upstream_failed, 7 cancelled; 0:00 elapsed")


# --- the scheduler: a start counts when a worker is free of its last attempt ------------------------------


class ReportingPools(FakePools):
    """Fake pools that report each attempt's start when the test says (``start``), as a worker does."""

    def __init__(self, hold: set[str]) -> None:
        super().__init__(hold=hold)
        self.starts: dict[str, Any] = {}

    def gate(self, kind: str, on_start: Any) -> Gate:
        return StartNotice(on_start)

    def submit(self, executor: Any, attempts: list[Attempt], gate: Gate | None) -> Any:
        assert isinstance(gate, StartNotice)
        self.starts[attempts[0].ctx.task_id] = gate.on_start
        return super().submit(executor, attempts, None)


def test_a_start_reported_before_the_end_of_the_attempt_it_follows_waits_for_that_end() -> None:
    # One worker, one attempt handed over ahead of it. A worker gives its slot to the next attempt before
    # the runner has the last one's end (a thread publishes outputs after its slot is free; a worker rank
    # answers after it journals): "b" started while "a" is still running here, so b waits, queued.
    pools = ReportingPools(hold={"a", "b"})
    seen: list[tuple[int, int]] = []
    reported: dict[str, float] = {}

    def tick(job: Job, sched: Scheduler) -> None:
        seen.append((sched.counts[S.RUNNING], sched.counts[S.QUEUED]))
        if set(pools.starts) == {"a", "b"} and not reported:
            reported["a"] = 0.0
            pools.starts["a"]()
        elif seen[-1] == (1, 1) and "b" not in reported:
            reported["b"] = 0.0
            pools.starts["b"]()
            sched._drain_starts()  # as when the scheduler wakes: b's start is seen before a's end
            seen.append((sched.counts[S.RUNNING], sched.counts[S.QUEUED]))
            pools.release("a")
        elif seen[-1] == (1, 0) and any(t == "b" for t, _ in pools.held):
            pools.release("b")

    job = Job({"a": {"priority": 2.0}, "b": {}}, workers=1, pools=pools, tick=tick,
              limits={"prefetch_kinds": frozenset({"shell"}), "prefetch": 1})
    job.run()
    assert job.states() == {"a": S.SUCCEEDED, "b": S.SUCCEEDED}
    assert (0, 2) in seen and (1, 1) in seen and max(running for running, _ in seen) == 1
    order = [(tid, state) for tid, state, _ in job.records]
    assert order == [("a", S.RUNNING), ("a", S.SUCCEEDED), ("b", S.RUNNING), ("b", S.SUCCEEDED)]
    a_end, b_start = job.of("a")[1][1], job.of("b")[0][1]
    assert "t" in b_start and "t" not in a_end  # b's record keeps the time it started, not when it counted
    job.check_counts()


# --- the CLI: the progress line, the last line, status and run.json agree ---------------------------------

FAIL_FAST = """
    version: 1
    job: {name: ff}
    execution: {max_workers: 1}
    tasks:
      - {id: first-a, kind: shell, run: "true"}
      - {id: first-b, kind: shell, run: "true", depends_on: [first-a]}
      - {id: first-c, kind: shell, run: "true", depends_on: [first-b]}
      - {id: first-d, kind: shell, run: "true", depends_on: [first-c]}
      - {id: bad, kind: shell, run: "sleep 0.5; echo boom >&2; exit 3"}
      - {id: child, kind: shell, run: "true", depends_on: [bad]}
      - {id: ok-1, kind: shell, run: "true"}
      - {id: ok-2, kind: shell, run: "true"}
      - {id: ok-3, kind: shell, run: "true"}
"""
TOLD = "1 succeeded, 1 failed, 1 upstream_failed, 6 cancelled"


def test_after_a_failure_the_progress_line_the_last_line_status_and_run_json_say_the_same(tmp_path: Path) -> None:
    # One worker: first-a runs first (the longest path), bad next (handed over second), and its failure
    # stops the run: ok-1..3 were handed over ahead of the worker and never started; first-b..d wait.
    write_spec(tmp_path, FAIL_FAST)
    run_dir = tmp_path / "runs" / "ff"
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 1, res.stderr
    progress = [line for line in res.stderr.splitlines() if re.match(r"\d+/9 done: ", line)]
    assert re.fullmatch(rf"1/9 done: {TOLD}; 0:0\d elapsed", progress[-1]), progress
    assert res.stderr.splitlines()[-2:] == [f"cmbagent-batch: {TOLD}; run directory {run_dir}; report {run_dir}/report.html",
                                            "  failed: bad (attempt 1): exit code 3"]
    manifest = read_run(run_dir)
    counts = {"cancelled": 6, "failed": 1, "succeeded": 1, "upstream_failed": 1}
    assert manifest["counts"] == counts

    text = cli(tmp_path, "status", str(run_dir), check=True).stdout.splitlines()
    assert text[:2] == [f"Job ff in {run_dir}: finished, exit code 1", f"9 tasks: {TOLD}"]
    assert json.loads(cli(tmp_path, "status", str(run_dir), "--format", "json", check=True).stdout)["counts"] == counts

    # A cancelled task that never ran shows no stderr: its log holds only the header its attempt wrote
    # when it was handed over, and that attempt is not counted.
    assert (work_dir(run_dir, "ok-1") / "logs" / "stderr.log").read_text() == "# attempt 1\n"
    at = text.index("  ok-1     cancelled       attempts 0          -")
    assert text[at:at + 3] == ["  ok-1     cancelled       attempts 0          -",
                               "      not run: the job stopped (fail-fast)",
                               "  ok-2     cancelled       attempts 0          -"]
    at = next(i for i, line in enumerate(text) if line.startswith("  bad      failed          attempts 1 "))
    assert text[at + 1:at + 4] == ["      exit code 3", "      | # attempt 1", "      | boom"]


ONE_TASK = """
    version: 1
    job: {name: one, run_dir: elsewhere/one}
    tasks:
      - {id: only, kind: shell, run: "true"}
"""


def test_status_of_a_spec_shows_its_run_directory(tmp_path: Path) -> None:
    write_spec(tmp_path, ONE_TASK)
    run_dir = tmp_path / "elsewhere" / "one"
    res = cli(tmp_path, "status", "job.yaml")
    assert (res.returncode, res.stderr) == (2, f"cmbagent-batch: error: {run_dir}, the run directory of job.yaml, "
                                               "holds no run yet (no run.json); `cmbagent-batch run job.yaml` "
                                               "starts one\n")
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    shown = cli(tmp_path, "status", "job.yaml", check=True).stdout.splitlines()
    assert shown[:2] == [f"Job one in {run_dir}: finished, exit code 0", "1 task: 1 succeeded"]
    assert re.fullmatch(r"  only  succeeded       attempts 1 +\d+\.\d\ds", shown[2]) and len(shown) == 3
    # CMBAGENT_RUN_DIR moves the run directory for status as for run
    moved = tmp_path / "moved"
    env = clean_env(tmp_path, CMBAGENT_RUN_DIR=str(moved))
    assert cli(tmp_path, "status", "job.yaml", env=env).stderr == (
        f"cmbagent-batch: error: {moved}, the run directory of job.yaml, holds no run yet (no run.json); "
        "`cmbagent-batch run job.yaml` starts one\n")


FORMS = ("status takes RUN_DIR, a run directory (with run.json), or SPEC, a job spec (its run directory, as run "
         "finds it)")


@pytest.mark.parametrize(("given", "message"), [
    ("nowhere", f"nowhere: no such file or directory; {FORMS}"),
    ("empty", f"empty is not a run directory (no run.json); {FORMS}"),
    ("notes.txt", f"notes.txt is neither a run directory nor a valid job spec (1 problem: `cmbagent-batch validate "
                  f"notes.txt` lists it); {FORMS}"),
], ids=["missing", "a-directory", "not-a-spec"])
def test_status_of_neither_a_run_directory_nor_a_spec_says_both_forms(tmp_path: Path, given: str,
                                                                     message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("just words\n")
    res = cli(tmp_path, "status", given)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")


# --- running means started: sampled while a run goes on ------------------------------------------------------

TINY_MODULE = """
import time


def work(i):
    time.sleep(0.004)
    return i
"""


def tiny_python_job(tmp_path: Path, n: int, execution: str) -> None:
    (tmp_path / "tiny.py").write_text(TINY_MODULE)
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: tiny}}
        execution: {{{execution}}}
        tasks:
          - id: t-{{i}}
            kind: python
            call: tiny:work
            args: {{i: "{{i}}"}}
            matrix: {{i: {list(range(n))}}}
    """)


def run_sampling_status(tmp_path: Path, argv: list[str], env: dict[str, str], stderr: int) -> list[dict[str, int]]:
    """Run ``argv`` (the run, its stderr to the descriptor ``stderr``) to its end, reading ``status --format
    json``'s counts again and again while it goes on."""
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)
    samples = []
    try:
        wait_until("the run starts", lambda: (run_dir / "run.json").exists() or proc.poll() is not None)
        while proc.poll() is None:
            res = cli(tmp_path, "status", str(run_dir), "--format", "json", env=env)
            if res.returncode == 0 and (shown := json.loads(res.stdout))["status"] == "running":
                samples.append(shown["counts"])
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert samples, "the run ended before status could read it"
    return samples


def running_shown(lines: list[str]) -> list[int]:
    """The running counts of the progress lines among ``lines``."""
    return [int(m[1]) for line in lines if " done: " in line and (m := re.search(r"(\d+) running", line))]


@pytest.mark.slow
def test_with_two_workers_no_more_than_two_tasks_are_ever_running(tmp_path: Path) -> None:
    # Python tasks run in 2 worker processes, and the runner hands over up to 4 more submissions ahead of
    # them, batches of tiny tasks among them: what is handed over is queued until a worker begins it.
    tiny_python_job(tmp_path, 1500, "max_workers: 2")
    leader, follower = pty.openpty()  # the progress bar, redrawn every 0.2 s on a terminal
    drawn = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the run closed its end
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        samples = run_sampling_status(tmp_path, [*COMMAND, "run", "job.yaml"], clean_env(tmp_path), follower)
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    bars = [line.replace("\x1b[K", "") for line in re.split(r"[\r\n]+", drawn.decode()) if " done: " in line]
    assert running_shown(bars) and max(running_shown(bars)) <= 2, bars
    assert any(" queued" in line for line in bars), bars  # handed over ahead, shown apart
    assert re.fullmatch(r"\[#{24}\] 1500/1500 done: 1500 succeeded; 0:\d\d elapsed", bars[-1]), bars[-1]
    assert max(c.get("running", 0) for c in samples) <= 2, samples


@pytest.mark.slow
@needs_mpi
def test_on_mpi_ranks_only_what_started_on_a_worker_is_running(tmp_path: Path) -> None:
    # 2 worker ranks x 1 slot; rank 0 sends calls ahead to each and queues more: all of those are queued
    # until the worker that has one gives it a slot.
    assert MPIEXEC is not None
    tiny_python_job(tmp_path, 800, "backend: mpi, tasks_per_rank: 1")
    err_path = tmp_path / "mpiexec.err"
    with open(err_path, "wb") as err:
        samples = run_sampling_status(tmp_path, [MPIEXEC, "-n", "3", *COMMAND, "run", "job.yaml"], run_env(tmp_path),
                                      err.fileno())
    assert max(c.get("running", 0) for c in samples) <= 2, samples
    progress = [line for line in err_path.read_text().splitlines() if " done: " in line]
    assert max(running_shown(progress), default=0) <= 2, progress
    assert re.fullmatch(r"800/800 done: 800 succeeded; 0:\d\d elapsed", progress[-1]), progress
    steps = {"running": 1, "succeeded": -1}
    at_once = most = 0
    for record in journal(tmp_path / "runs" / "tiny"):  # in the order rank 0 counted them
        at_once += steps[record["state"]]
        most = max(most, at_once)
    # A worker says its next call started the moment a slot frees, while the end of the call before (its
    # outputs published and journaled on the worker, then sent) may still be on its way: rank 0 may count
    # that one running too, one a worker at most. A call sent ahead but not started never counts.
    assert most <= 2 + 2, most


# --- a walltime stop: the log says what happened -------------------------------------------------------------


def test_a_walltime_stop_is_told_as_interrupted_and_pending_never_as_failed(
        tmp_path: Path, runners: list[Runner]) -> None:
    starts = tmp_path / "starts"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: wall}}
        execution: {{max_workers: 2, kill_grace: 1}}
        tasks:
          - {{id: a, kind: shell, run: "echo a >> {q(starts)}; sleep 60"}}
          - {{id: b, kind: shell, run: "echo b >> {q(starts)}; sleep 60"}}
          - {{id: c, kind: shell, run: "true", depends_on: [a]}}
    """)
    run_dir = tmp_path / "runs" / "wall"
    first = Runner(tmp_path, "job.yaml")
    runners.append(first)
    wait_until("a and b run", lambda: starts.exists() and len(starts.read_text().split()) == 2, first)
    first.proc.send_signal(signal.SIGUSR1)  # Slurm's warning before the walltime; no grace: stop now
    assert first.wait() == 138, first.stderr()
    err = first.stderr().splitlines()
    assert re.fullmatch(r"0/3 done: 1 pending, 2 interrupted; 0:\d\d elapsed", err[-2]), err
    assert err[-1] == f"cmbagent-batch: 1 pending, 2 interrupted; run directory {run_dir}; report {run_dir}/report.html"
    assert "failed" not in first.stderr()
    # what the job script runs once the step has ended: the decision, said from run.json's counts
    res = cli(tmp_path, "_after-step", str(run_dir), "--exit-code", "138", "--requeue-max", "0", "--job-id", "41")
    assert (res.returncode, res.stderr) == (138, "cmbagent-batch: job 41: 3 tasks left (1 pending, 2 interrupted), "
                                                 "but the job was requeued 0 times already (limit 0); continue "
                                                 "with `cmbagent-batch submit`\n")


def test_after_a_step_that_finished_the_log_says_so_as_information(tmp_path: Path) -> None:
    write_spec(tmp_path, ONE_TASK)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    run_dir = tmp_path / "elsewhere" / "one"
    res = cli(tmp_path, "_after-step", str(run_dir), "--exit-code", "0", "--requeue-max", "2", "--job-id", "41")
    assert (res.returncode, res.stderr) == (0, "cmbagent-batch: job 41: the run finished (1 succeeded); "
                                               "nothing to requeue\n")


def test_after_a_runner_killed_without_a_word_the_log_counts_from_the_journal(
        tmp_path: Path, runners: list[Runner]) -> None:
    starts = tmp_path / "starts"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: killed}}
        execution: {{max_workers: 1}}
        tasks:
          - {{id: a, kind: shell, run: "true"}}
          - {{id: b, kind: shell, run: "echo b >> {q(starts)}; sleep 60", depends_on: [a]}}
          - {{id: c, kind: shell, run: "true", depends_on: [b]}}
    """)
    run_dir = tmp_path / "runs" / "killed"
    first = Runner(tmp_path, "job.yaml")
    runners.append(first)
    wait_until("b runs", starts.exists, first)
    os.killpg(first.proc.pid, signal.SIGKILL)  # the runner and its tasks: run.json still says "running"
    first.wait()
    res = cli(tmp_path, "_after-step", str(run_dir), "--exit-code", "137", "--requeue-max", "2", "--job-id", "41")
    assert (res.returncode, res.stderr) == (137, "cmbagent-batch: job 41: the run ended with exit code 137 (2 pending, "
                                                 "1 succeeded); only a walltime stop is requeued\n")
    status = json.loads(cli(tmp_path, "status", "--format", "json", str(run_dir), check=True).stdout)
    assert Tally.from_json(status["counts"]).text() == "2 pending, 1 succeeded"  # the same count as the log
