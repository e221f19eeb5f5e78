"""The run report, RUN_DIR/report.html: written by every run as it ends (failed and stopped runs too) and by
``cmbagent-batch report``; its figures, read by id, against run.json, the journals and the ledger; and the
page as headless Chromium renders it (no script error, nothing fetched, not blank), for a run with a
failure and a retry, an agent task on the scripted endpoint and an MPI run under ``mpiexec -n 3``."""

from __future__ import annotations

import html
import json
import math
import re
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.report import refresh
from cmbagent_batch.report.refresh import Refresher
from tests.helpers.browser import find_chromium, run_chromium
from tests.helpers.cli import Runner, clean_env, cli, wait_until, write_spec
from tests.helpers.mpi_run import MIXED, MPIEXEC, mpirun, write
from tests.helpers.scripted_llm import Reply, ScriptedLLM

FAILING = """\
version: 1
job: {name: rt}
execution: {max_workers: 2, keep_going: true, retries: 1, retry_backoff: 0.1}
tasks:
  - id: flaky
    kind: shell
    run: 'if [ "$CMBAGENT_ATTEMPT" = 1 ]; then echo first fails >&2; exit 3; fi; sleep 0.2'
  - id: bad
    kind: shell
    retries: 0
    run: 'echo broken thing >&2; exit 7'
  - id: after-bad
    kind: shell
    depends_on: [bad]
    run: 'true'
  - id: p{i}
    kind: shell
    matrix: {i: [1, 2, 3]}
    run: 'sleep 0.1'
"""
AGENT = """\
version: 1
job: {{name: agentic}}
llm:
  models:
    m: {{model: test-model, base_url: "{url}", api_key_env: TEST_LLM_KEY, timeout: 30, max_retries: 0,
        price: {{prompt_per_1m: 1.0, completion_per_1m: 2.0}}}}
tasks:
  - id: think
    kind: agent
    model: m
    instructions: "THINK: go"
    outputs: [thought.md]
  - id: after
    kind: shell
    depends_on: [think]
    run: 'true'
"""
FORMS = "report takes RUN_DIR, a run directory (with run.json), or SPEC, a job spec (its run directory, as run finds it)"


def figures(page: str) -> dict[str, str]:
    """Every ``id`` with a ``data-value`` on the page: id -> value."""
    return {m[1]: html.unescape(m[2]) for m in re.finditer(r'\bid="([^"]+)"[^>]*?\bdata-value="([^"]*)"', page)}


def journal(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((run_dir / "journal").glob("rank-*.jsonl"))
            for line in p.read_text().splitlines()]


