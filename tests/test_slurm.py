"""``submit``, ``status`` and ``cancel`` against a real single-node Slurm (``slurm/local-cluster.sh``): a job
of 3 MPI ranks (``srun --mpi=pmi2``, PyPI mpich) runs shell, python and agent tasks; a job whose walltime is
too short for its DAG stops cleanly, requeues itself and finishes with every task run once; bad
submissions say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import cli as run_cli
from tests.helpers.mpi_run import MIXED, manifest, run_env, usage, write
from tests.helpers.runs import published
from tests.helpers.scripted_llm import Reply, ScriptedLLM
from tests.helpers.slurm_cluster import env_for, job_logs, wait_job_end

pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")

pytestmark = pytest.mark.slow  # Slurm jobs on MPI ranks


def env(tmp_path: Path, conf: str) -> dict[str, str]:
    return env_for(run_env(tmp_path), conf)


def cli(tmp_path: Path, conf: str, *args: str, env_: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, *args, env=env_ or env(tmp_path, conf), timeout=timeout)


def submit(tmp_path: Path, conf: str, spec: Path, *flags: str) -> str:
    res = cli(tmp_path, conf, "submit", str(spec), *flags)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout
    return job_id


def ledger(tmp_path: Path, conf: str, run_dir: Path) -> dict[str, Any]:
    verify = cli(tmp_path, conf, "ledger", "verify", str(run_dir / "ledger.jsonl"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    res = cli(tmp_path, conf, "ledger", "summarize", str(run_dir / "ledger.jsonl"), "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_submitted_job_runs_the_dag_on_three_ranks(tmp_path: Path, slurm_conf: str) -> None:
    run_dir = tmp_path / "runs" / "mixed"
    e = env(tmp_path, slurm_conf)
    with ScriptedLLM(lambda body: Reply("a thought", usage=usage(1000, 100))) as srv:
        spec = write(tmp_path, MIXED.format(url=srv.base_url, run_dir=run_dir))
        job_id = submit(tmp_path, slurm_conf, spec, "--ntasks-per-node", "3", "--time", "5")
        end = wait_job_end(job_id, e, 180, run_dir)
    assert end["JobState"] == "COMPLETED", job_logs(run_dir)
    script = run_dir / "slurm" / "job-001.sbatch"
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=3" in text and "srun --overlap --mem=0 --cpu-bind=none --mpi=pmi2 " in text
    m = manifest(run_dir)
    assert (m["backend"], m["ranks"], m["exit_code"]) == ("mpi", 3, 0)
    assert m["counts"] == {"succeeded": 13}
    assert m["slurm"]["job_id"] == job_id and m["slurm"]["this_run"]["job_id"] == job_id
    assert {t["rank"] for t in m["tasks"].values()} == {1, 2}
    assert (published(run_dir, "think-1") / "thought.md").exists()
    summary = ledger(tmp_path, slurm_conf, run_dir)
    assert summary["total"]["calls"] == 2
    status = cli(tmp_path, slurm_conf, "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"Slurm job {job_id}: COMPLETED" in status.stdout
    log = run_dir / "slurm" / f"slurm-{job_id}.log"
    assert f"  log: {log}" in status.stdout.splitlines()
    assert "13/13 done" in log.read_text()  # the progress lines (stderr) are in the one log
    status_json = json.loads(cli(tmp_path, slurm_conf, "status", str(run_dir), "--format", "json").stdout)
    assert status_json["slurm"]["state"] == "COMPLETED" and status_json["slurm"]["requeues"] == 0


STEPS = """\
version: 1
job: {name: steps}
execution: {backend: mpi}
tasks:
  - id: pair{i}
    kind: shell
    run: $CMBAGENT_LAUNCH sh -c 'echo "$SLURM_JOB_ID.$SLURM_STEP_ID $SLURM_NTASKS $SLURM_PROCID"; sleep 2' > ranks.txt
    resources: {ranks: 2}
    outputs: [ranks.txt]
    matrix: {i: [1, 2]}
  - id: quad
    kind: shell
    run: $CMBAGENT_LAUNCH sh -c 'echo "$SLURM_JOB_ID.$SLURM_STEP_ID $SLURM_NTASKS $SLURM_PROCID"' > ranks.txt
    resources: {ranks: 4}
    outputs: [ranks.txt]
