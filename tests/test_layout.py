"""The run directory at scale: each task's directories are in a shard named by its id (``Layout``), a task
that writes nothing leaves no inode behind, and a run directory made before shards resumes with its flat
paths."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.attempt import WORK_SUBDIRS, Attempt, Outcome, Payload, Sharding, TaskContext
from cmbagent_batch.rundir.layout import LAYOUT_FILE, Layout, shard
from cmbagent_batch.tasks.runner import run_attempts
from tests.helpers.cli import cli, write_spec
from tests.helpers.runs import read_run

PIPELINE = """\
version: 1
job:
  name: lay
  run_dir: run
tasks:
  - id: make
    kind: shell
    run: echo {value} > out.txt
    outputs: [out.txt]
  - id: use
    kind: shell
    inputs: [out.txt]
    run: {use} out.txt > copy.txt
    outputs: [copy.txt]
  - id: quiet
    kind: shell
    run: "true"
"""


def pipeline(tmp_path: Path, value: str = "one", use: str = "cat") -> None:
    write_spec(tmp_path, PIPELINE.format(value=value, use=use))


def names(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_task_s_directories_are_in_its_shard_named_by_its_id(tmp_path: Path) -> None:
    pipeline(tmp_path)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    run_dir = tmp_path / "run"
    layout = Layout.of(str(run_dir))
    assert json.loads((run_dir / LAYOUT_FILE).read_text()) == {
        "layout": "sharded", "shard": "the first 3 hex digits of the SHA-256 of the task id"}
    # the rule the README gives, as a shell one-liner
    one_liner = subprocess.run(["bash", "-c", "printf %s make | sha256sum | cut -c1-3"], capture_output=True,
                               text=True, check=True).stdout.strip()
    assert one_liner == shard("make")
    assert layout.published("make") == f"{run_dir}/outputs/{shard('make')}/make"
    assert Path(layout.published("make"), "out.txt").read_text() == "one\n"
    assert Path(layout.published("use"), "copy.txt").read_text() == "one\n"
    use = Path(layout.work_dir(0, "use"))
    assert use == run_dir / "ranks" / "rank-0000" / "tasks" / shard("use") / "use"
    # the input is staged from the producer's sharded outputs
    assert os.readlink(use / "out.txt") == os.path.join(layout.published("make"), "out.txt")
    # a task that wrote nothing (and logged nothing) left nothing: no work directory, no shard
    assert not os.path.lexists(layout.work_dir(0, "quiet"))
    assert sorted(os.listdir(run_dir / "outputs")) == sorted({shard("make"), shard("use")})
    assert read_run(run_dir)["tasks"]["use"]["work_dir"] == str(use)


def test_only_reruns_a_task_at_its_sharded_place_and_sets_its_outputs_aside_there(tmp_path: Path) -> None:
    pipeline(tmp_path)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    pipeline(tmp_path, use="tac")
    result = cli(tmp_path, "run", "job.yaml", "--only", "use", "--dry-run")
    assert (result.returncode, result.stdout) == (0, "use: run (its spec changed)\n")
    cli(tmp_path, "run", "job.yaml", "--quiet", "--only", "use", check=True)
    layout = Layout.of(str(tmp_path / "run"))
    assert Path(layout.published("use"), "copy.txt").read_text() == "one\n"
    aside = Path(layout.superseded("use"))
    assert aside == tmp_path / "run" / "superseded" / shard("use")
    [earlier] = os.listdir(aside)
    assert earlier.startswith("use-") and (aside / earlier / "copy.txt").read_text() == "one\n"
    kept = Path(layout.kept_work_dir(0, "use"))  # the previous attempt's work directory
    assert (kept / "copy.txt").read_text() == "one\n"
    result = cli(tmp_path, "run", "job.yaml", "--quiet", "--prune-superseded")
    assert (result.returncode, result.stderr) == (0, f"cmbagent-batch: removed 1 earlier output set (4 bytes) from "
                                                     f"{tmp_path}/run/superseded, oldest first (--prune-superseded): "
                                                     f"{earlier}\n")
    assert not aside.exists()  # the shard it left empty went with it


NOOP = """\
version: 1
job:
  name: noop
  run_dir: run
execution:
  use_process_pool: true
  max_workers: 2
tasks:
  - id: n-{{i}}
    kind: python
    call: noop:run
    matrix:
      i: {values}
