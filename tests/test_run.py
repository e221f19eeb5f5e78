"""``cmbagent-batch run`` and ``status`` against the real thing: the CLI in a subprocess, bash, process
pools, signals, files in tmp_path (HOME too; CMBAGENT_* variables cleared)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from tests.helpers.cli import Runner, cli, journal, q, wait_until, write_spec
from tests.helpers.processes import live_in_group
from tests.helpers.runs import published, read_run, superseded_sets, work_dir

pytestmark = pytest.mark.slow  # runs, each a CLI in a subprocess

ROOT = Path(__file__).resolve().parents[1]
DIED = "worker died: SIGKILL (killed: out of memory, or by another process)"
WORK_SUBDIRS_KEPT = ["chats", "codebase", "cost", "data", "logs", "outputs"]  # all but temp


# --- helpers ---------------------------------------------------------------------------------------


def status_rows(tmp_path: Path, run_dir: Path, *extra: str) -> dict[str, dict[str, Any]]:
    res = cli(tmp_path, "status", str(run_dir), "--format", "json", *extra)
    assert res.returncode == 0, res.stderr
    return {row["id"]: row for row in json.loads(res.stdout)["tasks"]}


def side_counts(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def alive(pid: int) -> bool:
    """A process that is not a zombie (an orphan's zombie may wait a while for init to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_processes_in(directory: Path) -> list[int]:
    """SIGKILL what a test left behind: the processes whose cwd is in ``directory`` (its tmp_path)."""
    killed = []
    root = str(directory)
    for proc in psutil.process_iter(["cwd"]):
        try:
            cwd = proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (cwd == root or cwd.startswith(root + os.sep)):
                proc.kill()
                killed.append(proc.pid)
        except psutil.Error:
            pass
    return killed


def subdirectories(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink())


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the README's quickstart -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("quickstart")
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp)
    shutil.copy(ROOT / "configs" / "cmbtoy.py", tmp)
    res = cli(tmp, "run", "quickstart.yaml")
    return tmp, res


SPECTRA = ["spectrum-lmax500", "spectrum-lmax1000", "spectrum-lmax2000"]
QUICKSTART_TASKS = sorted(["params", *SPECTRA, "summary"])


def test_quickstart_runs_and_publishes_its_outputs(quickstart: tuple[Path, Any]) -> None:
    tmp, res = quickstart
    assert res.returncode == 0, res.stderr
    run_dir = tmp / "runs" / "quickstart"
    assert res.stderr.splitlines()[-1] == (f"cmbagent-batch: 5 succeeded; run directory {run_dir}; "
                                           f"report {run_dir}/report.html")
    summary = (published(run_dir, "summary") / "summary.txt").read_text()
    assert [line.split() for line in summary.splitlines()] == [
        ["999", "cl_tt_1000.txt"], ["1999", "cl_tt_2000.txt"], ["499", "cl_tt_500.txt"], ["3497", "total"],
    ]
    params = json.loads((published(run_dir, "params") / "params.json").read_text())
    assert params["H0"] == 67.4
    cl = (published(run_dir, "spectrum-lmax500") / "cl_tt_500.txt").read_text().splitlines()
    assert len(cl) == 499 and cl[0].split()[0] == "2" and cl[-1].split()[0] == "500"


def test_quickstart_return_values_are_published(quickstart: tuple[Path, Any]) -> None:
    tmp, _ = quickstart
    run_dir = tmp / "runs" / "quickstart"
    for lmax, task in zip((500, 1000, 2000), SPECTRA):
        work = work_dir(run_dir, task) / "return.json"
        assert json.loads(work.read_text()) == {"lmax": lmax, "n_multipoles": lmax - 1}
        public = published(run_dir, task) / "return.json"
        assert json.loads(public.read_text()) == {"lmax": lmax, "n_multipoles": lmax - 1}


def test_quickstart_run_json(quickstart: tuple[Path, Any]) -> None:
    tmp, _ = quickstart
    run_dir = tmp / "runs" / "quickstart"
    jsonschema.validate(json.loads((run_dir / "run.json").read_text()),
                        json.loads((ROOT / "schemas" / "run.schema.json").read_text()))
    manifest = read_run(run_dir)
    spec = tmp / "quickstart.yaml"
    assert manifest["format"] == 2
    assert "tasks" not in json.loads((run_dir / "run.json").read_text())  # a summary: the journals hold each task
    assert manifest["tasks_total"] == len(QUICKSTART_TASKS)
    assert manifest["job"] == "quickstart"
    assert manifest["spec"] == {"path": str(spec), "sha256": hashlib.sha256(spec.read_bytes()).hexdigest()}
    assert (manifest["backend"], manifest["ranks"], manifest["workers"]) == ("local", 1, 2)
    assert (manifest["status"], manifest["exit_code"], manifest["stop_reason"]) == ("finished", 0, None)
    assert manifest["counts"] == {"succeeded": 5}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["started"])
    assert manifest["ended"] >= manifest["started"]
    assert sorted(manifest["tasks"]) == QUICKSTART_TASKS
    for tid, t in manifest["tasks"].items():
        assert (t["state"], t["attempts"], t["rank"], t["reason"]) == ("succeeded", 1, 0, None)
        assert t["host"] == socket.gethostname()
        assert t["work_dir"] == str(work_dir(run_dir, tid))
        assert re.fullmatch(r"[0-9a-f]{64}", t["fingerprint"])
        assert t["wall_s"] >= 0 and t["cpu_s"] >= 0
    records = journal(run_dir)
    assert {r["run"] for r in records} == {manifest["run_id"]}
    assert [(r["task"], r["state"]) for r in records if r["task"] == "summary"] == [
        ("summary", "running"), ("summary", "succeeded")]