"""


def test_a_submitted_job_places_its_tasks_and_launches_each_as_its_own_job_step(
        tmp_path: Path, slurm_conf: str) -> None:
    """The worker rank's node (4 CPUs in the allocation) takes the two 2-rank tasks at once, each its own
    step beside the ranks' step; the 4-rank task waits for them, then runs as a step of 4."""
    spec = write(tmp_path, STEPS)
    run_dir = tmp_path / "runs" / "steps"
    job_id = submit(tmp_path, slurm_conf, spec, "--ntasks-per-node", "2", "--cpus-per-task", "2", "--time", "5")
    end = wait_job_end(job_id, env(tmp_path, slurm_conf), 180, run_dir)
    assert end["JobState"] == "COMPLETED", job_logs(run_dir)
    log = (run_dir / "slurm" / f"slurm-{job_id}.log").read_text()
    assert "cmbagent-batch: inventory: 1 node (" in log and "4 CPUs" in log and "(slurm)" in log, log
    lines = {tid: (published(run_dir, tid) / "ranks.txt").read_text().split("\n")[:-1] for tid in ("pair1", "pair2", "quad")}
    steps = {tid: {line.split()[0] for line in out} for tid, out in lines.items()}
    assert all(len(ids) == 1 for ids in steps.values()), steps  # one step per task
    assert len({next(iter(ids)) for ids in steps.values()} | {f"{job_id}.0"}) == 4, steps  # none is the ranks' step
    for tid, ranks in (("pair1", 2), ("pair2", 2), ("quad", 4)):
        assert sorted(line.split()[1:] for line in lines[tid]) == [[str(ranks), str(i)] for i in range(ranks)], lines
    spans: dict[str, list[float]] = {}
    for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("state") in ("running", "succeeded"):
            spans.setdefault(rec["task"], []).append(rec["t"])
            if rec["state"] == "running":
                assert f"srun --jobid={job_id} --job-name=cmbagent-batch:{rec['task']}:1 " in rec["launch"], rec
    (s1, e1), (s2, e2), (q, _) = spans["pair1"], spans["pair2"], spans["quad"]
    assert max(s1, s2) < min(e1, e2) and q >= max(e1, e2), spans  # the pairs at once; quad after both
    status = cli(tmp_path, slurm_conf, "status", str(run_dir))
    for tid, ids in steps.items():  # where each ran, and as which step, however it ended
        assert any(line.startswith("      on ") and f", job step {next(iter(ids))}: " in line
                   for line in status.stdout.splitlines()), (tid, status.stdout)


SLEEPY = """\
version: 1
job: {name: sleepy}
execution: {backend: mpi}
tasks:
  - id: nap
    kind: shell
    run: sleep 300
"""