def check_against_the_run(run_dir: Path) -> dict[str, str]:
    """The page's figures against run.json, the journals and the ledger."""
    page = (run_dir / "report.html").read_text()
    got = figures(page)
    m = json.loads((run_dir / "run.json").read_text())
    assert int(got["tasks-total"]) == m["tasks_total"]
    for state, n in m["counts"].items():
        assert int(got[f"count-{state}"]) == n, state
    mine = [r for r in journal(run_dir) if r["run"] == m["run_id"] and r.get("by") != "worker"]  # not a copy
    span = max(r["t"] for r in mine) - min(r["t"] for r in mine)
    assert math.isclose(float(got["makespan"]), span, abs_tol=1e-5)
    starts = {(r["task"], r["attempt"]): r["t"] for r in mine if r["state"] == "running"}
    ends: dict[tuple[str, int], tuple[float, float, bool]] = {}  # an attempt's end: the worker's own if any
    for r in journal(run_dir):
        key = (r["task"], r.get("attempt"))
        worker = r.get("by") == "worker" and bool(r.get("wall_s"))
        if r["run"] == m["run_id"] and r["state"] != "running" and key in starts and (key not in ends or worker):
            ends[key] = (r["t"], float(r.get("wall_s") or 0.0), worker)
    # a bar: as the worker ran it; else from its hand-over (``running``), or its end less its wall time if later
    busy = sum(wall if worker else end - (max(min(starts[key], end), end - wall) if wall else min(starts[key], end))
               for key, (end, wall, worker) in ends.items())
    assert math.isclose(float(got["core-hours-used"]), busy / 3600, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(float(got["utilisation"]), busy / (m["workers"] * span), rel_tol=1e-3)
    cost = m["ledger"]["cost_usd"] if m["ledger"] else 0.0
    assert math.isclose(float(got["llm-cost"]), cost, rel_tol=1e-9, abs_tol=1e-12)
    return got


def test_a_failed_run_writes_its_report_and_names_it_last(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING)
    res = cli(tmp_path, "run", "job.yaml")
    run_dir = tmp_path / "runs" / "rt"
    assert res.returncode == 1
    assert res.stderr.splitlines()[-2:] == [
        f"cmbagent-batch: 4 succeeded, 1 failed, 1 upstream_failed; run directory {run_dir}; "
        f"report {run_dir}/report.html", "  failed: bad (attempt 1): exit code 7"]
    got = check_against_the_run(run_dir)
    assert (got["count-failed"], got["count-upstream_failed"], got["failures"]) == ("1", "1", "2")
    page = (run_dir / "report.html").read_text()
    rows = re.findall(r"<tr data-state=.*?</tr>", page, re.S)
    assert [re.search(r'class="name">([^<]+)', r)[1] for r in rows[:2]] == ["bad", "after-bad"]  # failures first
    assert "broken thing" in rows[0] and "exit code 7" in rows[0]
    assert "upstream task &#x27;bad&#x27; failed" in rows[1] and "root cause: <b>bad</b> (failed: exit code 7)" in rows[1]
    assert "never ran" in rows[0]  # a first run: the failed task had no record before it
    assert int(figures(page)["gantt"]) == 6  # five tasks ran, one of them twice


def test_report_writes_where_o_says_from_the_run_directory_or_the_spec(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING)
    cli(tmp_path, "run", "job.yaml")
    res = cli(tmp_path, "report", "job.yaml", "-o", "elsewhere.html")
    assert (res.returncode, res.stdout) == (0, "wrote elsewhere.html: 6 tasks, 6 attempts in 1 run(s)\n"), res.stderr
    assert figures((tmp_path / "elsewhere.html").read_text())["tasks-total"] == "6"


def test_report_of_no_run_directory_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = cli(tmp_path, "report", "nowhere")
    assert (res.returncode, res.stderr) == (2, f"cmbagent-batch: error: nowhere: no such file or directory; {FORMS}\n")
    res = cli(tmp_path, "report", "empty")
    assert (res.returncode, res.stderr) == (2, f"cmbagent-batch: error: empty is not a run directory (no run.json); {FORMS}\n")
    write_spec(tmp_path, FAILING)
    res = cli(tmp_path, "report", "job.yaml")
    assert (res.returncode, res.stderr) == (2, f"cmbagent-batch: error: {tmp_path}/runs/rt, the run directory of job.yaml, "
                                               "holds no run yet (no run.json); `cmbagent-batch run job.yaml` starts one\n")


def test_a_refresh_that_fails_is_one_warning(tmp_path: Path) -> None:
    said: list[str] = []
    now = [0.0]
    refresher = Refresher(str(tmp_path), said.append, interval=30, clock=lambda: now[0])
    refresher.tick()
    assert refresher._proc is None  # not before 30 s
    now[0] = 31
    refresher.tick()
    assert refresher._proc is not None
    refresher._proc.wait(timeout=60)
    now[0] = 62
    refresher.tick()  # sees the failure, says it, starts again
    refresher._proc.wait(timeout=60)
    now[0] = 200
    refresher.tick()
    assert said == [f"could not refresh {tmp_path}/report.html: cmbagent-batch: error: {tmp_path} is not a run "
                    f"directory (no run.json); {FORMS}"]
    refresher.finish(None)


def test_a_report_that_cannot_be_written_is_a_warning(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING)
    (tmp_path / "runs" / "rt" / "report.html").mkdir(parents=True)
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 1
    warning = [line for line in res.stderr.splitlines() if "run report" in line]
    assert warning == [f"cmbagent-batch: warning: could not write the run report {tmp_path}/runs/rt/report.html: "
                       "Is a directory"]
    assert res.stderr.splitlines()[-2] == ("cmbagent-batch: 4 succeeded, 1 failed, 1 upstream_failed; run directory "
                                           f"{tmp_path}/runs/rt")


@pytest.mark.slow
def test_why_each_task_ran_is_what_status_explain_said(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING)
    cli(tmp_path, "run", "job.yaml")
    spec = (tmp_path / "job.yaml").read_text().replace("sleep 0.1", "sleep 0.05").replace("exit 7", "true")
    (tmp_path / "job.yaml").write_text(spec + "  - id: extra\n    kind: shell\n    run: 'true'\n")
    explain = cli(tmp_path, "status", "runs/rt", "--explain", "--format", "json")
    said = {t["id"]: t["next_run"] for t in json.loads(explain.stdout)["tasks"]}
    assert said["bad"] == "run (last run ended failed: exit code 7)" and said["flaky"] == "skip (up to date)"
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "runs" / "rt" / "report.html").read_text()
    why = {re.search(r'class="name">([^<]+)', r)[1]: html.unescape(re.search(r'class="why">([^<]*)', r)[1])
           for r in re.findall(r"<tr data-state=.*?</tr>", page, re.S)}
    for tid, next_run in said.items():
        if tid != "extra":
            assert why[tid] == (next_run[5:-1] if next_run.startswith("run (") else
                                "skipped: succeeded in an earlier run; unchanged"), tid
    assert why["extra"] == "never ran"
    got = check_against_the_run(tmp_path / "runs" / "rt")
    assert got["runs"] == "2"  # one line per run