def test_quickstart_run_json_has_the_sizes_of_work_dirs_and_outputs(quickstart: tuple[Path, Any]) -> None:
    tmp, _ = quickstart
    run_dir = tmp / "runs" / "quickstart"
    tasks = read_run(run_dir)["tasks"]
    size = (published(run_dir, "spectrum-lmax2000") / "cl_tt_2000.txt").stat().st_size
    assert tasks["spectrum-lmax2000"]["output_bytes"] >= size
    assert tasks["spectrum-lmax2000"]["work_bytes"] >= size


def test_quickstart_work_dirs_layout_and_linked_inputs(quickstart: tuple[Path, Any]) -> None:
    tmp, _ = quickstart
    run_dir = tmp / "runs" / "quickstart"
    tasks_dir = run_dir / "ranks" / "rank-0000" / "tasks"
    places = sorted(str(work_dir(run_dir, tid).relative_to(tasks_dir)) for tid in QUICKSTART_TASKS)
    assert sorted(str(p.relative_to(tasks_dir)) for p in tasks_dir.glob("*/*")) == places
    # README: subdirectories are made when used; shell tasks start with logs/ only
    for tid in QUICKSTART_TASKS:
        made = subdirectories(work_dir(run_dir, tid))
        assert "temp" not in made and set(made) <= set(WORK_SUBDIRS_KEPT), tid
    # its logs held only the attempt's header: removed after its success (README: a task that writes nothing)
    assert subdirectories(work_dir(run_dir, "params")) == []
    assert (work_dir(run_dir, "spectrum-lmax500") / "return.json").is_file()
    # inputs appear at the same relative path, linked from the producer's published outputs
    link = work_dir(run_dir, "spectrum-lmax1000") / "params.json"
    assert link.is_symlink() and os.readlink(link) == str(published(run_dir, "params") / "params.json")
    for name in ("cl_tt_500.txt", "cl_tt_1000.txt", "cl_tt_2000.txt"):
        producer = "spectrum-lmax" + name[len("cl_tt_"):-len(".txt")]
        assert os.readlink(work_dir(run_dir, "summary") / name) == str(published(run_dir, producer) / name)
    assert not (work_dir(run_dir, "params") / "logs").exists()
    outputs = run_dir / "outputs"  # no staging leftovers
    assert sorted(str(p.relative_to(outputs)) for p in outputs.glob("*/*")) == sorted(
        str(published(run_dir, tid).relative_to(outputs)) for tid in QUICKSTART_TASKS)


# --- what a task sees ------------------------------------------------------------------------------


def test_environment_cwd_and_process_group_of_tasks(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import os

        def env_and_cwd(ctx):
            return {"cwd": os.getcwd(), "ctx": [ctx.task_id, ctx.work_dir, ctx.run_dir, ctx.rank, ctx.attempt],
                    "env": {k: v for k, v in os.environ.items() if k.startswith("CMBAGENT_")}}
    """))
    write_spec(tmp_path, """
        version: 1
        job: {name: envjob}
        execution: {max_workers: 2, isolation: process}
        tasks:
          - id: sh-{z}
            kind: shell
            matrix: {z: [7]}
            run: |
              env | grep '^CMBAGENT_' | sort > env.txt
              pwd -P > cwd.txt
              echo "$$ $(cut -d' ' -f5 /proc/$$/stat)" > group.txt
            outputs: [env.txt, cwd.txt, group.txt]
          - id: py
            kind: python
            call: probe:env_and_cwd
    """)
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "envjob"
    out = published(run_dir, "sh-7")
    assert (out / "env.txt").read_text().splitlines() == sorted([
        "CMBAGENT_ATTEMPT=1",
        f"CMBAGENT_HOST={socket.gethostname()}",
        "CMBAGENT_MATRIX_Z=7",
        "CMBAGENT_RANK=0",
        f"CMBAGENT_RUN_DIR={run_dir}",
        f"CMBAGENT_TASK_DIR={work_dir(run_dir, 'sh-7')}",
        "CMBAGENT_TASK_ID=sh-7",
    ])
    assert (out / "cwd.txt").read_text().strip() == str(work_dir(run_dir, "sh-7").resolve())
    pid, pgid = (out / "group.txt").read_text().split()
    assert pid == pgid  # bash leads its own process group
    # A python task in a worker process runs in the process's scratch directory, which becomes its work
    # directory when it ends (here it returned a value, so it left return.json there).
    work = work_dir(run_dir, "py")
    got = json.loads((work / "return.json").read_text())
    scratch = got["cwd"]
    assert re.fullmatch(re.escape(str(run_dir / "ranks" / "rank-0000" / "scratch")) + r"/\d+", scratch), scratch
    assert got["ctx"] == ["py", scratch, str(run_dir), 0, 1]
    assert got["env"] == {"CMBAGENT_ATTEMPT": "1", "CMBAGENT_HOST": socket.gethostname(), "CMBAGENT_RANK": "0",
                          "CMBAGENT_RUN_DIR": str(run_dir), "CMBAGENT_TASK_DIR": scratch,
                          "CMBAGENT_TASK_ID": "py"}
    assert not os.path.exists(scratch)


def test_inputs_are_linked_from_producers_and_from_the_spec_directory(tmp_path: Path) -> None:
    (tmp_path / "ext.txt").write_text("external\n")
    write_spec(tmp_path, """
        version: 1
        job: {name: links}
        tasks:
          - id: prod
            kind: shell
            run: mkdir -p maps && echo produced > maps/x.txt
            outputs: [maps/x.txt]
          - id: cons
            kind: shell
            run: cat maps/x.txt ext.txt > both.txt
            inputs: [maps/x.txt, ext.txt]
            outputs: [both.txt]
    """)
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "links"
    work = work_dir(run_dir, "cons")
    assert os.readlink(work / "maps" / "x.txt") == str(published(run_dir, "prod") / "maps" / "x.txt")
    assert os.readlink(work / "ext.txt") == str(tmp_path / "ext.txt")
    assert (published(run_dir, "cons") / "both.txt").read_text() == "produced\nexternal\n"


def retention_spec(tmp_path: Path, script: str) -> None:
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: keep}}
        execution: {{keep_going: true}}
        tasks:
          - id: ok
            kind: shell
            run: {json.dumps(script)}
          - id: bad
            kind: shell
            run: {json.dumps(script + "; exit 5")}
    """)