def test_status_shows_a_pending_job_and_cancel_cancels_it(tmp_path: Path, slurm_conf: str) -> None:
    spec = tmp_path / "sleepy.yaml"
    spec.write_text(SLEEPY)
    run_dir = tmp_path / "runs" / "sleepy"
    e = env(tmp_path, slurm_conf)
    # held: it stays PENDING, whatever else the cluster runs
    job_id = submit(tmp_path, slurm_conf, spec, "--ntasks-per-node", "2", "--sbatch-arg=--hold")
    res = cli(tmp_path, slurm_conf, "status", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert f"Slurm job {job_id}: PENDING" in res.stdout
    assert "the job has not started yet" in res.stdout
    again = cli(tmp_path, slurm_conf, "submit", str(spec))
    assert again.returncode == 2
    assert again.stderr == (f"cmbagent-batch: error: job {job_id} (PENDING) already works on {run_dir}; wait for "
                            f"it or `cmbagent-batch cancel {run_dir}` first\n")
    res = cli(tmp_path, slurm_conf, "cancel", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"cancelled job {job_id}; `cmbagent-batch submit` continues the run later\n"
    assert wait_job_end(job_id, e, 60)["JobState"] == "CANCELLED"
    res = cli(tmp_path, slurm_conf, "cancel", str(run_dir))
    assert (res.returncode, res.stdout) == (0, f"job {job_id} has already ended (CANCELLED); nothing to cancel\n")
    events = json.loads((run_dir / "slurm" / "jobs.json").read_text())["events"]
    assert [ev["event"] for ev in events] == ["submit", "cancel"]


def test_bad_submissions_say_what_is_wrong(tmp_path: Path, slurm_conf: str) -> None:
    spec = tmp_path / "sleepy.yaml"
    spec.write_text(SLEEPY)
    res = cli(tmp_path, slurm_conf, "submit", str(spec), "--partition", "nosuch")
    assert res.returncode == 2
    error = res.stderr.splitlines()[-1]  # after the warning that the job asks for one rank
    assert error.startswith(f"cmbagent-batch: error: submitting the job: `sbatch --parsable {tmp_path}/runs/"
                            "sleepy/slurm/job-001.sbatch` failed (exit 1): ")
    assert "invalid partition specified: nosuch" in res.stderr.lower()
    assert "Traceback" not in res.stderr

    res = cli(tmp_path, slurm_conf, "submit", str(spec), "--time", "1:2:3:4")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == ("cmbagent-batch: error: --time '1:2:3:4': malformed Slurm time; use minutes, MM:SS, "
                          "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS\n")

    no_slurm = env(tmp_path, slurm_conf)
    no_slurm["PATH"] = os.path.dirname(sys.executable)  # the venv, without /usr/bin's sbatch
    res = cli(tmp_path, slurm_conf, "submit", str(spec), "--run-dir", str(tmp_path / "other"), env_=no_slurm)
    assert res.returncode == 2
    assert res.stderr.endswith("cmbagent-batch: error: sbatch not found on PATH: submitting the job needs a Slurm "
                               "client (a login node of the cluster, or `slurm/local-cluster.sh up` for a local "
                               "one)\n")
    assert not (tmp_path / "other" / "slurm" / "jobs.json").exists()


def count_lines(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


LEVELS = 8
NOTE_MODULE = """\
def note(tag, path):
    with open(path, "a") as fh:
        fh.write(tag + "\\n")
    return tag
"""


def long_dag(url: str, counts: Path) -> str:
    """Levels of two 5 s shell tasks, each needing both of the level before, with a python task and an
    agent task on the way: about 45 s on two worker ranks, against a walltime warning 0 to 30 s in."""
    lines = [
        "version: 1",
        "job: {name: long}",
        "execution: {backend: mpi, kill_grace: 5}",
        "llm:",
        "  models:",
        f"    m: {{model: test-model, base_url: \"{url}\", api_key_env: TEST_LLM_KEY, timeout: 30, max_retries: 0,",
        "        price: {prompt_per_1m: 1.0, completion_per_1m: 2.0}}",
        "tasks:",
    ]
    for lv in range(1, LEVELS + 1):
        deps = f"    depends_on: [s{lv - 1}a, s{lv - 1}b]\n" if lv > 1 else ""
        for k in "ab":
            lines.append(f"  - id: s{lv}{k}\n    kind: shell\n    run: sleep 5 && echo s{lv}{k} >> {counts}\n{deps}")
    lines.append(f"  - id: py3\n    kind: python\n    call: notes:note\n    args: {{tag: py3, path: \"{counts}\"}}\n"
                 "    depends_on: [s3a]\n")
    for lv in (4, 7):
        lines.append(f"  - id: agent{lv}\n    kind: agent\n    model: m\n    instructions: \"AGENT {lv}: go\"\n"
                     f"    outputs: [answer{lv}.md]\n    depends_on: [s{lv}b]\n")
    return "\n".join(lines) + "\n"


def test_a_job_past_its_walltime_requeues_and_runs_every_task_once(tmp_path: Path, slurm_conf: str) -> None:
    run_dir = tmp_path / "runs" / "long"
    counts = tmp_path / "counts.txt"
    (tmp_path / "notes.py").write_text(NOTE_MODULE)
    spec = tmp_path / "long.yaml"
    seen: list[str] = []

    def reply(body: Any) -> Reply:
        seen.append(next(m["content"] for m in body["messages"] if "AGENT" in str(m.get("content"))))
        return Reply("done", usage=usage(1000, 100))

    e = env(tmp_path, slurm_conf)
    with ScriptedLLM(reply) as srv:
        spec.write_text(long_dag(srv.base_url, counts))
        job_id = submit(tmp_path, slurm_conf, spec, "--ntasks-per-node", "3", "--time", "1", "--signal-grace", "30",
                        "--requeue", "8")
        end = wait_job_end(job_id, e, 900, run_dir)
    logs = job_logs(run_dir)
    assert end["JobState"] == "COMPLETED", logs
    m = manifest(run_dir)
    counts_ = m["counts"]  # the last run's view: what earlier runs finished is skipped
    assert set(counts_) <= {"succeeded", "skipped"} and sum(counts_.values()) == 2 * LEVELS + 3, logs
    assert counts_["skipped"] > 0, logs
    # every task's side effect exactly once, across every requeue
    expected = Counter({f"s{lv}{k}": 1 for lv in range(1, LEVELS + 1) for k in "ab"}) + Counter({"py3": 1})
    assert count_lines(counts) == expected, logs
    assert sorted(s.split(":")[0] for s in seen) == ["AGENT 4", "AGENT 7"], seen
    events = json.loads((run_dir / "slurm" / "jobs.json").read_text())["events"]
    requeues = [ev for ev in events if ev["event"] == "requeue"]
    assert requeues and all(ev["job_id"] == job_id for ev in requeues), events
    assert "walltime warning (USR1)" in logs and f"job {job_id} requeued" in logs
    assert m["slurm"]["requeues"] == len(requeues)
    assert int(end["Restarts"]) == len(requeues)
    # the ledger: one verifiable chain with the two calls, as an uninterrupted run has them
    summary = ledger(tmp_path, slurm_conf, run_dir)
    assert summary["total"]["calls"] == 2
    assert summary["total"]["cost_usd"] == pytest.approx(2 * (1000 * 1.0 + 100 * 2.0) / 1e6)
    status = cli(tmp_path, slurm_conf, "status", str(run_dir)).stdout
    assert f"Slurm job {job_id}: COMPLETED" in status and f"requeued {len(requeues)} of 8 times" in status
