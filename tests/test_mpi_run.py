"""``run --backend mpi`` under real ``mpiexec`` (PyPI mpich + mpi4py): rank 0 schedules, the other ranks run
shell, python and agent tasks (AG2 + openai against the scripted endpoint), every rank journals what it
finished, and rank 0 merges one run.json and one ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import COMMAND, cli, wait_until
from tests.helpers.mpi_run import MIXED, MPIEXEC, manifest, mpirun, run_env, usage, write
from tests.helpers.runs import published, work_dir
from tests.helpers.scripted_llm import Reply, ScriptedLLM

pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
pytestmark = [pytest.mark.slow,  # runs under mpiexec
              pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")]


def slow_reply(body: Any) -> Reply:
    time.sleep(0.5)  # both agents are in flight at once: one lands on each worker rank
    return Reply("a thought", usage=usage(1000, 100))


def test_a_mixed_dag_runs_on_the_worker_ranks_with_one_ledger(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "mixed"
    with ScriptedLLM(slow_reply) as srv:
        path = write(tmp_path, MIXED.format(url=srv.base_url, run_dir=run_dir))
        result = mpirun(tmp_path, 3, "run", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    m = manifest(run_dir)
    assert (m["backend"], m["ranks"]) == ("mpi", 3)
    tasks = m["tasks"]
    assert set(t["state"] for t in tasks.values()) == {"succeeded"}
    assert {t["rank"] for t in tasks.values()} == {1, 2}
    for tid, t in tasks.items():
        assert t["work_dir"] == str(work_dir(run_dir, tid, t["rank"]))
        assert t["host"]
    # outputs from both ranks, in one outputs/ tree; the dependent found them
    parts = [(published(run_dir, f"gen-{i}") / "part.txt").read_text().split() for i in range(1, 7)]
    assert {p[0] for p in parts} == {"1", "2"}
    assert all(p[0] == p[1] for p in parts)  # a task sees its own rank's environment, not rank 0's
    merged = (published(run_dir, "merge") / "merged.txt").read_text().split()
    assert {"gen-1", "square-4", "think-2"} <= set(merged)
    result_json = json.loads((published(run_dir, "square-3") / "return.json").read_text())
    assert result_json["square"] == 9 and result_json["rank"] in (1, 2)
    # every rank journaled what it ran; one ledger, entries from both ranks, intact
    assert {p.name for p in (run_dir / "journal").iterdir()} >= {"rank-0000.jsonl"}
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 2 and {e["rank"] for e in ledger} == {1, 2}
    assert m["ledger"]["entries"] == 2
    verify = cli(tmp_path, "ledger", "verify", str(run_dir / "ledger.jsonl"), timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


FAILING = """\
version: 1
job: {name: failing}
execution: {backend: mpi, keep_going: true}
tasks:
  - id: boom-{i}
    kind: python
    matrix: {i: [1, 2, 3, 4, 5, 6]}
    call: mpitasks:boom
    args: {x: "{i}"}
  - id: shell-{i}
    kind: shell
    matrix: {i: [1, 2, 3, 4]}
    run: sleep 0.2; if [ "$CMBAGENT_RANK" = 2 ]; then echo "bad rank" >&2; exit 7; fi
"""


def test_a_failure_on_a_worker_rank_says_where_and_the_job_goes_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "failing"
    result = mpirun(tmp_path, 3, "run", str(write(tmp_path, FAILING)))
    assert result.returncode == 1, result.stdout + result.stderr
    tasks = manifest(run_dir)["tasks"]
    failed = {tid: t for tid, t in tasks.items() if t["state"] == "failed"}
    assert failed and all(t["rank"] == 2 for t in failed.values())
    assert all(t["state"] == "succeeded" for tid, t in tasks.items() if t["rank"] == 1)
    for tid, t in failed.items():
        assert t["work_dir"] == str(work_dir(run_dir, tid, 2)) and t["host"]
    status = cli(tmp_path, "status", str(run_dir), "--format", "json", timeout=60)
    rows = {r["id"]: r for r in json.loads(status.stdout)["tasks"]}
    journal = [json.loads(line) for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines()]
    assert any(tid.startswith("boom") for tid in failed) and any(tid.startswith("shell") for tid in failed)
    for tid in failed:
        if tid.startswith("boom"):
            assert tasks[tid]["reason"].startswith("ValueError: no good on rank 2")
            [rec] = [r for r in journal if r["task"] == tid and r["state"] == "failed"]
            assert "mpitasks.py" in rec["traceback"] and "raise ValueError" in rec["traceback"]
            # the record leaves out a work directory where the layout puts it (the reader's, checked above)
            assert rec["rank"] == 2 and rec.get("work_dir", tasks[tid]["work_dir"]) == tasks[tid]["work_dir"]
        else:
            assert rows[tid]["reason"] == "exit code 7" and rows[tid]["stderr_tail"][-1] == "bad rank"
    worker = [json.loads(line) for line in (run_dir / "journal" / "rank-0002.jsonl").read_text().splitlines()]
    assert {r["task"] for r in worker if r["state"] == "failed"} == set(failed)


SLOW = """\
version: 1
job: {name: slow}
execution: {backend: mpi, tasks_per_rank: 2}
tasks:
  - id: step-{i}
    kind: shell
    matrix: {i: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}
    run: sleep 1 && echo "$CMBAGENT_TASK_ID" >> "$CMBAGENT_RUN_DIR/../../side-effects.txt"