def test_temp_is_removed_after_success_and_kept_after_a_failure(tmp_path: Path) -> None:
    retention_spec(tmp_path, "mkdir -p temp data codebase && echo s > temp/scratch && echo d > data/d.txt")
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 1
    run_dir = tmp_path / "runs" / "keep"
    assert subdirectories(work_dir(run_dir, "ok")) == ["codebase", "data"]  # its logs held only their headers
    assert (work_dir(run_dir, "ok") / "data" / "d.txt").read_text() == "d\n"
    assert subdirectories(work_dir(run_dir, "bad")) == ["codebase", "data", "logs", "temp"]
    assert (work_dir(run_dir, "bad") / "temp" / "scratch").read_text() == "s\n"  # left whole, to see what went wrong


def test_shell_tasks_start_with_logs_and_make_the_rest_when_they_need_them(tmp_path: Path) -> None:
    retention_spec(tmp_path, "test -d logs && test ! -e temp && mkdir temp && echo s > temp/scratch")
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 1, res.stderr
    rows = status_rows(tmp_path, tmp_path / "runs" / "keep")
    assert (rows["ok"]["state"], rows["bad"]["reason"]) == ("succeeded", "exit code 5")


def test_a_declared_output_not_written_fails_the_task(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: missing}
        tasks:
          - id: t
            kind: shell
            run: mkdir -p temp && touch other.txt temp/scratch
            outputs: [other.txt, missing.txt]
    """)
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 1
    assert res.stderr.splitlines()[-2:] == [
        f"cmbagent-batch: 1 failed; run directory {tmp_path / 'runs' / 'missing'}; "
        f"report {tmp_path / 'runs' / 'missing' / 'report.html'}",
        "  failed: t (attempt 1): declared output 'missing.txt' was not written",
    ]
    row = status_rows(tmp_path, tmp_path / "runs" / "missing")["t"]
    assert (row["state"], row["reason"]) == ("failed", "declared output 'missing.txt' was not written")
    assert not published(tmp_path / "runs" / "missing", "t").exists()
    work = work_dir(tmp_path / "runs" / "missing", "t")
    assert (work / "temp" / "scratch").exists() and (work / "other.txt").exists()  # left whole


def test_a_task_retried_twice_succeeds_on_its_third_attempt_and_every_attempt_is_journaled(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: retry}}
        execution: {{retries: 2, retry_backoff: 0.05}}
        tasks:
          - id: flaky
            kind: shell
            run: |
              n=$(( $(cat {q(counter)} 2>/dev/null || echo 0) + 1 ))
              echo $n > {q(counter)}
              echo "try $n" >&2
              [ $n -ge 3 ]
    """)
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert counter.read_text() == "3\n"
    run_dir = tmp_path / "runs" / "retry"
    records = [r for r in journal(run_dir) if r["task"] == "flaky"]
    assert [(r["state"], r["attempt"]) for r in records] == [
        ("running", 1), ("retrying", 1), ("running", 2), ("retrying", 2), ("running", 3), ("succeeded", 3)]
    retrying = [r for r in records if r["state"] == "retrying"]
    assert [(r["reason"], r["error"], r["exit_code"], r["timed_out"]) for r in retrying] == [
        ("exit code 1", "exit code 1", 1, False)] * 2
    assert 0.025 <= retrying[0]["retry_in_s"] <= 0.05 and 0.05 <= retrying[1]["retry_in_s"] <= 0.1
    row = status_rows(tmp_path, run_dir)["flaky"]
    assert (row["state"], row["attempts"]) == ("succeeded", 3)
    logs = work_dir(run_dir, "flaky") / "logs"
    assert logs.joinpath("stderr.log").read_text() == "# attempt 1\ntry 1\n# attempt 2\ntry 2\n# attempt 3\ntry 3\n"
    assert read_run(run_dir)["tasks"]["flaky"]["attempts"] == 3


