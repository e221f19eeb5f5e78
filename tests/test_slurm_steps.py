"""The Slurm job steps of placed tasks: each step's rank 0 notes its id for the task's end record, and a
timeout or a stop ends the task's steps on every node (``scancel``), against fake ``srun``/``squeue``/
``scancel``, for shell tasks and for python tasks (in a worker process, and in a thread); and for real,
``run --backend local`` inside an allocation of the local Slurm (``slurm/local-cluster.sh``): tasks of
several ranks as separate steps, at once where they fit, held where they do not, a step ended at its
task's timeout (a shell task's, a python task's), ``status`` naming the steps, and ``plan`` showing the
allocation's inventory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.attempt import Attempt, Outcome, Payload, TaskContext
from cmbagent_batch.backends.processes import WorkerProcesses
from cmbagent_batch.place.booking import Placement
from cmbagent_batch.place.launch import STEP_NOTE, STEP_NOTES, InSlurm, Local, Step, launch_env
from cmbagent_batch.spec.model import Resources
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.python import run_python
from cmbagent_batch.tasks.shell import run_shell, terminate_all
from cmbagent_batch.tasks.workdir import prepare
from tests.helpers.cli import cli
from tests.helpers.mpi_run import run_env
from tests.helpers.slurm_cluster import env_for, wait_job_end

SQUEUE = "squeue --noheader --steps --jobs=12 --format=%i %j"


def test_the_steps_a_launch_prefix_starts_are_read_from_it() -> None:
    r = Resources(ranks=2)
    p = Placement(("nid001",), ((0, 1),), ((),), None, 2)
    prefix = launch_env(p, r, InSlurm("12"), task_id="fit chain", attempt=3)["CMBAGENT_LAUNCH"]
    assert prefix.endswith(f"--exact --kill-on-bad-exit=1 sh {STEP_NOTE}")
    assert Step.of_launch(prefix) == Step("12", "cmbagent-batch:fit_chain:3")
    local = launch_env(p, r, Local("/venv/bin/python", "/venv/bin/mpiexec"), task_id="t", attempt=1)
    assert Step.of_launch(local["CMBAGENT_LAUNCH"]) is None


# -- the supervision of a task's steps, with fake Slurm commands --------------------------------------------------


def executable(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


class FakeSlurm:
    """``srun`` that runs its program as rank 0 of step 12.N (N from 3 up), and ``squeue`` (listing the steps
    in ``listed``) and ``scancel`` that log their calls."""

    def __init__(self, tmp_path: Path, squeue_code: int = 0) -> None:
        self.bin, self.log, self.listed = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "listed"
        self.bin.mkdir()
        counter = tmp_path / "next-step"
        executable(self.bin / "srun", textwrap.dedent(f"""\
            echo srun >> {self.log}
            while [ $# -gt 0 ]; do case $1 in --*) shift ;; *) break ;; esac; done
            n=$(cat {counter} 2>/dev/null || echo 3); echo $((n + 1)) > {counter}
            SLURM_PROCID=0 SLURM_JOB_ID=12 SLURM_STEP_ID=$n exec "$@\""""))
        executable(self.bin / "squeue", f'echo "squeue $*" >> {self.log}\ncat {self.listed} 2>/dev/null\n'
                                        f"[ {squeue_code} = 0 ] || echo 'squeue: error: slurm_load_jobs error' >&2\n"
                                        f"exit {squeue_code}")
        executable(self.bin / "scancel", f'echo "scancel $*" >> {self.log}')

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    slurm = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{slurm.bin}{os.pathsep}{os.environ['PATH']}")  # squeue and scancel, for the runner
    return slurm


def placed_ctx(tmp_path: Path, task: str = "t1") -> TaskContext:
    """A task of 2 ranks placed inside allocation 12, its work directory made."""
    r = Resources(ranks=2)
    env = launch_env(Placement(("vm",), ((0, 1),), ((),), None, 2), r, InSlurm("12"), task_id=task, attempt=1)
    ctx = TaskContext(task, str(tmp_path / "run"), str(tmp_path / "run" / "work" / task), 0, 1, "vm",
                      launch=tuple(env.items()))
    prepare(ctx)
    return ctx


def shell(ctx: TaskContext, script: str, timeout: float | None = None) -> Outcome:
    payload = Payload(id=ctx.task_id, kind="shell", run=script, timeout=timeout)
    return run_shell(payload, ctx, {"PATH": os.environ["PATH"], "LANG": "C"}, kill_grace=0.5)