"""


def inodes_after_noop(tmp_path: Path, n: int) -> list[str]:
    (tmp_path / "noop.py").write_text("def run():\n    return None\n")
    write_spec(tmp_path, NOOP.format(values=list(range(n))))
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    return names(tmp_path / "run")


@pytest.mark.slow
def test_tasks_that_write_nothing_leave_no_inode(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    few, many = inodes_after_noop(tmp_path / "a", 20), inodes_after_noop(tmp_path / "b", 200)
    assert few == many == [".lock", "journal", "journal/index", "journal/rank-0000.jsonl", "journal/why.json",
                           "layout.json", "ranks", "ranks/rank-0000", "report.html", "run.json", "trace.tsv"]


def _directory_operations(run_dir: Path, attempts: list[Attempt]) -> tuple[list[Outcome], list[tuple[str, str]]]:
    """Run ``attempts`` one after the other in this process; the outcomes and the mkdir, rmdir and rename
    calls made under ``run_dir``, in order (a call that failed too)."""
    seen: list[tuple[str, str]] = []
    counting = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if counting[0] and event in ("os.mkdir", "os.rmdir", "os.rename") and str(args[0]).startswith(str(run_dir)):
            seen.append((event, os.path.relpath(str(args[0]), run_dir)))

    sys.addaudithook(hook)  # audit hooks stay for the life of the process: this one stops counting
    environ = dict(os.environ)  # a worker process leaves a task's variables for its next task to replace
    try:
        outcomes = run_attempts(attempts)
    finally:
        counting[0] = False
        os.environ.clear()
        os.environ.update(environ)
    assert all(o.ok for o in outcomes), outcomes
    return outcomes, seen


def _attempts(run_dir: Path, ids: list[str], call: str, chdir: bool) -> list[Attempt]:
    layout = Layout(str(run_dir), Sharding.SHARDED)
    return [Attempt(Payload(id=tid, kind="python", call=call),
                    TaskContext(tid, layout.run_dir, layout.work_dir(0, tid), 0, 1, "node-a", sharding=layout.sharding),
                    links=(), env={}, chdir=chdir, keep=WORK_SUBDIRS) for tid in ids]


def test_python_tasks_in_a_worker_process_that_write_nothing_make_no_directory(tmp_path: Path) -> None:
    """They run in the process's scratch directory, made once; a task that leaves something there gets it
    as its work directory (one rename), and the next task a new scratch directory."""
    run_dir = tmp_path / "run"
    ids = [f"t-{i}" for i in range(40)]
    _, seen = _directory_operations(run_dir, _attempts(run_dir, ids, "tests.test_layout:_nothing", chdir=True))
    scratch = f"ranks/rank-0000/scratch/{os.getpid()}"
    assert seen == [("os.mkdir", scratch), ("os.mkdir", "."), ("os.mkdir", "ranks"), ("os.mkdir", "ranks/rank-0000"),
                    ("os.mkdir", "ranks/rank-0000/scratch"), ("os.mkdir", scratch)]  # tried, then with its parents

    writer = _attempts(run_dir, ["w-1", "w-2"], "tests.test_layout:_writes", chdir=True)
    os.mkdir(run_dir / "ranks" / "rank-0000" / "tasks")
    _, seen = _directory_operations(run_dir, writer)
    work = [os.path.relpath(a.ctx.work_dir, run_dir) for a in writer]
    assert seen == [("os.rename", scratch), ("os.mkdir", os.path.dirname(work[0])), ("os.rename", scratch),
                    ("os.mkdir", scratch), ("os.rename", scratch), ("os.mkdir", os.path.dirname(work[1])),
                    ("os.rename", scratch)]  # a rename into a shard not made yet is tried twice
    for a in writer:
        assert (Path(a.ctx.work_dir) / "note.txt").read_text() == f"{a.ctx.task_id} in scratch/{os.getpid()}\n"
    Layout(str(run_dir), Sharding.SHARDED).remove_empty_shards()
    assert os.listdir(run_dir / "ranks" / "rank-0000") == ["tasks"]


def test_a_thread_renames_the_directory_its_last_task_emptied_into_place_for_the_next(tmp_path: Path) -> None:
    """Python tasks in threads run in their work directories: the first makes one, each later one gets
    the one the task before left empty (two renames a task); none is made or removed per task."""
    run_dir = tmp_path / "run"
    ids = [f"t-{i}" for i in range(40)]
    attempts = _attempts(run_dir, ids, "tests.test_layout:_nothing", chdir=False)
    os.makedirs(run_dir / "ranks" / "rank-0000" / "tasks")
    _, seen = _directory_operations(run_dir, attempts)
    made = [path for event, path in seen if event == "os.mkdir"]
    shards = {shard(tid) for tid in ids}
    first = os.path.relpath(attempts[0].ctx.work_dir, run_dir)  # tried, then made with its shard
    assert sorted(made) == sorted([first, first, "ranks/rank-0000/spares"] + ["ranks/rank-0000/tasks/" + s for s in shards])
    renames = [event for event, _ in seen].count("os.rename")  # a rename into a new shard is tried twice
    assert 2 * len(ids) - 1 <= renames <= 2 * len(ids) + len(shards)
    assert not [path for event, path in seen if event == "os.rmdir"]
    Layout(str(run_dir), Sharding.SHARDED).remove_empty_shards()
    assert os.listdir(run_dir / "ranks" / "rank-0000") == ["tasks"]
    assert not os.listdir(run_dir / "ranks" / "rank-0000" / "tasks")


def _nothing() -> None:
    pass


def _writes(ctx: Any) -> None:
    with open("note.txt", "w") as fh:
        fh.write(f"{ctx.task_id} in scratch/{os.path.basename(ctx.work_dir)}\n")


def test_retention_and_the_logs_decide_what_stays_of_a_success(tmp_path: Path) -> None:
    (tmp_path / "steps.py").write_text(
        "import os\n\n"
        "def scratch(ctx):\n    open(os.path.join(ctx.sub('temp'), 'x'), 'w').close()\n\n"
        "def data():\n    os.mkdir('data')\n    open('data/x', 'w').close()\n")
    write_spec(tmp_path, """\