@pytest.mark.slow
def test_a_stopped_run_writes_its_report(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING.replace("sleep 0.1", "sleep 30"))
    runner = Runner(tmp_path, "job.yaml")
    run_dir = tmp_path / "runs" / "rt"
    wait_until("tasks run", lambda: (run_dir / "journal" / "rank-0000.jsonl").exists()
               and b'"p1","state":"running"' in (run_dir / "journal" / "rank-0000.jsonl").read_bytes(), runner)
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait() == 143
    got = figures((run_dir / "report.html").read_text())
    assert got["run-status"] == "interrupted" and int(got["count-interrupted"]) >= 1
    assert runner.stderr().splitlines()[-2].endswith(f"; report {run_dir}/report.html")


def browse(tmp_path: Path, page: Path) -> dict[str, str]:
    """The page in headless Chromium: no script error, nothing loaded, no console error, not blank; its
    figures as the browser has them."""
    chromium = find_chromium()
    r = run_chromium(chromium, tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    body = re.search(r"<body[^>]*>", r.stdout)[0]
    assert 'data-ready="1"' in body and 'data-errors="0"' in body and 'data-resources="0"' in body, body
    assert not re.search(r"CONSOLE|Refused to", r.stderr), r.stderr[-2000:]
    png = tmp_path / "page.png"
    run_chromium(chromium, tmp_path, f"--screenshot={png}", "--window-size=1280,2400", page.as_uri())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1280, 2400)
    assert len(data) > 60_000  # a blank or error page is a few KB
    return figures(r.stdout)


@pytest.mark.slow
def test_chromium_shows_a_run_with_a_failure_and_a_retry(tmp_path: Path) -> None:
    write_spec(tmp_path, FAILING)
    cli(tmp_path, "run", "job.yaml")
    run_dir = tmp_path / "runs" / "rt"
    assert browse(tmp_path, run_dir / "report.html") == check_against_the_run(run_dir)


