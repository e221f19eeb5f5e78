"""What a job does once its step has ended (``slurm.walltime``): the decision, pure, and the requeue or
resubmission it leads to, with Slurm's commands replaced (the real ones run in tests/test_slurm.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.slurm import client, jobs, walltime
from cmbagent_batch.slurm.walltime import Decision, decide

STOPPED = {"stop_reason": "SIGUSR1", "counts": {"succeeded": 3, "interrupted": 1, "pending": 4}}
TASKS = "(4 pending, 3 succeeded, 1 interrupted)"  # STOPPED's counts, as the run's last line says them
LIMIT = "5 tasks left " + TASKS + ", but the job was requeued {n} times already (limit {n}); continue with " \
        "`cmbagent-batch submit`"


@pytest.mark.parametrize(("code", "manifest", "done", "limit", "expected"), [
    (0, {"stop_reason": None, "counts": {"succeeded": 8}}, 0, 3,
     Decision("end", "the run finished (8 succeeded); nothing to requeue")),
    (1, STOPPED, 0, 3, Decision("end", f"the run ended with exit code 1 {TASKS}; only a walltime stop is requeued")),
    (138, None, 0, 3, Decision("end", "exit code 138 but run.json records no walltime stop")),
    (138, {"stop_reason": "SIGUSR1", "counts": {"succeeded": 8}}, 0, 3,
     Decision("end", "the walltime stop came after the last task (8 succeeded)")),
    (138, STOPPED, 0, 3, Decision("requeue", f"5 tasks left {TASKS}; requeue 1 of 3")),
    (138, STOPPED, 2, 3, Decision("requeue", f"5 tasks left {TASKS}; requeue 3 of 3")),
    (138, STOPPED, 3, 3, Decision("limit", LIMIT.format(n=3))),
    (138, STOPPED, 0, 0, Decision("limit", LIMIT.format(n=0))),
], ids=["success", "failure", "no-manifest", "nothing-left", "first", "last", "limit", "no-requeue"])
def test_decide(code: int, manifest: dict[str, Any] | None, done: int, limit: int, expected: Decision) -> None:
    assert decide(code, manifest, done, limit) == expected


def stopped_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(STOPPED))
    jobs.add(str(run_dir), "submit", "41", script=str(run_dir / "slurm" / "job-001.sbatch"), requeue_max=2)
    return run_dir


def test_a_walltime_stop_requeues_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = stopped_run(tmp_path)
    asked: list[str] = []
    monkeypatch.setattr(client, "requeue", asked.append)
    assert walltime.after_step(str(run_dir), "41", 138, 2) == 138
    assert asked == ["41"]
    record = jobs.load(str(run_dir))
    assert record is not None
    assert [e["event"] for e in record["events"]] == ["submit", "requeue"] and jobs.requeues(record) == 1
    assert capsys.readouterr().err == (f"cmbagent-batch: job 41: 5 tasks left {TASKS}; requeue 1 of 2\n"
                                       "cmbagent-batch: job 41 requeued\n")
    walltime.after_step(str(run_dir), "41", 138, 2)
    walltime.after_step(str(run_dir), "41", 138, 2)  # the limit: no third requeue
    assert asked == ["41", "41"]
    assert "requeued 2 times already (limit 2)" in capsys.readouterr().err


def test_where_requeue_is_refused_a_job_is_submitted_after_this_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = stopped_run(tmp_path)

    def refuse(job_id: str) -> None:
        raise client.SlurmError("requeueing job 41: `scontrol requeue 41` failed (exit 1): Requested operation is "
                                "presently disabled")

    submitted: list[tuple[str, ...]] = []
    monkeypatch.setattr(client, "requeue", refuse)
    monkeypatch.setattr(client, "sbatch", lambda script, *extra: submitted.append((script, *extra)) or "42")
    walltime.after_step(str(run_dir), "41", 138, 2)
    assert submitted == [(str(run_dir / "slurm" / "job-001.sbatch"), "--dependency=afterany:41")]
    record = jobs.load(str(run_dir))
    assert record is not None and jobs.current_job(record) == "42" and jobs.requeues(record) == 1
    err = capsys.readouterr().err
    assert "presently disabled); submitting a job that starts after it instead" in err
    assert err.endswith("cmbagent-batch: submitted job 42, to start when job 41 ends\n")


def test_a_new_submit_starts_the_requeue_count_again(tmp_path: Path) -> None:
    run_dir = stopped_run(tmp_path)
    jobs.add(str(run_dir), "requeue", "41")
    jobs.add(str(run_dir), "submit", "50", script="s", requeue_max=1)
    record = jobs.load(str(run_dir))
    assert record is not None and (jobs.current_job(record), jobs.requeues(record)) == ("50", 0)