def test_a_timeout_kills_the_task_and_its_grandchildren(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: timeout}}
        execution: {{kill_grace: 1}}
        tasks:
          - id: sleepy
            kind: shell
            timeout: 1
            run: |
              echo $$ >> {q(pids)}
              sleep 300 & echo $! >> {q(pids)}
              bash -c 'sleep 300 & echo $! >> {q(pids)}; wait' & echo $! >> {q(pids)}
              wait
    """)
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == "  failed: sleepy (attempt 1): timed out after 1 s (process group killed)"
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 4
    assert [p for p in started if alive(p)] == []
    record = journal(tmp_path / "runs" / "timeout")[-1]
    assert (record["state"], record["timed_out"]) == ("failed", True)


# --- failures and their dependents -----------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--keep-going", "--fail-fast"])
def test_upstream_failed_and_keep_going_or_fail_fast(tmp_path: Path, flag: str) -> None:
    mark, done = tmp_path / "slow-started", tmp_path / "waker-ran"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: fails}}
        execution: {{max_workers: 2}}
        tasks:
          - id: bad
            kind: shell
            run: |
              for i in $(seq 1000); do [ -e {q(mark)} ] && break; sleep 0.02; done
              exit 3
          - {{id: child, kind: shell, run: "true", depends_on: [bad]}}
          - {{id: grandchild, kind: shell, run: "true", depends_on: [child]}}
          - id: slow
            kind: shell
            run: |
              touch {q(mark)}
              while [ ! -e {q(done)} ]; do sleep 0.02; done
          - id: waker
            kind: shell
            run: touch {q(done)}
    """)
    res = cli(tmp_path, "run", "job.yaml", flag, "--quiet")
    assert res.returncode == 1, res.stderr
    rows = status_rows(tmp_path, tmp_path / "runs" / "fails")
    got = {tid: (row["state"], row.get("reason")) for tid, row in rows.items()}
    upstream = ("upstream_failed", "upstream task 'bad' failed")
    if flag == "--keep-going":
        assert got == {"bad": ("failed", "exit code 3"), "child": upstream, "grandchild": upstream,
                       "slow": ("succeeded", None), "waker": ("succeeded", None)}
    else:
        assert got == {"bad": ("failed", "exit code 3"), "child": upstream, "grandchild": upstream,
                       "slow": ("cancelled", "terminated by the runner (fail-fast)"),
                       "waker": ("cancelled", "not run: the job stopped (fail-fast)")}
        assert not done.exists()
    records = journal(tmp_path / "runs" / "fails")
    assert [r["root"] for r in records if r["state"] == "upstream_failed"] == ["bad", "bad"]
    manifest = read_run(tmp_path / "runs" / "fails")
    assert (manifest["status"], manifest["exit_code"]) == ("finished", 1)


# --- python workers killed -------------------------------------------------------------------------


KILLERS = """
import os
import time


def die_once(ctx):
    if ctx.attempt == 1:
        os.kill(os.getpid(), 9)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


def die_always():
    os.kill(os.getpid(), 9)


def die_beside(mark):
    deadline = time.monotonic() + 20
    while not os.path.exists(mark) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), 9)


def innocent(mark):
    open(mark, "w").close()
    time.sleep(3)
    return "fine"


def fine():
    return "fine"
"""


def test_a_killed_python_worker_is_survived(tmp_path: Path) -> None:
    (tmp_path / "killers.py").write_text(KILLERS)
    write_spec(tmp_path, """
        version: 1
        job: {name: killed}
        execution: {max_workers: 2, isolation: process, keep_going: true, retry_backoff: 0}
        tasks:
          - {id: once, kind: python, call: "killers:die_once", retries: 1}
          - {id: always, kind: python, call: "killers:die_always"}
          - {id: after-once, kind: python, call: "killers:fine", depends_on: [once]}
          - {id: sh, kind: shell, run: "echo hi"}
    """)
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines()[-1] == f"  failed: always (attempt 1): {DIED}"
    run_dir = tmp_path / "runs" / "killed"
    rows = status_rows(tmp_path, run_dir)
    states = {tid: (row["state"], row["attempts"]) for tid, row in rows.items()}
    assert states == {"once": ("succeeded", 2), "always": ("failed", 1), "after-once": ("succeeded", 1),
                      "sh": ("succeeded", 1)}
    assert rows["always"]["reason"] == DIED
    records = journal(run_dir)
    assert [(r["state"], r["attempt"], r.get("reason")) for r in records if r["task"] == "once"] == [
        ("running", 1, None), ("retrying", 1, DIED), ("running", 2, None), ("succeeded", 2, None)]
    assert json.loads((work_dir(run_dir, "once") / "return.json").read_text())["attempt"] == 2
    assert json.loads((work_dir(run_dir, "after-once") / "return.json").read_text()) == "fine"


