"""Brutal faults: a runner (or an MPI rank) killed with SIGKILL leaves no live task behind, ``status``
tells a dead runner from a live one, and a rerun never races the tasks of the run that died.

Real runs through the command line, real SIGKILLs, real ``mpiexec -n 3``."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.cli import COMMAND, cli, wait_until, write_spec
from tests.helpers.mpi_run import MPIEXEC, run_env, usage
from tests.helpers.runs import kept_work_dir, published, read_run, work_dir
from tests.helpers.scripted_llm import Delay, Reply, ScriptedLLM

pytestmark = pytest.mark.slow  # runs, each a CLI in a subprocess

TASKS = """
import os
import time


def nap(seconds, pids):
    with open(pids, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(seconds)
    return os.environ["CMBAGENT_ATTEMPT"]
"""


def job(tmp_path: Path, seconds: float, execution: str) -> Path:
    """Two shell tasks and two python tasks that record their pids and sleep, and a quick one."""
    pids = tmp_path / "pids"
    (tmp_path / "naps.py").write_text(textwrap.dedent(TASKS))
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: faults}}
        execution: {execution}
        tasks:
          - id: quick
            kind: shell
            run: echo "$CMBAGENT_ATTEMPT" > out.txt
            outputs: [out.txt]
          - id: sh-{{i}}
            kind: shell
            matrix: {{i: [1, 2]}}
            run: echo $$ >> {pids}; sleep {seconds}; echo "$CMBAGENT_ATTEMPT" > out.txt
            outputs: [out.txt]
          - id: py-{{i}}
            kind: python
            matrix: {{i: [1, 2]}}
            call: naps:nap
            args: {{seconds: {seconds}, pids: "{pids}"}}
    """)
    return tmp_path / "runs" / "faults"


