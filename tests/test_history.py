"""run.json as a bounded summary, the journals as the per-task store, and their index: what status, a
rerun and a killed run read."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cmbagent_batch.rundir.history import INDEX, History, load_history
from cmbagent_batch.states import TaskState
from tests.helpers.cli import Runner, cli, q, wait_until, write_spec
from tests.helpers.runs import read_run


def matrix_spec(tmp_path: Path, n: int, run: str = "'true'") -> None:
    write_spec(tmp_path, f"""\
        version: 1
        job: {{name: many}}
        execution: {{max_workers: 2}}
        tasks:
          - id: t-{{i}}
            kind: shell
            run: {run}
            matrix: {{i: [{", ".join(map(str, range(n)))}]}}
    """)


def test_run_json_is_a_summary_of_the_same_size_for_few_tasks_or_many(tmp_path: Path) -> None:
    sizes = {}
    for n in (3, 300):
        job = tmp_path / str(n)
        job.mkdir()
        matrix_spec(job, n)
        cli(job, "run", "job.yaml", "--quiet", check=True)
        run_json = job / "runs" / "many" / "run.json"
        manifest = json.loads(run_json.read_text())
        assert "tasks" not in manifest
        assert (manifest["format"], manifest["tasks_total"], manifest["counts"]) == (2, n, {"succeeded": n})
        assert manifest["journal"] == {"dir": "journal", "index": "journal/index"}
        assert manifest["runner"]["tasks_run"] == n and manifest["runner"]["cpu_s"] > 0
        sizes[n] = len(run_json.read_bytes())
    assert abs(sizes[300] - sizes[3]) < 64  # the numbers' digits differ, nothing else


def test_the_index_covers_the_journals_so_a_reader_parses_nothing_again(tmp_path: Path) -> None:
    matrix_spec(tmp_path, 5)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    journals = tmp_path / "runs" / "many" / "journal"
    history = History.from_index(str(journals))
    assert history.covered == {"rank-0000.jsonl": (journals / "rank-0000.jsonl").stat().st_size}
    assert sorted(history.ids) == [f"t-{i}" for i in range(5)]
    assert {history.state_of(i).value for i in range(5)} == {"succeeded"}  # type: ignore[union-attr]
    assert history.fp_of(0) == history.record(0)["fp"]  # the record is found where the index says
    history.close()
    rerun = cli(tmp_path, "run", "job.yaml", "--dry-run", check=True)
    assert sorted(rerun.stdout.splitlines()) == [f"t-{i}: skip (up to date)" for i in range(5)]


def test_the_index_keeps_the_sets_of_code_files_the_records_name(tmp_path: Path) -> None:
    (tmp_path / "noop.py").write_text("def run():\n    return None\n")
    write_spec(tmp_path, """\
        version: 1
        job: {name: many}
        tasks:
          - {id: p, kind: python, call: "noop:run"}
          - {id: s, kind: shell, run: "true"}
    """)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    journals = tmp_path / "runs" / "many" / "journal"
    indexed = History.from_index(str(journals))
    assert sorted(map(list, indexed.code_sets.values())) == [[], ["noop.py"]]
    key = next(k for k, files in indexed.code_sets.items() if files)
    assert indexed.code_files(key[:12]) == indexed.code_files(key) == indexed.code_sets[key]
    assert indexed.code_files("") is None and indexed.code_files("0" * 12) is None
    journal = journals / "rank-0000.jsonl"
    journal.write_bytes(journal.read_bytes()[:-1])  # shorter than the index covers: read in full, sets kept
    assert load_history(str(journals), [str(journal)]).code_sets == indexed.code_sets
    os.unlink(journals / INDEX)
    assert load_history(str(journals), [str(journal)]).code_sets == {}


def test_an_index_that_does_not_match_its_journals_is_said_and_the_journals_read_in_full(tmp_path: Path) -> None:
    matrix_spec(tmp_path, 3)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    journal = tmp_path / "runs" / "many" / "journal" / "rank-0000.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]))  # cut shorter than the index covers: t-? never ended
    res = cli(tmp_path, "status", "runs/many")
    assert res.returncode == 0, res.stderr
    covered = len(b"".join(lines))
    assert res.stderr == ("cmbagent-batch: warning: runs/many/journal/index does not match the journals "
                          f"(runs/many/journal/rank-0000.jsonl holds {covered - len(lines[-1])} bytes, fewer than the "
                          f"{covered} it covers); reading them in full\n")
    assert "2 succeeded" in res.stdout and "1 running" in res.stdout


def test_after_a_sigkill_status_and_the_rerun_read_the_index_and_the_killed_runs_lines(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    write_spec(tmp_path, f"""\
        version: 1
        job: {{name: killed}}
        execution: {{max_workers: 1}}
        tasks:
          - {{id: a, kind: shell, run: "true"}}
          - {{id: b, kind: shell, run: "true", depends_on: [a]}}
          - {{id: c, kind: shell, run: "touch {q(gate)}; sleep 60", depends_on: [b]}}
          - {{id: d, kind: shell, run: "true", depends_on: [c]}}
    """)
    cli(tmp_path, "run", "job.yaml", "--only", "a", "--quiet", check=True)  # an index: a done, the rest skipped
    runner = Runner(tmp_path, "job.yaml", "--quiet")
    journal = tmp_path / "runs" / "killed" / "journal" / "rank-0000.jsonl"
    wait_until("c runs, as journaled", lambda: gate.exists() and b'"task":"c","state":"running"' in journal.read_bytes(),
               runner)
    os.killpg(runner.proc.pid, signal.SIGKILL)
    runner.wait()
    journals = tmp_path / "runs" / "killed" / "journal"
    history = load_history(str(journals), [str(journals / "rank-0000.jsonl")])
    killed = read_run(tmp_path / "runs" / "killed")
    assert history.run_id == killed["run_id"]  # the killed run's own table, written as it started
    history.close()
    status = cli(tmp_path, "status", "runs/killed", "--format", "json", check=True)
    shown = json.loads(status.stdout)
    assert {t["id"]: t["state"] for t in shown["tasks"]} == {
        "a": "succeeded", "b": "succeeded", "c": "interrupted", "d": "pending"}
    assert shown["counts"] == {"interrupted": 1, "pending": 1, "succeeded": 2}
    rerun = cli(tmp_path, "run", "job.yaml", "--dry-run", check=True)
    assert rerun.stdout.splitlines() == ["a: skip (up to date)", "b: skip (up to date)",
                                         "c: run (last run ended running)", "d: run (never ran)"]


@pytest.mark.slow
def test_status_of_a_large_run_lists_the_troubled_tasks_and_all_of_them_when_asked(tmp_path: Path) -> None:
    matrix_spec(tmp_path, 1200, run="'test {i} != 7'")
    assert cli(tmp_path, "run", "job.yaml", "--quiet", "--keep-going", timeout=300).returncode == 1
    res = cli(tmp_path, "status", "runs/many", check=True)
    lines = res.stdout.splitlines()
    assert lines[1] == "1200 tasks: 1199 succeeded, 1 failed"
    assert [ln.split()[:2] for ln in lines[2:] if ln.startswith("  t-")] == [["t-7", "failed"]]
    assert lines[-1] == "  (1,199 more tasks not listed: only the running and troubled ones are; `status --all` lists every task)"
    every = cli(tmp_path, "status", "runs/many", "--all", check=True).stdout.splitlines()
    assert len([ln for ln in every if ln.startswith("  t-")]) == 1200


def test_a_run_directory_whose_run_json_lists_its_tasks_is_read_as_it_is(tmp_path: Path) -> None:
    matrix_spec(tmp_path, 2)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    run_dir = tmp_path / "runs" / "many"
    os.unlink(run_dir / "journal" / INDEX)
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest.update(format=1, tasks={"t-0": {"state": "succeeded", "attempts": 1, "rank": 0, "work_dir": "x"},
                                     "t-1": {"state": "skipped", "attempts": 0, "rank": 0, "work_dir": "y",
                                             "reason": "not selected by --only"},
                                     "gone": {"state": "pending", "attempts": 0, "rank": 0, "work_dir": "z"}})
    (run_dir / "run.json").write_text(json.dumps(manifest))
    shown = json.loads(cli(tmp_path, "status", "runs/many", "--format", "json", check=True).stdout)
    assert {t["id"]: t["state"] for t in shown["tasks"]} == {"gone": "pending", "t-0": "succeeded",
                                                             "t-1": "succeeded"}


def test_a_first_runs_table_is_made_a_column_at_a_time_as_task_by_task() -> None:
    ids = [f"t-{i}" for i in range(50)]
    planned = [(ids[:3], TaskState.SKIPPED, "not selected by --only"), (ids[3:], TaskState.PENDING, "")]
    at_once = History()
    at_once.plan_run("r1", planned)
    one_by_one = History()
    for tid in ids:
        one_by_one.add(tid)
    one_by_one.plan_run("r1", planned)
    for name in ("state", "attempts", "attempt", "run", "t", "wall", "rank", "file", "offset", "planned", "note", "fps",
                 "ids", "notes"):
        assert repr(getattr(at_once, name)) == repr(getattr(one_by_one, name)), name  # repr: nan == nan
    assert [at_once.position(t) for t in ids] == list(range(50))
    at_once.plan_run("r2", [(["t-7", "new"], TaskState.PENDING, "")])  # known and new ids: one by one
    assert (at_once.position("new"), at_once.planned_of(50), at_once.planned_of(0)) == (50, TaskState.PENDING, None)


def test_the_journal_records_of_a_start_a_success_a_retry_and_a_failure_keep_their_keys(tmp_path: Path) -> None:
    (tmp_path / "noop.py").write_text("def run():\n    return None\n")
    write_spec(tmp_path, """\
        version: 1
        job: {name: keys}
        execution: {retries: 1, retry_backoff: 0.01, keep_going: true, max_workers: 1}
        tasks:
          - {id: ok, kind: shell, run: "echo hi > out.txt", outputs: [out.txt]}
          - {id: bad, kind: shell, run: "exit 3"}
          - {id: after, kind: shell, run: "true", depends_on: [bad]}
          - {id: py, kind: python, call: "noop:run"}
    """)
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 1
    journal = tmp_path / "runs" / "keys" / "journal" / "rank-0000.jsonl"
    measures = {"cpu_s", "work_bytes", "output_bytes"}  # left out when 0
    keys = [(r["task"], r["state"], [k for k in r if k not in measures])
            for r in map(json.loads, journal.read_text().splitlines())]
    start = ["t", "run", "task", "state", "attempt"]
    success = [*start, "fp", "parts", "wall_s", "peak_rss_mb"]
    failure = [*start, "reason", "error", "exit_code", "timed_out", "wall_s"]
    assert sorted(keys) == sorted([
        ("ok", "running", start), ("ok", "succeeded", success),
        ("bad", "running", start), ("bad", "retrying", [*failure[:6], "retry_in_s", *failure[6:]]),
        ("bad", "running", start), ("bad", "failed", failure),
        ("after", "upstream_failed", ["t", "run", "task", "state", "reason", "root"]),
        ("py", "running", start), ("py", "succeeded", success)])