def test_a_task_running_beside_a_killed_worker_still_succeeds(tmp_path: Path) -> None:
    (tmp_path / "killers.py").write_text(KILLERS)
    mark = tmp_path / "innocent-started"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: beside}}
        execution: {{max_workers: 2, isolation: process, keep_going: true, retry_backoff: 0}}
        tasks:
          - {{id: dies, kind: python, call: "killers:die_beside", args: {{mark: {q(mark)}}}}}
          - {{id: innocent, kind: python, call: "killers:innocent", args: {{mark: {q(mark)}}}}}
    """)
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 1, res.stderr
    rows = status_rows(tmp_path, tmp_path / "runs" / "beside")
    assert (rows["dies"]["state"], rows["dies"]["reason"]) == ("failed", DIED)
    assert rows["innocent"]["state"] == "succeeded"


# --- signals and resume ----------------------------------------------------------------------------


def resumable_spec(tmp_path: Path, side: Path, pids: Path, release: Path) -> None:
    wait = f"echo $CMBAGENT_TASK_ID >> {q(side)}; echo $$ >> {q(pids)}; [ -e {q(release)} ] || sleep 60"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: resume}}
        execution: {{max_workers: 2, kill_grace: 2}}
        tasks:
          - {{id: q1, kind: shell, run: "echo $CMBAGENT_TASK_ID >> {q(side)}"}}
          - {{id: q2, kind: shell, run: "echo $CMBAGENT_TASK_ID >> {q(side)}"}}
          - {{id: w1, kind: shell, run: "{wait}", depends_on: [q1, q2]}}
          - {{id: w2, kind: shell, run: "{wait}", depends_on: [q1, q2]}}
          - {{id: final, kind: shell, run: "echo $CMBAGENT_TASK_ID >> {q(side)}", depends_on: [w1, w2]}}
    """)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_stops_the_run_and_a_rerun_completes_it_without_running_a_success_twice(
        tmp_path: Path, runners: list[Runner], sig: signal.Signals, code: int) -> None:
    side, pids, release = tmp_path / "side", tmp_path / "pids", tmp_path / "release"
    resumable_spec(tmp_path, side, pids, release)
    run_dir = tmp_path / "runs" / "resume"
    first = Runner(tmp_path, "job.yaml", "--quiet")
    runners.append(first)
    wait_until("w1 and w2 are running", lambda: {"w1", "w2"} <= set(side_counts(side)) and pids.exists()
               and len(pids.read_text().split()) == 2, first)
    first.proc.send_signal(sig)
    assert first.wait() == code, first.stderr()
    started = [int(p) for p in pids.read_text().split()]
    assert [(p, live_in_group(p)) for p in started if live_in_group(p)] == []  # no process of the job left
    manifest = read_run(run_dir)
    assert (manifest["status"], manifest["stop_reason"], manifest["exit_code"]) == ("interrupted", sig.name, code)
    records = journal(run_dir)
    ran_first = {r["task"] for r in records if r["state"] == "running"}
    succeeded_first = {r["task"] for r in records if r["state"] == "succeeded"}
    assert succeeded_first == {"q1", "q2"} and ran_first == {"q1", "q2", "w1", "w2"}
    rows = status_rows(tmp_path, run_dir)
    assert {tid: row["state"] for tid, row in rows.items()} == {
        "q1": "succeeded", "q2": "succeeded", "w1": "interrupted", "w2": "interrupted", "final": "pending"}
    assert rows["w1"]["reason"] == f"terminated by the runner ({sig.name})"

    release.touch()
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    expected = {t: int(t in ran_first) + int(t not in succeeded_first) for t in ("q1", "q2", "w1", "w2", "final")}
    assert side_counts(side) == expected
    assert expected == {"q1": 1, "q2": 1, "w1": 2, "w2": 2, "final": 1}
    states = {tid: row["state"] for tid, row in status_rows(tmp_path, run_dir).items()}
    assert states == dict.fromkeys(expected, "succeeded")
    manifest = read_run(run_dir)
    assert {tid: t["state"] for tid, t in manifest["tasks"].items()} == {
        "q1": "skipped", "q2": "skipped", "w1": "succeeded", "w2": "succeeded", "final": "succeeded"}
    assert manifest["tasks"]["q1"]["reason"] == "succeeded in an earlier run; unchanged"
    assert manifest["tasks"]["w1"]["attempts"] == 2  # one interrupted, one that succeeded


