"""``RUN_DIR/trace.tsv``: one row per attempt, appended as each attempt ends, in fixed columns, under the
local and the MPI backend, across the runs of a resumed job; whole rows after a SIGKILL; a full disk is a
warning. Real runs through the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.rundir.trace import TraceRow
from tests.helpers.cli import Runner, clean_env, cli, journal, wait_until, write_spec
from tests.helpers.mpi_run import KEY, MPIEXEC, mpirun, usage
from tests.helpers.scripted_llm import Delay, HttpError, Reply, ScriptedLLM

HEADER = ("run\ttask\tkind\tstate\tattempt\trank\thost\tnodes\tcores\tgpus\tqueued\tstart\tend\twall_s\tcpu_s\t"
          "peak_rss_mb\texit_code\ttokens\tcost_usd")

RETRIES = """\
version: 1
job: {name: traced}
execution: {max_workers: 2, retries: 1, retry_backoff: 0, keep_going: true}
tasks:
  - id: ok-{i}
    kind: shell
    matrix: {i: [1, 2]}
    run: echo {i} > out.txt
    outputs: [out.txt]
  - id: flaky
    kind: shell
    run: '[ "$CMBAGENT_ATTEMPT" = 1 ] && exit 3; echo done > out.txt'
    outputs: [out.txt]
  - id: slow
    kind: shell
    run: sleep 30
    timeout: 0.3
  - id: py
    kind: python
    call: os:getcwd
"""


def rows(run_dir: Path) -> list[dict[str, str]]:
    """The trace's rows by column, after checking its header and that every row is a whole line."""
    text = (run_dir / "trace.tsv").read_text()
    assert text.endswith("\n"), "a torn last row"
    header, *lines = text.splitlines()
    assert header == HEADER
    out = []
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == len(TraceRow._fields), line
        out.append(dict(zip(header.split("\t"), fields)))
    return out


def epoch(stamp: str) -> float:
    assert len(stamp) == len("2026-12-06T23:08:47.123Z") and stamp.endswith("Z"), stamp
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def by_attempt(found: list[dict[str, str]]) -> dict[tuple[str, int], dict[str, str]]:
    keyed = {(row["task"], int(row["attempt"])): row for row in found}
    assert len(keyed) == len(found), "two rows for one attempt"
    return keyed