@pytest.mark.slow
def test_chromium_shows_an_agent_run_with_its_cost(tmp_path: Path) -> None:
    with ScriptedLLM(lambda body: Reply("a thought", usage={"prompt_tokens": 1000, "completion_tokens": 100,
                                                            "total_tokens": 1100})) as srv:
        write_spec(tmp_path, AGENT.format(url=srv.base_url))
        res = cli(tmp_path, "run", "job.yaml", env=clean_env(tmp_path, TEST_LLM_KEY="sk-test-0123456789"), timeout=180)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "agentic"
    got = browse(tmp_path, run_dir / "report.html")
    assert got == check_against_the_run(run_dir)
    m = json.loads((run_dir / "run.json").read_text())
    assert float(got["llm-cost"]) == m["ledger"]["cost_usd"] > 0 and int(got["llm-calls"]) == m["ledger"]["entries"]
    assert float(got["cost-per-success"]) == m["ledger"]["cost_usd"] / 2
    assert (run_dir / "report.ledger.html").is_file()
    assert 'href="report.ledger.html"' in (run_dir / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_chromium_shows_an_mpi_run_on_three_ranks(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "runs" / "mixed"

    def reply(body: Any) -> Reply:
        time.sleep(0.3)
        return Reply("a thought", usage={"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100})

    with ScriptedLLM(reply) as srv:
        path = write(tmp_path, MIXED.format(url=srv.base_url, run_dir=run_dir))
        res = mpirun(tmp_path, 3, "run", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    got = browse(tmp_path, run_dir / "report.html")
    assert got == check_against_the_run(run_dir)
    page = (run_dir / "report.html").read_text()
    assert "rank 1" in page and "rank 2" in page  # the attempts on the worker ranks' rows
    assert int(got["gantt"]) == 13 and got["dag-nodes"] == "13"


def test_the_last_page_of_a_big_job_is_written_by_a_report_process_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_spec(tmp_path, FAILING)
    cli(tmp_path, "run", "job.yaml")
    run_dir = tmp_path / "runs" / "rt"
    (run_dir / "report.html").unlink()
    monkeypatch.setattr(refresh, "IN_PROCESS_MAX", 3)  # a job of more tasks than this: its own process
    said: list[str] = []
    assert Refresher(str(run_dir), said.append).finish(None, tasks=4) == str(run_dir / "report.html")
    assert said == [] and 'id="tasks-total"' in (run_dir / "report.html").read_text()
    assert Refresher(str(tmp_path), said.append).finish(None, tasks=4) is None
    assert said == [f"could not write the run report {tmp_path}/report.html: cmbagent-batch: error: {tmp_path} is "
                    f"not a run directory (no run.json); {FORMS}"]


def test_a_job_too_big_for_its_run_to_write_the_page_says_how_to_get_it(tmp_path: Path) -> None:
    said: list[str] = []
    now = [0.0]
    big = refresh.RUN_WRITES_MAX + 1
    refresher = Refresher(str(tmp_path), said.append, interval=30, clock=lambda: now[0], tasks=big)
    now[0] = 1000
    refresher.tick()
    assert refresher._proc is None and refresher.finish(None, tasks=big) is None and said == []
    assert refresher.skipped(big) == (f"report not written by the run ({big:,} tasks, over "
                                      f"{refresh.RUN_WRITES_MAX:,}): `cmbagent-batch report {tmp_path}` writes it")
    assert Refresher(str(tmp_path), said.append, tasks=3).skipped(3) == ""


def test_a_batchs_attempts_journaled_together_are_drawn_end_to_end_each_its_own_length() -> None:
    from cmbagent_batch.report.gather import Attempts, _end_to_end, _lanes

    a = Attempts()
    spans = [(1, 9.0, 10.0), (1, 9.5, 10.0002), (1, 9.8, 10.0004),  # one batch: its ends journaled together
             (1, 7.0, 8.0),  # before it, on the same rank
             (2, 9.6, 10.0001)]  # another rank, ending at the same moment: left alone
    for i, (rank, start, end) in enumerate(spans):
        k = a.add(i, 0, 1, start)
        a.rank[k], a.end[k] = rank, end
    _end_to_end(a)
    got = [(round(a.start[k], 4), round(a.end[k], 4)) for k in range(len(a))]
    assert got == [(8.2998, 9.2998), (9.2998, 9.8), (9.8, 10.0004), (7.0, 8.0), (9.6, 10.0001)]
    _lanes(a)
    assert [a.lane[k] for k in range(len(a))] == [0, 0, 0, 0, 0]