def stderr_log(ctx: TaskContext) -> str:
    return Path(ctx.logs_dir, "stderr.log").read_text()


def test_each_step_notes_its_id_and_the_task_s_end_names_them(tmp_path: Path, fake: FakeSlurm) -> None:
    ctx = placed_ctx(tmp_path)
    Path(ctx.work_dir, STEP_NOTES).write_text("11.9\n")  # left by an attempt whose runner died
    out = shell(ctx, "$CMBAGENT_LAUNCH echo one && $CMBAGENT_LAUNCH echo two")
    assert (out.ok, out.steps) == (True, ("12.3", "12.4"))
    assert fake.calls() == ["srun", "srun"]  # no squeue or scancel when nothing is ended
    assert not Path(ctx.work_dir, STEP_NOTES).exists()


def test_at_its_timeout_a_task_s_step_is_signalled_then_cancelled_on_every_node(tmp_path: Path,
                                                                                  fake: FakeSlurm) -> None:
    ctx = placed_ctx(tmp_path)
    fake.listed.write_text("12.2 other\n12.3 cmbagent-batch:t1:1\n12.batch batch\n")
    out = shell(ctx, "$CMBAGENT_LAUNCH sh -c 'trap \"\" TERM; sleep 30'", timeout=1)
    assert out.error == "timed out after 1 s (process group killed; job step 12.3 ended on every node)"
    assert (out.timed_out, out.steps) == (True, ("12.3",))
    assert fake.calls() == ["srun", SQUEUE, "scancel --signal=TERM 12.3", SQUEUE, "scancel 12.3"]


def test_a_stop_ends_a_task_s_step_on_every_node(tmp_path: Path, fake: FakeSlurm) -> None:
    ctx = placed_ctx(tmp_path)
    fake.listed.write_text("12.3 cmbagent-batch:t1:1\n")
    ended: list[Outcome] = []
    worker = threading.Thread(target=lambda: ended.append(shell(ctx, "$CMBAGENT_LAUNCH sleep 30")))
    worker.start()
    notes = Path(ctx.work_dir, STEP_NOTES)
    deadline = time.monotonic() + 30
    while not (notes.exists() and notes.read_text()):
        assert time.monotonic() < deadline, "the step never noted its id"
        time.sleep(0.05)
    assert terminate_all(0.5) == 1
    worker.join(30)
    assert (ended[0].error, ended[0].steps) == (OutcomeReason.TERMINATED_BY_RUNNER.message, ("12.3",))
    assert fake.calls() == ["srun", SQUEUE, "scancel --signal=TERM 12.3", SQUEUE, "scancel 12.3"]