def chain_spec(tmp_path: Path, side: Path, b_version: str = "v1", d_retries: int = 0) -> None:
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: chain}}
        execution: {{max_workers: 2}}
        tasks:
          - {{id: a, kind: shell, run: "echo a >> {q(side)}"}}
          - {{id: b, kind: shell, run: "echo b >> {q(side)}; echo {b_version} > out.txt", depends_on: [a],
              outputs: [out.txt]}}
          - {{id: c, kind: shell, run: "echo c >> {q(side)}; cp out.txt c.txt", inputs: [out.txt],
              outputs: [c.txt]}}
          - {{id: d, kind: shell, run: "echo d >> {q(side)}", retries: {d_retries}}}
    """)


def test_editing_a_task_reruns_it_and_its_dependents_only(tmp_path: Path) -> None:
    side = tmp_path / "side"
    chain_spec(tmp_path, side)
    run_dir = tmp_path / "runs" / "chain"
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 0
    assert side_counts(side) == {"a": 1, "b": 1, "c": 1, "d": 1}

    chain_spec(tmp_path, side, b_version="v2", d_retries=3)  # retries are not part of the fingerprint
    rows = status_rows(tmp_path, run_dir, "--explain")
    assert {tid: row["next_run"] for tid, row in rows.items()} == {
        "a": "skip (up to date)", "b": "run (its spec changed)", "c": "run (upstream changed: b)",
        "d": "skip (up to date)"}
    text = cli(tmp_path, "status", str(run_dir), "--explain")
    assert [line.split("next: ")[1] for line in text.stdout.splitlines()[2:]] == [
        "skip (up to date)", "run (its spec changed)", "run (upstream changed: b)", "skip (up to date)"]
    dry = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert dry.returncode == 0
    assert sorted(dry.stdout.splitlines()) == ["a: skip (up to date)", "b: run (its spec changed)",
                                               "c: run (upstream changed: b)", "d: skip (up to date)"]
    assert side_counts(side) == {"a": 1, "b": 1, "c": 1, "d": 1}

    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 0
    assert side_counts(side) == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert (published(run_dir, "c") / "c.txt").read_text() == "v2\n"
    superseded = superseded_sets(run_dir, ("a", "b", "c", "d"))
    assert sorted(p.name.split("-")[0] for p in superseded) == ["b", "c"]
    old_b = next(p for p in superseded if p.name.startswith("b-"))
    assert (old_b / "out.txt").read_text() == "v1\n"
    rows = status_rows(tmp_path, run_dir, "--explain")
    assert {row["next_run"] for row in rows.values()} == {"skip (up to date)"}


def test_a_rerun_runs_failed_tasks_and_their_blocked_dependents_only(tmp_path: Path) -> None:
    side, fixed = tmp_path / "side", tmp_path / "fixed"
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: refail}}
        execution: {{keep_going: true}}
        tasks:
          - {{id: ok, kind: shell, run: "echo ok >> {q(side)}"}}
          - {{id: bad, kind: shell, run: "echo bad >> {q(side)}; [ -e {q(fixed)} ]"}}
          - {{id: child, kind: shell, run: "echo child >> {q(side)}", depends_on: [bad]}}
    """)
    run_dir = tmp_path / "runs" / "refail"
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 1
    assert side_counts(side) == {"ok": 1, "bad": 1}
    rows = status_rows(tmp_path, run_dir, "--explain")
    assert {tid: row["next_run"] for tid, row in rows.items()} == {
        "ok": "skip (up to date)", "bad": "run (last run ended failed: exit code 1)",
        "child": "run (last run ended upstream_failed: upstream task 'bad' failed)"}
    fixed.touch()
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    assert side_counts(side) == {"ok": 1, "bad": 2, "child": 1}
    rows = status_rows(tmp_path, run_dir)
    assert {tid: (row["state"], row["attempts"]) for tid, row in rows.items()} == {
        "ok": ("succeeded", 1), "bad": ("succeeded", 2), "child": ("succeeded", 1)}


# --- the lock --------------------------------------------------------------------------------------


def holding_spec(tmp_path: Path, pidfile: Path, release: Path, python_first: bool = False) -> None:
    (tmp_path / "quick.py").write_text("def quick():\n    return 1\n")
    extra = "execution: {isolation: process}\n" if python_first else ""
    first = "  - {id: py, kind: python, call: \"quick:quick\"}\n" if python_first else ""
    deps = ", depends_on: [py]" if python_first else ""
    hold = f"echo $$ > {q(pidfile)}; while [ ! -e {q(release)} ]; do sleep 0.02; done"
    (tmp_path / "job.yaml").write_text(
        "version: 1\njob: {name: locked}\n" + extra + "tasks:\n" + first
        + f"  - {{id: hold, kind: shell, run: \"{hold}\"{deps}}}\n")


LOCKED = ("cmbagent-batch: error: run directory {run_dir} is in use by pid {pid} on {host} since "
          r"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(its watchdog: pid \d+\); wait for that run to end, or use "
          "another --run-dir")


def test_a_second_run_on_a_run_dir_in_use_is_refused(tmp_path: Path, runners: list[Runner]) -> None:
    pidfile, release = tmp_path / "hold.pid", tmp_path / "release"
    holding_spec(tmp_path, pidfile, release)
    run_dir = tmp_path / "runs" / "locked"
    first = Runner(tmp_path, "job.yaml", "--quiet")
    runners.append(first)
    wait_until("the task holds", lambda: pidfile.exists() and pidfile.read_text().strip(), first)
    def live() -> tuple[Any, ...]:
        shown = json.loads(cli(tmp_path, "status", str(run_dir), "--format", "json").stdout)
        return shown["status"], shown["exit_code"], [t["state"] for t in shown["tasks"]]

    # a start is journaled within ~0.1 s (the scheduler picks it up, the journal writer writes it)
    wait_until("status shows it running", lambda: live() == ("running", None, ["running"]), first)
    expected = LOCKED.format(run_dir=re.escape(str(run_dir)), pid=first.proc.pid, host=re.escape(socket.gethostname()))
    for args in (["job.yaml"], ["job.yaml", "--fresh"]):
        second = cli(tmp_path, "run", *args)
        assert second.returncode == 2
        assert re.fullmatch(expected + "\n", second.stderr), second.stderr
    release.touch()
    assert first.wait() == 0, first.stderr()
    assert not list(tmp_path.glob("runs/locked.old-*"))  # --fresh moved nothing