def ends(run_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The end records of rank 0's journal, by task and attempt."""
    return {(r["task"], r["attempt"]): r for r in journal(run_dir) if r["state"] != "running" and "attempt" in r}


def check_retries(run_dir: Path, ranks: set[str]) -> None:
    """``RETRIES`` ran: a row per attempt, as the journal ended each."""
    found = rows(run_dir)
    got = {key: (row["state"], row["exit_code"]) for key, row in by_attempt(found).items()}
    assert got == {("ok-1", 1): ("succeeded", "0"), ("ok-2", 1): ("succeeded", "0"),
                   ("flaky", 1): ("retrying", "3"), ("flaky", 2): ("succeeded", "0"),
                   ("slow", 1): ("retrying", "-15"), ("slow", 2): ("failed", "-15"), ("py", 1): ("succeeded", "")}
    journaled = ends(run_dir)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    for row in found:
        record = journaled[(row["task"], int(row["attempt"]))]
        assert row["run"] == run_id and row["state"] == record["state"]
        assert row["kind"] == ("python" if row["task"] == "py" else "shell")
        assert row["rank"] in ranks and row["host"] == socket.gethostname()
        assert (row["nodes"], row["cores"], row["gpus"]) == ("1", "1", "0")
        queued, start, end = epoch(row["queued"]), epoch(row["start"]), epoch(row["end"])
        assert queued <= start + 0.001 and start <= end
        assert abs(end - record["t"]) <= 0.0005 + 1e-6  # the end record's time, to the millisecond
        assert float(row["wall_s"]) >= 0 and float(row["cpu_s"]) >= 0 and float(row["peak_rss_mb"]) > 0
        assert (row["tokens"], float(row["cost_usd"])) == ("0", 0.0)
    assert all(float(row["wall_s"]) >= 0.3 for row in found if row["task"] == "slow")


@pytest.mark.slow
def test_a_run_with_retries_and_a_timeout_has_one_row_per_attempt_in_the_fixed_columns(tmp_path: Path) -> None:
    write_spec(tmp_path, RETRIES)
    done = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert done.returncode == 1, done.stderr
    check_retries(tmp_path / "runs" / "traced", {"0"})


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_under_mpi_rank_0_writes_the_row_of_every_attempt_the_worker_ranks_ran(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
    write_spec(tmp_path, RETRIES.replace("execution: {", "execution: {backend: mpi, "))
    done = mpirun(tmp_path, 3, "run", "job.yaml", "--quiet")
    assert done.returncode == 1, done.stderr
    check_retries(tmp_path / "runs" / "traced", {"1", "2"})


@pytest.mark.slow
def test_a_resumed_job_appends_the_rows_of_its_new_run_below_the_one_header(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "version: 1\njob: {name: again}\ntasks:\n"
                                "  - {id: a, kind: shell, run: 'echo a > a.txt', outputs: [a.txt]}\n"
                                "  - {id: b, kind: shell, run: 'echo b > b.txt', outputs: [b.txt]}\n")
    run_dir = tmp_path / "runs" / "again"
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    first = rows(run_dir)
    spec.write_text(spec.read_text().replace("echo b", "echo B"))
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    found = rows(run_dir)
    assert found[:2] == first and len(found) == 3
    assert sorted((row["task"], row["attempt"]) for row in first) == [("a", "1"), ("b", "1")]
    assert (found[2]["task"], found[2]["attempt"]) == ("b", "2")
    assert found[2]["run"] == json.loads((run_dir / "run.json").read_text())["run_id"] != first[0]["run"]


@pytest.mark.slow
def test_an_agent_attempt_has_the_tokens_and_dollars_the_ledger_has_for_it(tmp_path: Path) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    script = [HttpError(400, message="bad request"), Reply("the answer", usage=usage(120, 30))]
    with ScriptedLLM(script) as srv:
        write_spec(tmp_path, f"""
            version: 1
            job: {{name: agentic}}
            execution: {{retries: 1, retry_backoff: 0}}
            llm:
              models:
                m: {{model: test-model, base_url: "{srv.base_url}", api_key_env: TEST_LLM_KEY, timeout: 30,
                    max_retries: 0, price: {{prompt_per_1m: 3.0, completion_per_1m: 7.0}}}}
            tasks:
              - {{id: think, kind: agent, model: m, instructions: "THINK: go", outputs: [thought.md]}}
              - {{id: after, kind: shell, run: "true", depends_on: [think]}}
            """)
        cli(tmp_path, "run", "job.yaml", "--quiet", env=clean_env(tmp_path, TEST_LLM_KEY=KEY), check=True)
    run_dir = tmp_path / "runs" / "agentic"
    found = by_attempt(rows(run_dir))
    assert sorted(found) == [("after", 1), ("think", 1), ("think", 2)]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    for attempt in (1, 2):
        entries = [e for e in ledger if e["task"] == "think" and e["attempt"] == attempt]
        assert len(entries) == 1
        row = found[("think", attempt)]
        assert int(row["tokens"]) == sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries)
        assert float(row["cost_usd"]) == sum(e["cost_usd"] for e in entries)
    assert found[("think", 1)]["tokens"] == "0"  # its one call was refused
    assert (found[("think", 2)]["tokens"], float(found[("think", 2)]["cost_usd"])) == ("150", pytest.approx(0.00057))
    assert (found[("after", 1)]["tokens"], found[("after", 1)]["cost_usd"]) == ("0", "0.0")


@pytest.mark.slow
def test_an_agent_attempt_ended_by_its_timeout_has_the_calls_it_made_until_then(tmp_path: Path) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    with ScriptedLLM([Delay(30, Reply("too late"))]) as srv:
        write_spec(tmp_path, f"""
            version: 1
            job: {{name: late}}
            llm:
              models:
                m: {{model: test-model, base_url: "{srv.base_url}", api_key_env: TEST_LLM_KEY, timeout: 60,
                    max_retries: 0, price: {{prompt_per_1m: 3.0, completion_per_1m: 7.0}}}}
            tasks:
              - {{id: wait, kind: agent, model: m, instructions: "WAIT: go", timeout: 3}}
            """)
        done = cli(tmp_path, "run", "job.yaml", "--quiet", env=clean_env(tmp_path, TEST_LLM_KEY=KEY))
    assert done.returncode == 1, done.stderr
    run_dir = tmp_path / "runs" / "late"
    (row,) = rows(run_dir)
    assert not (run_dir / "ledger.jsonl").read_text()  # the call it waited for never answered: possibly billed
    (intent,) = [json.loads(line) for line in (run_dir / "ledger.intents.jsonl").read_text().splitlines()]
    assert (intent["attempt"], intent["paired"]) == (1, False)
    assert (row["state"], row["tokens"], float(row["cost_usd"])) == ("failed", "0", 0.0)


@pytest.mark.slow
def test_a_task_placed_on_the_declared_inventory_names_its_node_cores_and_gpus(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: booked}
        execution: {max_workers: 4, inventory: {cpus: 4, gpus: [a, b, c, d]}}
        tasks:
          - {id: wide, kind: shell, run: "true", resources: {cpus: 3}}
          - {id: gpu, kind: shell, run: "true", resources: {gpus_per_rank: 2}, depends_on: [wide]}
        """)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    run_dir = tmp_path / "runs" / "booked"
    found = by_attempt(rows(run_dir))
    placed = {(r["task"], r["attempt"]): r["placement"] for r in journal(run_dir) if "placement" in r}
    node = socket.gethostname()
    for task in ("wide", "gpu"):
        row, placement = found[(task, 1)], placed[(task, 1)]
        assert (row["nodes"], row["cores"], row["gpus"]) == (
            node, placement["cores"][0], ",".join(placement["gpus"][0])), placement
    assert found[("wide", 1)]["cores"] in ("0-2", "1-3") and found[("wide", 1)]["gpus"] == ""
    assert len(found[("gpu", 1)]["cores"].split(",")) == 1 and len(found[("gpu", 1)]["gpus"].split(",")) == 2


SLEEPERS = "version: 1\njob: {name: killed}\nexecution: {max_workers: 2}\ntasks:\n" + "".join(
    f"  - {{id: t{i:03d}, kind: shell, run: 'sleep 0.0{i % 5}; echo {i} > o.txt', outputs: [o.txt]}}\n"
    for i in range(300))


@pytest.mark.slow
def test_a_sigkilled_runner_leaves_whole_rows_and_the_rerun_appends_after_them(tmp_path: Path) -> None:
    write_spec(tmp_path, SLEEPERS)
    run_dir = tmp_path / "runs" / "killed"
    trace = run_dir / "trace.tsv"
    runner = Runner(tmp_path, "job.yaml", "--quiet")
    try:
        wait_until("40 rows in the trace", lambda: trace.exists() and trace.read_text().count("\n") > 40, runner)
        os.kill(runner.proc.pid, signal.SIGKILL)
        runner.wait()
    finally:
        runner.kill()
    before = rows(run_dir)
    assert 40 <= len(before) < 300
    with open(trace, "a") as fh:  # as if the kill had come in the middle of a row
        fh.write("deadbeef\tt999\tshe")
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    after = rows(run_dir)
    assert after[:len(before)] == before
    assert len({row["run"] for row in after[len(before):]}) == 1
    # only the rows of the killed run's last moments are lost: attempts it journaled as they ended
    killed = [r for r in journal(run_dir) if r["run"] == before[0]["run"] and r["state"] == "succeeded"]
    lost = {f"t{i:03d}" for i in range(300)} - {row["task"] for row in after}
    assert all(r["t"] > killed[-1]["t"] - 1.0 for r in killed if r["task"] in lost), lost
    assert lost <= {r["task"] for r in killed}


@pytest.mark.slow
def test_a_full_disk_under_the_trace_is_a_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    write_spec(tmp_path, "version: 1\njob: {name: full}\ntasks:\n"
                         "  - {id: a, kind: shell, run: 'echo a > a.txt', outputs: [a.txt]}\n"
                         "  - {id: b, kind: shell, run: 'echo b > b.txt', outputs: [b.txt], depends_on: [a]}\n")
    run_dir = tmp_path / "runs" / "full"
    run_dir.mkdir(parents=True)
    (run_dir / "trace.tsv").symlink_to("/dev/full")  # every write: ENOSPC
    done = cli(tmp_path, "run", "job.yaml")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    trace = run_dir / "trace.tsv"
    stop = (f"cmbagent-batch: warning: {trace} could not be written (No space left on device): the trace stops "
            "here; the journal keeps every state change")
    assert lines.count(stop) == 1
    said = re.compile(f"cmbagent-batch: warning: {re.escape(str(trace))} lacks the attempts that ended after "
                      r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ): it could not be written")
    last = [m for line in lines if (m := said.fullmatch(line))]
    assert len(last) == 1
    stopped = datetime.strptime(last[0][1], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert 0 <= time.time() - stopped < 600
    assert lines.index(last[0][0]) > lines.index(stop) and lines[-1].startswith("cmbagent-batch: 2 succeeded")
    assert [r["state"] for r in journal(run_dir)] == ["running", "succeeded", "running", "succeeded"]


def test_a_value_holding_a_tab_or_a_newline_is_written_with_spaces() -> None:
    row = TraceRow("r1", "odd\ttask\nid", "shell", "succeeded", 1, None, "h\r1", "1", "1", "0", 0.0, None, 1.5,
                   None, None, None, None, 0, 0.0)
    assert row.line() == (b"r1\todd task id\tshell\tsucceeded\t1\t\th 1\t1\t1\t0\t1970-01-01T00:00:00.000Z\t\t"
                          b"1970-01-01T00:00:01.500Z\t\t\t\t\t0\t0.0\n")