def test_a_squeue_that_fails_is_a_warning_in_the_error_and_the_stderr_log(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    failing = FakeSlurm(tmp_path, squeue_code=1)
    monkeypatch.setenv("PATH", f"{failing.bin}{os.pathsep}{os.environ['PATH']}")
    ctx = placed_ctx(tmp_path)
    out = shell(ctx, "$CMBAGENT_LAUNCH sleep 30", timeout=1)
    problem = (f"finding job step cmbagent-batch:t1:1: `{SQUEUE}` failed (exit 1): "
               "squeue: error: slurm_load_jobs error")
    assert out.error == f"timed out after 1 s (process group killed); warning: {problem}"
    assert out.steps == ("12.3",)  # noted by the step itself
    assert stderr_log(ctx).endswith(f"cmbagent-batch: warning: {problem}\n")


# -- python tasks: the function starts its ranks with subprocess and $CMBAGENT_LAUNCH -------------------------------

RANKS = """\
import os, shlex, signal, subprocess


def launch():
    return shlex.split(os.environ["CMBAGENT_LAUNCH"])


def two():
    for word in ("one", "two"):
        subprocess.run([*launch(), "echo", word], check=True)


def stuck():
    subprocess.run([*launch(), "sh", "-c", "trap '' TERM; sleep 30"], check=True)


def deaf():  # its call never returns to Python at its timeout
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    stuck()


def threaded(ctx):
    env = {**os.environ, **dict(ctx.launch)}
    subprocess.run([*shlex.split(env["CMBAGENT_LAUNCH"]), "sh", "-c", "echo $$ > ranks.pid; exec sleep 30"],
                   env=env, cwd=ctx.work_dir, check=True)
"""
TERM_THEN_KILL = [SQUEUE, "scancel --signal=TERM 12.3"]


def python_attempt(tmp_path: Path, call: str, timeout: float | None = None) -> Attempt:
    """Attempt 1 of python task t1, placed as ``placed_ctx`` says, to run in a worker process; the task's
    PATH (where its function finds srun, and its worker squeue and scancel) is this process's."""
    (tmp_path / "ranks.py").write_text(RANKS)
    payload = Payload("t1", "python", call=f"ranks:{call}", timeout=timeout, python_path=(str(tmp_path),),
                      env={"PATH": os.environ["PATH"]})
    return Attempt(payload, placed_ctx(tmp_path), (), {}, True, (), kill_grace=0.5)


def in_worker(attempt: Attempt) -> Outcome:
    workers = WorkerProcesses(1)
    try:
        outcome: Outcome = workers.submit_attempts([attempt], single=True).result(timeout=60)
        return outcome
    finally:
        workers.shutdown()


def wait_for_note(under: Path) -> None:
    """Until the step's rank 0 has noted its id (in a worker's scratch directory, or in the work directory)."""
    deadline = time.monotonic() + 30
    while not any(p.read_text() for p in under.rglob("slurm-steps")):
        assert time.monotonic() < deadline, "the step never noted its id"
        time.sleep(0.05)


def assert_signalled_then_cancelled(calls: list[str]) -> None:
    """SIGTERM to the step, squeue asked until kill_grace had passed, then the step cancelled."""
    assert calls[:3] == ["srun", *TERM_THEN_KILL], calls
    assert calls[-2:] == [SQUEUE, "scancel 12.3"], calls
    assert set(calls[3:-1]) == {SQUEUE}, calls


def test_the_steps_a_python_task_starts_are_named_in_its_end(tmp_path: Path, fake: FakeSlurm) -> None:
    out = in_worker(python_attempt(tmp_path, "two"))
    assert (out.ok, out.steps) == (True, ("12.3", "12.4"))
    assert fake.calls() == ["srun", "srun"]  # no squeue or scancel when nothing is ended
    assert not list((tmp_path / "run").rglob("slurm-steps"))


def test_at_a_python_task_s_timeout_its_step_is_signalled_then_cancelled_on_every_node(tmp_path: Path,
                                                                                         fake: FakeSlurm) -> None:
    fake.listed.write_text("12.2 other\n12.3 cmbagent-batch:t1:1\n12.batch batch\n")
    out = in_worker(python_attempt(tmp_path, "stuck", timeout=1))
    assert out.error == "timed out after 1 s (python call interrupted; job step 12.3 ended on every node)"
    assert (out.timed_out, out.steps) == (True, ("12.3",))
    assert_signalled_then_cancelled(fake.calls())


def test_a_python_task_s_step_that_ends_at_sigterm_is_not_cancelled(tmp_path: Path, fake: FakeSlurm) -> None:
    fake.listed.write_text("12.3 cmbagent-batch:t1:1\n")
    executable(fake.bin / "scancel", f'echo "scancel $*" >> {fake.log}\n: > {fake.listed}')  # the step ends
    out = in_worker(python_attempt(tmp_path, "stuck", timeout=1))
    assert out.error == "timed out after 1 s (python call interrupted; job step 12.3 ended on every node)"
    assert fake.calls() == ["srun", *TERM_THEN_KILL, SQUEUE, SQUEUE]


def test_a_python_call_that_never_returns_has_its_step_cancelled_with_its_worker(tmp_path: Path,
                                                                                  fake: FakeSlurm) -> None:
    fake.listed.write_text("12.3 cmbagent-batch:t1:1\n")
    out = in_worker(python_attempt(tmp_path, "deaf", timeout=1))
    assert out.error == ("timed out after 1 s (the call did not return to Python: its worker process was killed "
                         "0.5 s later; job step 12.3 ended on every node)")
    assert (out.timed_out, out.steps) == (True, ("12.3",))
    assert fake.calls() == ["srun", SQUEUE, "scancel 12.3"]


def test_a_stop_ends_a_python_task_s_step_on_every_node(tmp_path: Path, fake: FakeSlurm) -> None:
    fake.listed.write_text("12.3 cmbagent-batch:t1:1\n")
    workers = WorkerProcesses(1)
    try:
        future = workers.submit_attempts([python_attempt(tmp_path, "stuck")], single=True)
        wait_for_note(tmp_path / "run")
        workers.terminate(0.5)
        out: Outcome = future.result(timeout=60)
    finally:
        workers.shutdown()
    assert (out.error, out.reason, out.steps) == (OutcomeReason.TERMINATED_BY_RUNNER.message,
                                                  OutcomeReason.TERMINATED_BY_RUNNER, ("12.3",))
    assert_signalled_then_cancelled(fake.calls())


def test_a_stop_ends_the_steps_of_a_python_call_in_a_thread(tmp_path: Path, fake: FakeSlurm) -> None:
    (tmp_path / "ranks.py").write_text(RANKS)
    ctx = placed_ctx(tmp_path)
    fake.listed.write_text("12.3 cmbagent-batch:t1:1\n")
    pid = Path(ctx.work_dir, "ranks.pid")  # a plain scancel kills the step's one rank
    executable(fake.bin / "scancel", f'echo "scancel $*" >> {fake.log}\n'
                                     f'case $1 in --signal=*) ;; *) kill -KILL "$(cat {pid})" ;; esac')
    payload = Payload("t1", "python", call="ranks:threaded", python_path=(str(tmp_path),))
    ended: list[Outcome] = []
    call = threading.Thread(target=lambda: ended.append(run_python(payload, ctx, False, kill_grace=0.5)))
    call.start()
    wait_for_note(Path(ctx.work_dir))
    assert terminate_all(0.5) == 1
    call.join(30)
    assert (ended[0].error, ended[0].reason, ended[0].steps) == (OutcomeReason.TERMINATED_BY_RUNNER.message,
                                                                 OutcomeReason.TERMINATED_BY_RUNNER, ("12.3",))
    assert_signalled_then_cancelled(fake.calls())


def test_a_squeue_that_fails_at_a_python_task_s_timeout_is_a_warning_in_its_error_and_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = FakeSlurm(tmp_path, squeue_code=1)
    monkeypatch.setenv("PATH", f"{failing.bin}{os.pathsep}{os.environ['PATH']}")
    attempt = python_attempt(tmp_path, "stuck", timeout=1)
    out = in_worker(attempt)
    problem = (f"finding job step cmbagent-batch:t1:1: `{SQUEUE}` failed (exit 1): "
               "squeue: error: slurm_load_jobs error")
    assert out.error == f"timed out after 1 s (python call interrupted); warning: {problem}"
    assert out.steps == ("12.3",)  # noted by the step itself
    assert stderr_log(attempt.ctx).endswith(f"cmbagent-batch: warning: {problem}\n")


# -- for real, inside an allocation of the local Slurm ---------------------------------------------------------

# Each rank of a pair writes its step, the step's size as MPI and Slurm see it, and when it ran.
PAIR = ("from mpi4py import MPI; import json, os, sys, time; t0 = time.time(); time.sleep(3); "
        "sys.stdout.write(json.dumps([os.environ['SLURM_STEP_ID'], MPI.COMM_WORLD.Get_size(), "
        "int(os.environ['SLURM_NTASKS']), t0, time.time()]) + chr(10))")
SPEC = """\
version: 1
job: {{name: steps, run_dir: ./run}}
execution: {{max_workers: 4, kill_grace: 2, keep_going: true}}
tasks:
  - id: pair-{{i}}
    kind: shell
    matrix: {{i: [1, 2]}}
    run: $CMBAGENT_LAUNCH {python} -c {pair}
    resources: {{ranks: 2}}
    estimate: 3
  - id: quad
    kind: shell
    run: $CMBAGENT_LAUNCH {python} -c {quad}
    resources: {{ranks: 4}}
    estimate: 1
  - id: stuck
    kind: shell
    run: $CMBAGENT_LAUNCH sh -c 'trap "" TERM; exec sleep 3007'
    timeout: 3
    resources: {{ranks: 2}}
    estimate: 0.5
"""
QUAD = ("from mpi4py import MPI; import os, sys; sys.stdout.write(os.environ['SLURM_STEP_ID'] + ' ' "
        "+ str(MPI.COMM_WORLD.Get_size()) + ' ' + os.environ['SLURM_NTASKS'] + chr(10))")
# The runner in the batch script, outside any step; a watcher saves Slurm's view once both pairs' steps run,
# and what is left of the steps and of the sleeping ranks once the run is over.
JOB = """\
#!/bin/bash
#SBATCH --nodes=1 --ntasks=4 --time=5 --output={out}
( for _ in $(seq 300); do
    if [ "$(squeue --steps --noheader -j $SLURM_JOB_ID -o '%j' | grep -c cmbagent-batch:pair)" = 2 ]; then
      scontrol show step > scontrol-during.txt; break
    fi
    sleep 0.1
  done ) &
{python} -m cmbagent_batch plan job.yaml > plan.txt
{python} -m cmbagent_batch run job.yaml --backend local
echo "run exit code $?"
squeue --steps --noheader -j $SLURM_JOB_ID -o '%i %j' > steps-after.txt
pgrep -f 'sleep 3007' > sleeping-after.txt
wait
"""


def completed_job(tmp_path: Path, slurm_conf: str, script: str) -> tuple[str, str, dict[str, str]]:
    """Submit ``script`` (given its output file and this interpreter) from ``tmp_path``, and wait for the job
    to complete: its id, what it said, and the environment that reaches the cluster."""
    out = tmp_path / "job.out"
    (tmp_path / "job.sh").write_text(script.format(out=out, python=shlex.quote(sys.executable)))
    env = env_for(run_env(tmp_path), slurm_conf)
    sub = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), str(tmp_path / "job.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    end = wait_job_end(job, env, 240)
    said = out.read_text()
    assert end["JobState"] == "COMPLETED", said
    return job, said, env


def journal(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tasks_of_several_ranks_run_as_job_steps_held_where_they_do_not_fit_and_ended_at_their_timeout(
        tmp_path: Path, slurm_conf: str) -> None:
    pytest.importorskip("mpi4py", reason="the ranks' program needs the 'mpi' extra (mpi4py, mpich)")
    python = shlex.quote(sys.executable)
    (tmp_path / "job.yaml").write_text(SPEC.format(python=python, pair=json.dumps(PAIR), quad=json.dumps(QUAD)))
    job, said, env = completed_job(tmp_path, slurm_conf, JOB)
    assert "run exit code 1" in said, said  # stuck timed out; the others succeeded
    run_dir = tmp_path / "run"
    records = journal(run_dir)
    ends = {r["task"]: r for r in records if r["state"] in ("succeeded", "failed")}
    starts = {r["task"]: r for r in records if r["state"] == "running"}
    assert {task: r["state"] for task, r in ends.items()} == {
        "pair-1": "succeeded", "pair-2": "succeeded", "quad": "succeeded", "stuck": "failed"}, said
    steps = {task: r["steps"] for task, r in ends.items()}
    assert all(len(ids) == 1 and ids[0].startswith(f"{job}.") for ids in steps.values()), steps
    assert len({ids[0] for ids in steps.values()}) == 4  # each task its own step

    def ranks(task: str) -> list[Any]:
        work = run_dir / "ranks" / "rank-0000" / "tasks"
        log = next(work.glob(f"*/{task}/logs/stdout.log")).read_text().splitlines()
        return [line for line in log if not line.startswith("# attempt")]

    pairs = {task: [json.loads(line) for line in ranks(task)] for task in ("pair-1", "pair-2")}
    for task, lines in pairs.items():  # two ranks of the task's own step, which has two tasks
        assert [(f"{job}.{step}", size, ntasks) for step, size, ntasks, _, _ in lines] == [
            (steps[task][0], 2, 2)] * 2, lines
    # The pairs ran at once: each started before the other ended (as journaled, and as their ranks saw it).
    assert starts["pair-1"]["t"] < ends["pair-2"]["t"] and starts["pair-2"]["t"] < ends["pair-1"]["t"]
    assert max(r[3] for r in pairs["pair-1"]) < min(r[4] for r in pairs["pair-2"])
    assert max(r[3] for r in pairs["pair-2"]) < min(r[4] for r in pairs["pair-1"])
    # The 4-rank task was held until both had ended, and its step has its own 4 ranks.
    assert starts["quad"]["t"] >= max(ends["pair-1"]["t"], ends["pair-2"]["t"])
    assert sorted(ranks("quad")) == [f"{steps['quad'][0].split('.')[1]} 4 4"] * 4
    # The step of the task that timed out ignored SIGTERM, and was ended all the same.
    stuck = steps["stuck"][0]
    assert ends["stuck"]["error"] == f"timed out after 3 s (process group killed; job step {stuck} ended on every node)"
    assert (tmp_path / "steps-after.txt").read_text().split() == [f"{job}.batch", "batch"]
    assert (tmp_path / "sleeping-after.txt").read_text() == ""
    assert not list(run_dir.glob("ranks/*/tasks/*/*/logs/slurm-steps"))
    during = (tmp_path / "scontrol-during.txt").read_text()
    assert f"StepId={steps['pair-1'][0]} " in during and f"StepId={steps['pair-2'][0]} " in during, during
    status = cli(tmp_path, "status", str(run_dir), env=env)
    assert status.returncode == 0, status.stderr
    placement = ends["stuck"]["placement"]
    inventory = f"1 node ({placement['hosts'][0]}): 4 CPUs, no GPU, memory not counted (slurm)"
    assert f"cmbagent-batch: inventory: {inventory}" in said
    assert f"Inventory: {inventory}" in (tmp_path / "plan.txt").read_text().splitlines()
    assert (f"      on {placement['hosts'][0]} cores {placement['cores'][0]}, job step {stuck}: "
            f"srun --jobid={job} --job-name=cmbagent-batch:stuck:1 ") in status.stdout, status.stdout
    # What Slurm says of the job and its task steps, for the record (-s shows it).
    print(f"\n--- scontrol show step, while both pairs ran:\n{during}")
    print(f"--- sacct -c -j {job}:")
    print(subprocess.run(["sacct", "-c", "-j", job], env=env, capture_output=True, text=True, timeout=60).stdout)
    print(f"--- the tasks' step ids: {json.dumps(steps)}")


PYTHON_SPEC = """\
version: 1
job: {name: python-steps, run_dir: ./run}
execution: {max_workers: 2, kill_grace: 2, keep_going: true}
tasks:
  - id: chain
    kind: python
    call: chain:run
    timeout: 3
    resources: {ranks: 2}
"""
CHAIN = """\
import os, shlex, subprocess


def run():
    launch = shlex.split(os.environ["CMBAGENT_LAUNCH"])
    subprocess.run([*launch, "sh", "-c", "trap '' TERM; exec sleep 3011"], check=True)
"""
# The runner in the batch script; a watcher saves Slurm's view of the task's step while it runs. Once the run
# is over: its sleeping ranks left (none: the plain scancel killed them), then, once slurmctld has dropped
# the step (its srun was killed with the interrupted call, so the step's end waits for slurmstepd to give
# up on it), what squeue and scontrol show.
PYTHON_JOB = """\
#!/bin/bash
#SBATCH --nodes=1 --ntasks=2 --time=5 --output={out}
( for _ in $(seq 300); do
    if squeue --steps --noheader -j $SLURM_JOB_ID -o '%j' | grep -q cmbagent-batch:chain; then
      scontrol show step > scontrol-during.txt; break
    fi
    sleep 0.1
  done ) &
{python} -m cmbagent_batch run job.yaml --backend local
echo "run exit code $?"
pgrep -f 'sleep 3011' > sleeping-after.txt
for _ in $(seq 1200); do
  squeue --steps --noheader -j $SLURM_JOB_ID -o '%j' | grep -q cmbagent-batch:chain || break
  sleep 0.1
done
echo "step dropped after $SECONDS s"
squeue --steps --noheader -j $SLURM_JOB_ID -o '%i %j' > steps-after.txt
scontrol show step > scontrol-after.txt 2>&1
wait
"""


@pytest.mark.slow
def test_a_python_task_s_ranks_run_as_a_job_step_ended_at_its_timeout_and_named_in_its_end(
        tmp_path: Path, slurm_conf: str) -> None:
    (tmp_path / "job.yaml").write_text(PYTHON_SPEC)
    (tmp_path / "chain.py").write_text(CHAIN)
    job, said, _ = completed_job(tmp_path, slurm_conf, PYTHON_JOB)
    assert "run exit code 1" in said, said
    ends = [r for r in journal(tmp_path / "run") if r["task"] == "chain" and r["state"] == "failed"]
    assert len(ends) == 1, said
    steps = ends[0]["steps"]
    assert len(steps) == 1 and steps[0].startswith(f"{job}."), ends[0]
    assert ends[0]["error"] == f"timed out after 3 s (python call interrupted; job step {steps[0]} ended on every node)"
    during = (tmp_path / "scontrol-during.txt").read_text()
    assert f"StepId={steps[0]} " in during and "NodeList=" in during, during
    assert (tmp_path / "steps-after.txt").read_text().split() == [f"{job}.batch", "batch"]
    assert f"StepId={steps[0]} " not in (tmp_path / "scontrol-after.txt").read_text()
    assert (tmp_path / "sleeping-after.txt").read_text() == ""
    assert not list((tmp_path / "run").glob("ranks/*/tasks/*/*/logs/slurm-steps"))
    print(f"\n--- scontrol show step, while the python task's ranks ran:\n{during}")
    print(f"--- its end record: {json.dumps(ends[0]['steps'])}: {ends[0]['error']}")