@pytest.mark.parametrize("python_first", [False, True], ids=["shell", "after-a-process-pool-task"])
def test_the_lock_of_a_killed_run_is_not_stale(tmp_path: Path, runners: list[Runner], python_first: bool) -> None:
    pidfile, release = tmp_path / "hold.pid", tmp_path / "release"
    holding_spec(tmp_path, pidfile, release, python_first)
    first = Runner(tmp_path, "job.yaml", "--quiet")
    runners.append(first)
    try:
        wait_until("the task holds", lambda: pidfile.exists() and pidfile.read_text().strip(), first)
        first.proc.kill()
        first.wait()
        kill_group(int(pidfile.read_text()))  # the orphaned task (a SIGKILLed runner cannot stop it)
        release.touch()
        res = cli(tmp_path, "run", "job.yaml", "--quiet")
        assert res.returncode == 0, res.stderr
        assert status_rows(tmp_path, tmp_path / "runs" / "locked")["hold"]["state"] == "succeeded"
    finally:
        kill_processes_in(tmp_path)


def test_a_signal_stops_python_tasks_running_in_worker_processes(tmp_path: Path, runners: list[Runner]) -> None:
    pidfile = tmp_path / "worker.pid"
    (tmp_path / "slow.py").write_text(textwrap.dedent(f"""
        import os, time

        def slow():
            with open({str(pidfile)!r}, "w") as fh:
                fh.write(str(os.getpid()))
            time.sleep(60)
    """))
    write_spec(tmp_path, """
        version: 1
        job: {name: pyterm}
        execution: {isolation: process, kill_grace: 1}
        tasks:
          - {id: slow, kind: python, call: "slow:slow"}
    """)
    first = Runner(tmp_path, "job.yaml", "--quiet")
    runners.append(first)
    try:
        wait_until("the worker runs", lambda: pidfile.exists() and pidfile.read_text(), first)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 143
        worker = int(pidfile.read_text())
        assert not alive(worker)
        row = status_rows(tmp_path, tmp_path / "runs" / "pyterm")["slow"]
        assert row["state"] == "interrupted" and "abandoned" not in row["reason"]
    finally:
        kill_processes_in(tmp_path)


# --- flags -----------------------------------------------------------------------------------------


def test_fresh_keeps_the_old_run_dir_aside(tmp_path: Path) -> None:
    side = tmp_path / "side"
    chain_spec(tmp_path, side)
    run_dir = tmp_path / "runs" / "chain"
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 0
    old_manifest = read_run(run_dir)
    res = cli(tmp_path, "run", "job.yaml", "--fresh", "--quiet")
    assert res.returncode == 0, res.stderr
    match = re.fullmatch(r"cmbagent-batch: the previous run directory is kept at (.*)\n", res.stderr)
    assert match, res.stderr
    old = Path(match.group(1))
    assert re.fullmatch(re.escape(str(run_dir)) + r"\.old-\d{8}-\d{6}", str(old))
    moved = {tid: {**t, "work_dir": t["work_dir"].replace(str(run_dir), str(old), 1)}  # where it now is
             for tid, t in old_manifest["tasks"].items()}
    assert read_run(old) == {**old_manifest, "tasks": moved}
    assert side_counts(side) == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert {r["run"] for r in journal(run_dir)} == {read_run(run_dir)["run_id"]}
    assert (published(old, "c") / "c.txt").read_text() == "v1\n"


def test_dry_run_runs_nothing(tmp_path: Path) -> None:
    side = tmp_path / "side"
    chain_spec(tmp_path, side)
    res = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["a: run (never ran)", "b: run (never ran)", "c: run (never ran)",
                                               "d: run (never ran)"]
    assert not side.exists()
    assert not (tmp_path / "runs" / "chain" / "journal").exists()


def test_only_runs_the_named_tasks_and_the_dependencies_they_still_need(tmp_path: Path) -> None:
    side = tmp_path / "side"
    chain_spec(tmp_path, side)
    run_dir = tmp_path / "runs" / "chain"
    dry = cli(tmp_path, "run", "job.yaml", "--only", "b", "--dry-run")
    assert dry.stdout.splitlines() == ["a: run (never ran)", "b: run (never ran)"]
    res = cli(tmp_path, "run", "job.yaml", "--only", "b", "--quiet")
    assert res.returncode == 0, res.stderr
    assert side_counts(side) == {"a": 1, "b": 1}
    tasks = read_run(run_dir)["tasks"]
    assert {tid: (t["state"], t["reason"]) for tid, t in tasks.items()} == {
        "a": ("succeeded", None), "b": ("succeeded", None),
        "c": ("skipped", "not selected by --only"), "d": ("skipped", "not selected by --only")}
    res = cli(tmp_path, "run", "job.yaml", "--only", "c*", "--quiet")
    assert res.returncode == 0, res.stderr
    assert side_counts(side) == {"a": 1, "b": 1, "c": 1}  # a and b were done already
    res = cli(tmp_path, "run", "job.yaml", "--only", "nope")
    assert (res.returncode, res.stderr) == (2, "cmbagent-batch: error: --only 'nope' matches no task\n")


STAMP = """
import os
import time


def stamp(log):
    with open(log, "a") as fh:
        fh.write(f"start {os.environ['CMBAGENT_TASK_ID']} {time.time_ns()}\\n")
    time.sleep(0.2)
    with open(log, "a") as fh:
        fh.write(f"end {os.environ['CMBAGENT_TASK_ID']} {time.time_ns()}\\n")
"""