"""


def test_sigterm_mid_run_then_a_rerun_completes_with_no_succeeded_task_run_twice(tmp_path: Path) -> None:
    assert MPIEXEC is not None
    path = write(tmp_path, SLOW)
    run_dir = tmp_path / "runs" / "slow"
    side = tmp_path / "side-effects.txt"
    proc = subprocess.Popen([MPIEXEC, "-n", "3", *COMMAND, "run", str(path)],
                            cwd=tmp_path, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_until("some tasks succeeded", lambda: side.exists() and len(side.read_text().split()) >= 3)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out + err
    done_before = Counter(side.read_text().split())
    assert 0 < len(done_before) < 12
    result = mpirun(tmp_path, 3, "run", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = Counter(side.read_text().split())
    assert set(counts) == {f"step-{i}" for i in range(1, 13)}
    assert all(n == 1 for n in counts.values()), counts
    m = manifest(run_dir)
    skipped = {tid for tid, t in m["tasks"].items() if t["state"] == "skipped"}
    assert skipped == set(done_before)


def test_four_ranks_oversubscribed_and_auto_picks_mpi(tmp_path: Path) -> None:
    text = SLOW.replace("name: slow", "name: four").replace("sleep 1", "sleep 0.2").replace("backend: mpi, ", "")
    assert "backend" not in text
    result = mpirun(tmp_path, 4, "run", str(write(tmp_path, text)))
    assert result.returncode == 0, result.stdout + result.stderr
    m = manifest(tmp_path / "runs" / "four")
    assert m["ranks"] == 4 and {t["rank"] for t in m["tasks"].values()} == {1, 2, 3}


def test_one_rank_runs_everything_on_rank_0_with_a_warning(tmp_path: Path) -> None:
    text = SLOW.replace("name: slow", "name: one").replace("sleep 1", "true")
    result = mpirun(tmp_path, 1, "run", str(write(tmp_path, text)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("started under MPI with a single rank: there is no worker rank, so every task runs on rank 0 "
            "with local pools") in result.stderr
    m = manifest(tmp_path / "runs" / "one")
    assert m["backend"] == "local" and {t["rank"] for t in m["tasks"].values()} == {0}


def test_dry_run_under_mpi_says_what_would_run_and_ends(tmp_path: Path) -> None:
    result = mpirun(tmp_path, 3, "run", str(write(tmp_path, SLOW)), "--dry-run", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("step-1: run (") == 1  # rank 0 alone prints the plan
    assert not (tmp_path / "runs" / "slow" / "run.json").exists()


def run_twelve_sleeps(tmp_path: Path, name: str, tasks_per_rank: int, seconds: float) -> Path:
    """Run 12 shell tasks ``sleep SECONDS`` on 2 worker ranks; their journals' directory."""
    path = write(tmp_path, f"""\
version: 1
job: {{name: {name}}}
execution: {{backend: mpi, tasks_per_rank: {tasks_per_rank}}}
tasks:
  - id: t-{{i}}
    kind: shell
    matrix: {{i: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}}
    run: sleep {seconds}
""")
    result = mpirun(tmp_path, 3, "run", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name / "journal"


def test_a_worker_rank_runs_at_most_tasks_per_rank_attempts_at_once(tmp_path: Path) -> None:
    # A worker prepares attempts ahead of its slots (more threads than tasks_per_rank): its gate still
    # lets only tasks_per_rank of them run at once.
    journals = run_twelve_sleeps(tmp_path, "bounded", 2, 0.4)
    spans: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for rank in (1, 2):
        for line in (journals / f"rank-{rank:04d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["state"] == "succeeded":
                spans[rank].append((rec["t"] - rec["wall_s"], rec["t"]))
    assert sum(map(len, spans.values())) == 12
    for rank, mine in spans.items():
        at_once = [sum(1 for s, e in mine if s <= start + 0.1 < e) for start, _ in mine]
        assert max(at_once) == 2, (rank, mine)


def test_only_what_has_started_on_a_worker_counts_as_running(tmp_path: Path) -> None:
    # 12 tasks on 2 ranks x 1 slot: each rank holds its running task and one sent ahead (the pace is not
    # known before 64 calls have ended), which waits at its gate: queued, not running. In the order rank 0
    # journals them, running tasks never outnumber the 2 slots.
    journals = run_twelve_sleeps(tmp_path, "queued", 1, 0.3)
    steps = {"running": 1, "succeeded": -1}
    records = [json.loads(line) for line in (journals / "rank-0000.jsonl").read_text().splitlines()]
    assert sorted(steps[r["state"]] for r in records) == [-1] * 12 + [1] * 12
    at_once, most = 0, 0
    for r in records:
        at_once += steps[r["state"]]
        most = max(most, at_once)
    assert most == 2


def test_tiny_tasks_in_batches_with_failures_among_them_end_on_one_slot(tmp_path: Path) -> None:
    # Tiny tasks go to a worker in batches, run one after the other behind the rank's gate: a member's
    # failure must give its slot back at once (there is one), or the next member would wait forever.
    path = write(tmp_path, """\
version: 1
job: {name: tiny}
execution: {backend: mpi, tasks_per_rank: 1, keep_going: true, retries: 0}
tasks:
  - id: t-{i}
    kind: shell
    matrix: {i: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]}
    run: 'test $(( CMBAGENT_MATRIX_I % 5 )) -ne 0'
""")
    result = mpirun(tmp_path, 2, "run", str(path), "--quiet", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    states = Counter(t["state"] for t in manifest(tmp_path / "runs" / "tiny")["tasks"].values())
    assert states == {"succeeded": 20, "failed": 4}