version: 1
job:
  name: keep
  run_dir: run
execution:
  keep_going: true
tasks:
  - id: scratch
    kind: python
    call: steps:scratch
  - id: data
    kind: python
    call: steps:data
  - id: says
    kind: shell
    run: echo hello >&2
  - id: fails
    kind: shell
    run: exit 3
""")
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert result.returncode == 1, result.stderr
    layout = Layout.of(str(tmp_path / "run"))
    assert not os.path.lexists(layout.work_dir(0, "scratch"))  # temp/ is not kept; nothing else was written
    assert names(Path(layout.work_dir(0, "data"))) == ["data", "data/x"]
    assert names(Path(layout.work_dir(0, "says"))) == ["logs", "logs/stderr.log"]  # the empty stdout.log went
    assert Path(layout.work_dir(0, "says"), "logs", "stderr.log").read_text() == "# attempt 1\nhello\n"
    failed = Path(layout.work_dir(0, "fails"))  # a failure keeps everything
    assert names(failed) == ["logs", "logs/stderr.log", "logs/stdout.log"]
    assert (failed / "logs" / "stdout.log").read_text() == "# attempt 1\n"
    status = cli(tmp_path, "status", "run", "--format", "json")
    rows = {row["id"]: row for row in json.loads(status.stdout)["tasks"]}
    assert (rows["fails"]["work_dir"], rows["fails"]["stderr_tail"]) == (str(failed), ["# attempt 1"])


def test_the_shards_of_a_large_job_stay_small() -> None:
    ids = [f"sim-{a}-{b}" for a in range(1000) for b in range(100)]  # 10^5 tasks
    per_shard = collections.Counter(map(shard, ids))
    assert len(per_shard) == 4096  # every shard used, and no more: the largest outputs/ or tasks/
    assert max(per_shard.values()) < 60  # 24.4 on average: 10^6 tasks put about 250 in each


def test_an_unknown_layout_is_refused_naming_the_file(tmp_path: Path) -> None:
    pipeline(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LAYOUT_FILE).write_text('{"layout": "nested"}\n')
    result = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert (result.returncode, result.stderr) == (
        2, f"cmbagent-batch: error: {tmp_path}/run/layout.json: unknown layout 'nested' (this version knows flat, "
           "sharded); was the run directory made by a newer cmbagent-batch?\n")


def earlier_version_run_dir(tmp_path: Path) -> None:
    """A run directory as an earlier version left it: flat paths, no layout.json, no journal index, and a
    run.json (format 1) listing every task."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LAYOUT_FILE).write_text(json.dumps({"layout": "flat"}))
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    manifest = read_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**manifest, "format": 1}))
    (run_dir / LAYOUT_FILE).unlink()
    (run_dir / "journal" / "index").unlink()


@pytest.mark.slow
def test_a_run_directory_of_the_flat_layout_resumes_with_its_flat_paths(tmp_path: Path) -> None:
    pipeline(tmp_path)
    earlier_version_run_dir(tmp_path)
    run_dir = tmp_path / "run"
    assert not (run_dir / LAYOUT_FILE).exists()
    result = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert (result.returncode, result.stdout) == (0, "make: skip (up to date)\nquiet: skip (up to date)\n"
                                                     "use: skip (up to date)\n")
    pipeline(tmp_path, use="tac")
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    layout = Layout.of(str(run_dir))
    assert json.loads((run_dir / LAYOUT_FILE).read_text()) == {"layout": "flat"}
    assert layout.published("use") == f"{run_dir}/outputs/use"
    use = run_dir / "ranks" / "rank-0000" / "tasks" / "use"
    assert os.readlink(use / "out.txt") == f"{run_dir}/outputs/make/out.txt"  # staged from the flat outputs
    assert (run_dir / "outputs" / "use" / "copy.txt").read_text() == "one\n"
    assert [n.startswith("use-") for n in os.listdir(run_dir / "superseded")] == [True]
    assert (run_dir / "ranks" / "rank-0000" / "superseded" / "use" / "copy.txt").exists()
    assert sorted(os.listdir(run_dir / "outputs")) == ["make", "use"]
    result = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert (result.returncode, result.stdout) == (0, "make: skip (up to date)\nquiet: skip (up to date)\n"
                                                     "use: skip (up to date)\n")