def recorded_pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def live(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def background(tmp_path: Path, launcher: tuple[str, ...] = (), env: dict[str, str] | None = None,
               ) -> subprocess.Popen[bytes]:
    env = dict(run_env(tmp_path), **(env or {}))
    return subprocess.Popen([*launcher, *COMMAND, "run", "job.yaml", "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def assert_rerun_completes_once(tmp_path: Path, execution: str, launcher: tuple[str, ...] = ()) -> None:
    """The rerun (with short naps) succeeds; each output comes from one attempt; ``quick``, which had
    succeeded, does not run again."""
    run_dir = job(tmp_path, 0.2, execution)
    result = cli(tmp_path, "run", "job.yaml", "--quiet", env=run_env(tmp_path), launcher=launcher, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_run(run_dir)
    assert manifest["tasks"]["quick"]["attempts"] == 1
    for tid in ("sh-1", "sh-2"):
        attempt = manifest["tasks"][tid]["attempts"]
        assert (published(run_dir, tid) / "out.txt").read_text().strip() == str(attempt)
    for tid in ("py-1", "py-2"):
        attempt = manifest["tasks"][tid]["attempts"]
        assert json.loads((published(run_dir, tid) / "return.json").read_text()) == str(attempt)


def kill_when_running(tmp_path: Path, proc: subprocess.Popen[bytes], victim: int | None = None) -> list[int]:
    """SIGKILL ``victim`` (default: the runner) once the four sleeping tasks run; their pids."""
    wait_until("the four tasks run", lambda: len(recorded_pids(tmp_path)) >= 4, limit=60)
    os.kill(victim or proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return recorded_pids(tmp_path)


def test_a_sigkilled_runner_leaves_no_task_alive_and_status_says_so(tmp_path: Path) -> None:
    execution = "{max_workers: 5, kill_grace: 2}"
    run_dir = job(tmp_path, 60, execution)
    proc = background(tmp_path)
    wait_until("quick succeeded", lambda: (published(run_dir, "quick") / "out.txt").exists(), limit=60)
    pids = kill_when_running(tmp_path, proc)
    wait_until("no task process left", lambda: not live(pids), limit=15)
    status = cli(tmp_path, "status", str(run_dir), check=True).stdout
    assert "interrupted (runner gone since " in status.splitlines()[0], status
    assert "running" not in status
    assert_rerun_completes_once(tmp_path, execution)


@pytest.mark.parametrize("backend", ["local", pytest.param("mpi", marks=pytest.mark.skipif(
    MPIEXEC is None, reason="mpiexec not installed"))])
def test_a_rerun_waits_for_the_tasks_of_a_dead_run_to_end(tmp_path: Path, backend: str) -> None:
    """A task that takes its time to die on SIGTERM: the rerun started right after the SIGKILL of the
    runner (of rank 0, under MPI: its task runs on a worker rank) waits for it, and its work directory is
    never written by two attempts at once."""
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: stubborn}}
        execution: {{backend: {backend}, kill_grace: 3}}
        tasks:
          - id: stubborn
            kind: shell
            run: |
              trap 'echo "term $MARK" >> log.txt' TERM
              echo "start $MARK" >> log.txt
              for i in $(seq "${{NAPS:-600}}"); do sleep 0.1; done
              echo "end $MARK" >> log.txt
              cp log.txt out.txt
            outputs: [out.txt]
    """)
    launcher = (MPIEXEC, "-n", "3") if backend == "mpi" and MPIEXEC else ()
    run_dir = tmp_path / "runs" / "stubborn"
    proc = background(tmp_path, launcher, env={"MARK": "first"})

    def logs() -> dict[int, Path]:  # by rank: on rank 0 locally, on a worker rank under MPI
        return {r: log for r in range(3) if (log := work_dir(run_dir, "stubborn", r) / "log.txt").exists()}

    wait_until("the task runs", logs, limit=90)
    ((rank, _),) = logs().items()
    victim = rank_zero(proc) if launcher else proc.pid
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=60)
    env = dict(run_env(tmp_path), NAPS="3", MARK="second")
    result = cli(tmp_path, "run", "job.yaml", env=env, timeout=120, launcher=launcher)
    assert result.returncode == 0, result.stdout + result.stderr
    # Locally the dead runner's watchdog holds the run's lock; under MPI the worker rank's holds .tasks.lock.
    waited = "is gone; waiting for its tasks to be ended" if not launcher else "are still being ended; waiting"
    assert waited in result.stderr, result.stderr
    assert (published(run_dir, "stubborn") / "out.txt").read_text().split("\n")[:2] == ["start second", "end second"]
    old = (kept_work_dir(run_dir, "stubborn", rank) / "log.txt").read_text()
    assert old.split("\n")[:3] == ["start first", "term first", ""]  # ended before the rerun began


def rank_zero(proc: subprocess.Popen[bytes]) -> int:
    """The pid of rank 0 (it holds the run directory's lock) among the ranks ``mpiexec`` started."""
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "run" in p.cmdline() and any(f.path.endswith("/.lock") for f in p.open_files()):
                return p.pid  # not its watchdog, which holds the lock too
    raise AssertionError("no rank holds the lock")


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")
@pytest.mark.parametrize("victim", ["worker rank", "rank 0"])
def test_a_sigkilled_mpi_rank_ends_the_job_and_every_task(tmp_path: Path, victim: str) -> None:
    assert MPIEXEC is not None
    execution = "{backend: mpi, tasks_per_rank: 3, kill_grace: 2}"
    run_dir = job(tmp_path, 60, execution)
    proc = background(tmp_path, (MPIEXEC, "-n", "3"))
    wait_until("quick succeeded", lambda: (published(run_dir, "quick") / "out.txt").exists(), limit=90)
    ranks = sorted((p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "cmbagent_batch" in " ".join(p.cmdline()) and "run" in p.cmdline()),
                   key=lambda p: p.create_time())
    assert len(ranks) >= 3, ranks
    rank0 = rank_zero(proc)
    target = rank0 if victim == "rank 0" else next(p.pid for p in ranks if p.pid != rank0)
    pids = kill_when_running(tmp_path, proc, target)
    wait_until("no task process left", lambda: not live(pids), limit=20)
    assert not live([p.pid for p in ranks])
    time.sleep(0.5)
    assert_rerun_completes_once(tmp_path, execution, (MPIEXEC, "-n", "3"))


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_stops_the_run_and_a_rerun_with_space_resumes_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    side = tmp_path / "side.txt"  # outside the small file system: one line per task that did its work
    tasks = "".join(f"  - {{id: t{i:03d}, kind: shell, run: 'head -c 16384 /dev/zero > out.bin && "
                    f"echo t{i:03d} >> {side}', outputs: [out.bin]}}\n" for i in range(200))
    (tmp_path / "job.yaml").write_text("version: 1\njob: {name: full}\nexecution: {max_workers: 2}\ntasks:\n" + tasks)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(runs)], check=True)
    try:
        first = cli(tmp_path, "run", "job.yaml", "--quiet")
        assert first.returncode == 1, first.stdout + first.stderr
        assert "Traceback" not in first.stderr and "internal error" not in first.stderr, first.stderr
        assert (f"cmbagent-batch: stopped: the file system holding {runs / 'full'} (mounted at {runs}) is full "
                "or over its quota") in first.stderr
        assert "then run the same command again: it continues where this run stopped" in first.stderr
        done_before = side.read_text().split()
        assert 0 < len(done_before) < 200
        subprocess.run(["mount", "-o", "remount,size=64m", str(runs)], check=True)
        second = cli(tmp_path, "run", "job.yaml", "--quiet")
        assert second.returncode == 0, second.stdout + second.stderr
        lines = side.read_text().split()
        assert sorted(set(lines)) == [f"t{i:03d}" for i in range(200)]
        assert len(lines) == 200, "a task that had succeeded ran again"
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


AGENTS = 10  # agent tasks among the DAG's 200, each one model call (to the scripted endpoint)


def layered_dag(tmp_path: Path, side: Path, url: str, levels: int = 10, width: int = 20) -> None:
    """A 200-task DAG: each task depends on two of the level before. Shell tasks sleep a little, fail their
    first attempt one time in five (``retries: 2``) and append their id to ``side`` as their last act; the
    first ``AGENTS`` tasks of level 5 are agent tasks whose model call takes 0.3 s."""
    rng = random.Random(7)
    lines = ["version: 1", "job: {name: brutal}", "execution: {max_workers: 4, retries: 2, retry_backoff: 0, "
             "kill_grace: 1}",
             "llm:", "  default_model: m", "  models:", "    m:", "      model: test-model",
             f"      base_url: {url}", "      api_key_env: TEST_LLM_KEY", "      timeout: 30",
             "      max_retries: 0", "      price: {prompt_per_1m: 1.0, completion_per_1m: 2.0}", "tasks:"]
    for lv in range(levels):
        for i in range(width):
            tid = f"l{lv:02d}-{i:02d}"
            deps = sorted({f"l{lv - 1:02d}-{rng.randrange(width):02d}" for _ in range(2)}) if lv else []
            flaky = rng.random() < 0.2
            fail = '[ "$CMBAGENT_ATTEMPT" = 1 ] && exit 3; ' if flaky else ""
            run = f"sleep 0.{rng.randrange(1, 3)}{rng.randrange(10)}; {fail}echo {tid} >> {side}; echo {tid} > out.txt"
            if lv == 5 and i < AGENTS:
                lines.append(f"  - {{id: {tid}, kind: agent, agent: researcher, instructions: 'SUM: {tid}', "
                             f"outputs: [out.txt], depends_on: {deps}}}")
                continue
            lines.append(f"  - {{id: {tid}, kind: shell, run: '{run}', outputs: [out.txt], depends_on: {deps}}}")
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")


def journal_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "journal" / "rank-0000.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):  # a torn last line
            records.append(json.loads(line))
    return records


def succeeded_in_journal(run_dir: Path) -> set[str]:
    return {r["task"] for r in journal_records(run_dir) if r.get("state") == "succeeded"}


def test_sigkills_at_random_moments_never_rerun_a_journaled_success(tmp_path: Path) -> None:
    with ScriptedLLM(lambda body: Delay(0.3, Reply(answer(body), usage=usage(20, 5)))) as srv:
        sigkills_at_random_moments(tmp_path, srv.base_url)


def answer(body: Any) -> str:
    """The agent's answer: its task id, as the shell tasks write theirs."""
    text = json.dumps(body)
    return text[text.index("SUM: ") + 5:].split("\\", 1)[0].split('"', 1)[0].strip()


def sigkills_at_random_moments(tmp_path: Path, url: str) -> None:
    side = tmp_path / "side.txt"
    layered_dag(tmp_path, side, url)
    run_dir = tmp_path / "runs" / "brutal"
    rng = random.Random(11)
    for _ in range(5):
        counts_before = Counter(side.read_text().split()) if side.exists() else Counter()
        journaled_before = succeeded_in_journal(run_dir)
        proc = background(tmp_path)
        time.sleep(rng.uniform(0.5, 2.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        wait_until("no task process left", lambda: not task_processes(tmp_path), limit=15)
        counts_after = Counter(side.read_text().split()) if side.exists() else Counter()
        for tid in journaled_before:  # a success journaled before this run never ran again
            assert counts_after[tid] == counts_before[tid], tid
        status = cli(tmp_path, "status", str(run_dir)).stdout
        if status:
            assert " running" not in status, status
        if (run_dir / "ledger.jsonl").exists():
            verify = cli(tmp_path, "ledger", "verify", str(run_dir / "ledger.jsonl"))
            assert verify.returncode == 0, verify.stdout + verify.stderr
    assert len(succeeded_in_journal(run_dir)) < 200  # the kills came while there was work left
    final = cli(tmp_path, "run", "job.yaml", "--quiet", env=run_env(tmp_path), timeout=180)
    assert final.returncode == 0, final.stdout + final.stderr
    assert succeeded_in_journal(run_dir) == {f"l{lv:02d}-{i:02d}" for lv in range(10) for i in range(20)}
    successes = Counter(r["task"] for r in journal_records(run_dir) if r.get("state") == "succeeded")
    assert set(successes.values()) == {1}, successes.most_common(3)  # every task succeeded exactly once
    manifest = read_run(run_dir)
    assert {t["state"] for t in manifest["tasks"].values()} <= {"succeeded", "skipped"}
    assert len(Counter(side.read_text().split())) == 200 - AGENTS
    verify = cli(tmp_path, "ledger", "verify", str(run_dir / "ledger.jsonl"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    calls = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert {c["task"] for c in calls if c["status"] == "ok"} == {f"l05-{i:02d}" for i in range(AGENTS)}
    for tid in manifest["tasks"]:  # each output comes from one whole attempt
        assert (published(run_dir, tid) / "out.txt").read_text().strip() == tid
    assert not task_processes(tmp_path)


def task_processes(tmp_path: Path) -> list[int]:
    """Live processes whose working directory is inside ``tmp_path`` (the tasks', the runner's)."""
    found = []
    for p in psutil.process_iter(["pid", "cwd", "status"]):
        cwd = p.info.get("cwd") or ""
        if cwd.startswith(str(tmp_path)) and p.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(p.info["pid"])
    return found


WATCHED = """
import os, signal, subprocess, sys, time
from cmbagent_batch import watchdog

dog = watchdog.start(1.0)
task = subprocess.Popen(["sleep", "60"], start_new_session=True)
watchdog.track(task.pid)
if os.fork() == 0:  # a fork of the runner (a task's fork pool) holds the watchdog's pipe open
    time.sleep(60)
    os._exit(0)
print(task.pid, flush=True)
time.sleep(0.5)  # the watchdog has read the registration
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_watchdog_sees_its_runner_die_even_while_a_fork_holds_its_pipe(tmp_path: Path) -> None:
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    out = tmp_path / "out.txt"
    with open(out, "w") as fh:  # not a pipe: the fork keeps its copy of it
        proc = subprocess.Popen([sys.executable, str(script)], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.wait(timeout=60) == -signal.SIGKILL, out.read_text()
    task = int(out.read_text().split()[0])
    try:
        wait_until("the task's group is ended", lambda: not live([task]), limit=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the fork