@pytest.mark.parametrize(("flags", "mixed"), [
    (["--mode", "sequential"], False),
    (["--workers", "1"], False),
    (["--mode", "sequential"], True),
], ids=["sequential", "workers-1", "sequential-shell-and-process-pool"])
def test_one_task_at_a_time(tmp_path: Path, flags: list[str], mixed: bool) -> None:
    log = tmp_path / "events"
    pause = 1.5 if mixed else 0.2  # mixed: long enough for the process pool to start beside it
    step = f'echo "start $CMBAGENT_TASK_ID $(date +%s%N)" >> {q(log)}; sleep {pause}; ' \
           f'echo "end $CMBAGENT_TASK_ID $(date +%s%N)" >> {q(log)}'
    tasks = "".join(f"  - {{id: a{i}, kind: shell, run: '{step}'}}\n" for i in range(2 if mixed else 4))
    execution = "{max_workers: 4}"
    if mixed:
        (tmp_path / "stamp.py").write_text(STAMP)
        execution = "{max_workers: 4, isolation: process}"
        tasks += "".join(f"  - {{id: p{i}, kind: python, call: 'stamp:stamp', args: {{log: {q(log)}}}}}\n"
                         for i in range(2))
    (tmp_path / "job.yaml").write_text(f"version: 1\njob: {{name: seq}}\nexecution: {execution}\ntasks:\n" + tasks)
    res = cli(tmp_path, "run", "job.yaml", "--quiet", *flags)
    assert res.returncode == 0, res.stderr
    events = sorted((int(ns), kind, tid) for kind, tid, ns in (line.split() for line in log.read_text().splitlines()))
    kinds = [(kind, tid) for _, kind, tid in events]
    assert len(kinds) == 8
    for i in range(0, 8, 2):  # every start is followed by the end of the same task
        assert kinds[i][0] == "start" and kinds[i + 1] == ("end", kinds[i][1]), kinds
    assert read_run(tmp_path / "runs" / "seq")["workers"] == 1


def test_run_dir_flag_and_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    write_spec(tmp_path, """
        version: 1
        job: {name: bad}
        tasks:
          - {id: a, kind: shell, rnu: "true"}
    """, name="specs/bad.yaml")
    res = cli(tmp_path, "run", "specs/bad.yaml")
    assert (res.returncode, res.stderr.splitlines()) == (2, [
        "specs/bad.yaml:4:5: $.tasks[0] (task 'a'): a shell task needs 'run'",
        "specs/bad.yaml:4:26: $.tasks[0].rnu (task 'a'): unknown key 'rnu' (did you mean 'run'?)",
    ])
    assert not (tmp_path / "specs" / "runs").exists()
    res = cli(tmp_path, "run", "specs/bad.yaml", "--workers", "0")
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1] == "cmbagent-batch run: error: argument --workers: expected a whole number " \
                                          "of at least 1, got '0'"
    res = cli(tmp_path, "run", "specs/none.yaml")
    assert (res.returncode, res.stderr) == (2, "specs/none.yaml: no such file\n")


def test_a_relative_run_dir_flag_is_relative_to_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    write_spec(tmp_path, """
        version: 1
        job: {name: rd}
        tasks:
          - {id: a, kind: shell, run: "true"}
    """, name="specs/job.yaml")
    res = cli(tmp_path, "run", "specs/job.yaml", "--run-dir", "out", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "run.json").exists()
    assert cli(tmp_path, "status", "out").returncode == 0


# --- status ----------------------------------------------------------------------------------------


def test_status_shows_the_reason_and_the_stderr_tail_of_a_failed_task(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: st}
        execution: {keep_going: true}
        tasks:
          - id: bad
            kind: shell
            run: |
              echo to-stdout
              for i in 1 2 3 4 5 6 7; do echo "err line $i" >&2; done
              exit 4
          - {id: ok, kind: shell, run: "true"}
    """)
    run_dir = tmp_path / "runs" / "st"
    assert cli(tmp_path, "run", "job.yaml", "--quiet").returncode == 1
    res = cli(tmp_path, "status", str(run_dir))
    assert res.returncode == 0, res.stderr
    lines = [re.sub(r" +\d+\.\d\ds$", " <wall>", line) for line in res.stdout.splitlines()]
    assert lines == [
        f"Job st in {run_dir}: finished, exit code 1",
        "2 tasks: 1 succeeded, 1 failed",
        "  bad  failed          attempts 1 <wall>",
        "      exit code 4",
        "      | err line 3",
        "      | err line 4",
        "      | err line 5",
        "      | err line 6",
        "      | err line 7",
        "  ok   succeeded       attempts 1 <wall>",
    ]
    row = status_rows(tmp_path, run_dir)["bad"]
    assert row["stderr_tail"] == [f"err line {i}" for i in range(3, 8)]


def test_status_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    res = cli(tmp_path, "status", str(tmp_path))
    message = (f"cmbagent-batch: error: {tmp_path} is not a run directory (no run.json); status takes RUN_DIR, a run "
               "directory (with run.json), or SPEC, a job spec (its run directory, as run finds it)\n")
    assert (res.returncode, res.stderr) == (2, message)
