"""Task runners against the real thing: bash processes, process pools, files in tmp_path."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from cmbagent_batch.attempt import WORK_SUBDIRS, Outcome, Payload, TaskContext
from cmbagent_batch.tasks import workdir
from cmbagent_batch.tasks.python import run_python
from cmbagent_batch.tasks.shell import ShellLaunch, run_shell, terminate_all
from cmbagent_batch.tasks.workdir import OutputError, cleanup, prepare, publish, stage_inputs
from tests.helpers.processes import live_in_group

T = TypeVar("T")

BASE_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"}


def make_ctx(tmp_path: Path, task: str = "t1", attempt: int = 1, matrix: dict[str, Any] | None = None) -> TaskContext:
    run_dir = tmp_path / "run"
    work = run_dir / "ranks" / "rank-0000" / "tasks" / task
    ctx = TaskContext(task, str(run_dir), str(work), 0, attempt, "node-a", matrix or {})
    prepare(ctx)
    return ctx


def shell(ctx: TaskContext, script: str, timeout: float | None = None, env: dict[str, str] | None = None,
          base_env: dict[str, str] | None = None, grace: float = 1.0) -> Outcome:
    payload = Payload(id=ctx.task_id, kind="shell", run=textwrap.dedent(script), env=env or {}, timeout=timeout)
    return run_shell(payload, ctx, BASE_ENV if base_env is None else base_env, kill_grace=grace)


def returns_before_a_hang(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a thread, failing if it has not returned after 120 s: a guard against a
    hang (a timeout that did not stop a task of 1000 s), not a measure of speed."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=120)
    finally:
        pool.shutdown(wait=False)


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- work directories ------------------------------------------------------------------------------


def test_prepare_creates_every_subdirectory_and_may_run_again(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    prepare(ctx)
    assert sorted(os.listdir(ctx.work_dir)) == sorted(WORK_SUBDIRS)


def test_a_rerun_cannot_change_published_outputs_through_hard_links(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    upstream = tmp_path / "upstream"
    write(str(upstream), {"shared/u.txt": "upstream", "top.txt": "top"})
    stage_inputs(ctx, [(str(upstream / "shared"), "data/up"), (str(upstream / "top.txt"), "top.txt")])
    write(ctx.work_dir, {"outputs/a.txt": "v1", "mine.txt": "m1"})
    publish(ctx, ["outputs", "data", "mine.txt", "top.txt"])
    final = tmp_path / "run" / "outputs" / "t1"
    assert os.stat(final / "outputs/a.txt").st_ino == os.stat(Path(ctx.work_dir, "outputs/a.txt")).st_ino
    prepare(ctx)  # the next run of the task: the earlier directory is set aside, links and all
    Path(ctx.work_dir, "outputs/a.txt").write_text("v2")
    Path(ctx.work_dir, "mine.txt").write_text("m2")
    assert (final / "outputs/a.txt").read_text() == "v1" and (final / "mine.txt").read_text() == "m1"
    # files reached through staged symlinks belong to the upstream task: left as they are
    assert os.stat(upstream / "shared/u.txt").st_ino == os.stat(final / "data/up/u.txt").st_ino
    aside = tmp_path / "run" / "ranks" / "rank-0000" / "superseded" / "t1"
    assert os.path.islink(aside / "data/up") and os.path.islink(aside / "top.txt")
    assert not os.path.lexists(Path(ctx.work_dir, "data/up")) and not os.path.lexists(Path(ctx.work_dir, "top.txt"))
    assert not os.path.islink(final / "top.txt") and (final / "top.txt").read_text() == "top"  # data, not a link


def test_stage_inputs_links_files_and_directories(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    (tmp_path / "src.txt").write_text("input")
    (tmp_path / "srcdir").mkdir()
    stage_inputs(ctx, [(str(tmp_path / "src.txt"), "data/in.txt"), (str(tmp_path / "srcdir"), "data/deep/er/dir")])
    assert os.readlink(Path(ctx.work_dir, "data/in.txt")) == str(tmp_path / "src.txt")
    assert Path(ctx.work_dir, "data/in.txt").read_text() == "input"
    assert os.readlink(Path(ctx.work_dir, "data/deep/er/dir")) == str(tmp_path / "srcdir")


def test_stage_inputs_replaces_a_stale_symlink_but_not_a_file(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    for name in ("old", "new"):
        (tmp_path / name).write_text(name)
    stage_inputs(ctx, [(str(tmp_path / "old"), "data/x")])
    stage_inputs(ctx, [(str(tmp_path / "new"), "data/x")])
    assert Path(ctx.work_dir, "data/x").read_text() == "new"
    real = Path(ctx.work_dir, "data/real.txt")
    real.write_text("mine")
    with pytest.raises(FileExistsError) as err:
        stage_inputs(ctx, [(str(tmp_path / "new"), "data/real.txt")])
    assert str(err.value) == f"cannot stage input 'data/real.txt': {real} already exists and is not a symlink"
    assert real.read_text() == "mine"


@pytest.mark.parametrize(("destination", "message"), [
    ("/etc/x", "input destination '/etc/x' is absolute and escapes the task's work directory"),
    ("../x", "input destination '../x' uses '..' and escapes the task's work directory"),
    ("data/../../x", "input destination 'data/../../x' uses '..' and escapes the task's work directory"),
    ("data/..", "input destination 'data/..' names the work directory itself"),
])
def test_stage_inputs_refuses_destinations_outside_the_work_dir(tmp_path: Path, destination: str, message: str) -> None:
    ctx = make_ctx(tmp_path)
    (tmp_path / "src").write_text("s")
    with pytest.raises(ValueError) as err:
        stage_inputs(ctx, [(str(tmp_path / "src"), destination)])
    assert str(err.value) == message


def test_stage_inputs_refuses_to_write_through_a_linked_directory(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    outside = tmp_path / "upstream"
    outside.mkdir()
    (tmp_path / "src").write_text("s")
    stage_inputs(ctx, [(str(outside), "data/up")])
    with pytest.raises(ValueError) as err:
        stage_inputs(ctx, [(str(tmp_path / "src"), "data/up/sub/x")])
    assert str(err.value) == "input destination 'data/up/sub/x' escapes the task's work directory through a symlink"
    assert list(outside.iterdir()) == []


def test_stage_inputs_wants_an_existing_absolute_source(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    with pytest.raises(ValueError, match=r"^input source 'rel' for 'data/x' is not an absolute path$"):
        stage_inputs(ctx, [("rel", "data/x")])
    with pytest.raises(FileNotFoundError) as err:
        stage_inputs(ctx, [(str(tmp_path / "nope"), "data/x")])
    assert str(err.value) == f"input source '{tmp_path / 'nope'}' for 'data/x' does not exist"


def write(root: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = Path(root, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_publish_files_globs_and_directories(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    write(ctx.work_dir, {"outputs/summary.txt": "s", "outputs/c1.csv": "1", "outputs/c2.csv": "2",
                         "outputs/skip.log": "no", "plots/a/b.png": "png", "plots/c.png": "c", "temp/x": "t"})
    published = publish(ctx, ["outputs/summary.txt", "outputs/*.csv", "plots", "plots/*.png"])
    assert published == ["outputs/c1.csv", "outputs/c2.csv", "outputs/summary.txt", "plots"]
    final = tmp_path / "run" / "outputs" / "t1"
    assert tree(final) == {"outputs/c1.csv": "1", "outputs/c2.csv": "2", "outputs/summary.txt": "s",
                           "plots/a/b.png": "png", "plots/c.png": "c"}
    assert os.stat(final / "outputs/c1.csv").st_ino == os.stat(Path(ctx.work_dir, "outputs/c1.csv")).st_ino
    assert sorted(os.listdir(tmp_path / "run" / "outputs")) == ["t1"]  # no staging dir, no marker left


def test_publish_names_every_missing_output_and_changes_nothing(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    write(ctx.work_dir, {"outputs/a.txt": "a"})
    os.symlink("/nonexistent/target", Path(ctx.work_dir, "outputs/dangling"))
    with pytest.raises(OutputError) as one:
        publish(ctx, ["outputs/a.txt", "outputs/b.txt"])
    assert str(one.value) == "declared output 'outputs/b.txt' was not written"
    with pytest.raises(OutputError) as many:
        publish(ctx, ["outputs/b.txt", "outputs/a.txt", "results/*.dat", "outputs/dangling"])
    assert str(many.value) == ("declared outputs 'outputs/b.txt', 'results/*.dat', 'outputs/dangling' "
                               "were not written")
    assert many.value.missing == ["outputs/b.txt", "results/*.dat", "outputs/dangling"]
    assert str(pickle.loads(pickle.dumps(many.value))) == str(many.value)
    assert not (tmp_path / "run" / "outputs").exists()


def test_publish_refuses_outputs_outside_the_work_dir(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    with pytest.raises(ValueError, match=r"^declared output '\.\./x' uses '\.\.' and escapes"):
        publish(ctx, ["../x"])


def test_publish_refuses_a_task_id_that_is_not_a_plain_name(tmp_path: Path) -> None:
    ctx = TaskContext("../evil", str(tmp_path / "run"), str(tmp_path / "w"), 0, 1, "h")
    with pytest.raises(ValueError, match="cannot name a directory"):
        publish(ctx, [])


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_publish_again_moves_the_old_outputs_to_superseded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            swap: bool) -> None:
    if not swap:
        monkeypatch.setattr(workdir, "_exchange", lambda a, b: False)
    ctx = make_ctx(tmp_path)
    write(ctx.work_dir, {"outputs/a.txt": "v1", "outputs/only-v1.txt": "old"})
    publish(ctx, ["outputs/*.txt"])
    prepare(make_ctx(tmp_path, attempt=1))  # a later run of the same task, in an empty directory
    Path(ctx.work_dir, "outputs/a.txt").write_text("v2")
    assert publish(ctx, ["outputs/*.txt"]) == ["outputs/a.txt"]
    assert tree(tmp_path / "run" / "outputs" / "t1") == {"outputs/a.txt": "v2"}
    superseded = list((tmp_path / "run" / "superseded").iterdir())
    assert len(superseded) == 1 and re.fullmatch(r"t1-\d{8}T\d{12}Z-[0-9a-f]{8}", superseded[0].name)
    assert tree(superseded[0]) == {"outputs/a.txt": "v1", "outputs/only-v1.txt": "old"}


def test_publish_with_nothing_declared_installs_an_empty_directory(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    assert publish(ctx, []) == []
    assert os.listdir(tmp_path / "run" / "outputs" / "t1") == []


CRASH = """
import os, sys
from cmbagent_batch.tasks import workdir
from cmbagent_batch.attempt import TaskContext
def crash(*args):
    os._exit(7)
workdir._install = crash
ctx = TaskContext("t1", sys.argv[1], sys.argv[2], 0, 1, "h")
workdir.publish(ctx, ["outputs"])
"""


def test_a_crashed_publish_leaves_old_outputs_and_its_staging_dir_is_removed_next_time(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    write(ctx.work_dir, {"outputs/a.txt": "v1"})
    publish(ctx, ["outputs"])
    Path(ctx.work_dir, "outputs/a.txt").unlink()
    write(ctx.work_dir, {"outputs/a.txt": "v2"})
    done = subprocess.run([sys.executable, "-c", CRASH, ctx.run_dir, ctx.work_dir], check=False)
    assert done.returncode == 7
    root = tmp_path / "run" / "outputs"
    left = sorted(os.listdir(root))
    assert left == [".staging-t1", "t1"]
    assert tree(root / "t1") == {"outputs/a.txt": "v1"}  # the old outputs are still in place
    publish(ctx, ["outputs"])
    assert sorted(os.listdir(root)) == ["t1"]
    assert tree(root / "t1") == {"outputs/a.txt": "v2"}


def test_cleanup_removes_what_is_not_kept(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    write(ctx.work_dir, {"temp/big/x": "x", "outputs/o": "o", "logs/stderr.log": "# attempt 1\nwarning\n",
                         "logs/stdout.log": "# attempt 1\n"})
    cleanup(ctx, {"outputs", "logs"})
    assert sorted(os.listdir(ctx.work_dir)) == ["logs", "outputs"]
    assert os.listdir(Path(ctx.work_dir, "logs")) == ["stderr.log"]  # the log holding only its header went
    cleanup(ctx, {"outputs", "logs"})
    with pytest.raises(ValueError, match=r"^cannot keep 'output': not a work subdirectory"):
        cleanup(ctx, {"output"})


# --- shell tasks -----------------------------------------------------------------------------------


def test_shell_task_writes_files_logs_and_sees_its_environment(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, task="sim-3", attempt=2, matrix={"alpha": 0.5, "model": "lcdm", "fast": True})
    base = {**BASE_ENV, "FROM_BASE": "base", "FROM_BOTH": "base", "CMBAGENT_TASK_ID": "stale"}
    out = shell(ctx, """
        echo hello > outputs/greeting.txt
        echo to-stderr >&2
        echo "$BASH_VERSION" > outputs/bash.txt
        env | grep -E '^(CMBAGENT_|FROM_)' | sort > outputs/env.txt
    """, env={"FROM_TASK": "task", "FROM_BOTH": "task"}, base_env=base)
    assert out.ok and out.error is None and out.exit_code == 0 and not out.timed_out
    assert Path(ctx.outputs_dir, "greeting.txt").read_text() == "hello\n"
    assert Path(ctx.outputs_dir, "bash.txt").read_text().strip()  # bash, not sh
    env = dict(line.split("=", 1) for line in Path(ctx.outputs_dir, "env.txt").read_text().splitlines())
    assert env == {
        "CMBAGENT_TASK_ID": "sim-3", "CMBAGENT_TASK_DIR": ctx.work_dir, "CMBAGENT_RUN_DIR": ctx.run_dir,
        "CMBAGENT_RANK": "0", "CMBAGENT_ATTEMPT": "2", "CMBAGENT_HOST": "node-a",
        "CMBAGENT_MATRIX_ALPHA": "0.5", "CMBAGENT_MATRIX_MODEL": "lcdm", "CMBAGENT_MATRIX_FAST": "true",
        "FROM_BASE": "base", "FROM_BOTH": "task", "FROM_TASK": "task",
    }
    assert Path(ctx.logs_dir, "stdout.log").read_text() == "# attempt 2\n"
    assert Path(ctx.logs_dir, "stderr.log").read_text() == "# attempt 2\nto-stderr\n"


def test_retries_append_to_the_logs(tmp_path: Path) -> None:
    for attempt in (1, 2):
        ctx = make_ctx(tmp_path, attempt=attempt)
        shell(ctx, 'echo "out $CMBAGENT_ATTEMPT"; echo "err $CMBAGENT_ATTEMPT" >&2')
    assert Path(ctx.logs_dir, "stdout.log").read_text() == "# attempt 1\nout 1\n# attempt 2\nout 2\n"
    assert Path(ctx.logs_dir, "stderr.log").read_text() == "# attempt 1\nerr 1\n# attempt 2\nerr 2\n"


def test_shell_stdin_is_empty(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    assert shell(ctx, "cat > outputs/stdin.txt").ok
    assert Path(ctx.outputs_dir, "stdin.txt").read_text() == ""


@pytest.mark.parametrize(("script", "code", "error"), [
    ("exit 3", 3, "exit code 3"),
    ("kill -9 $$", -9, "killed by signal 9 (SIGKILL)"),
    ("kill -TERM $$", -15, "killed by signal 15 (SIGTERM)"),
])
def test_shell_failures(tmp_path: Path, script: str, code: int, error: str) -> None:
    out = shell(make_ctx(tmp_path), script)
    assert (out.ok, out.exit_code, out.error, out.timed_out) == (False, code, error, False)


def test_missing_bash_is_a_clear_error(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "nowhere")
    out = shell(make_ctx(tmp_path), "true", base_env={"PATH": nowhere})
    assert (out.ok, out.error) == (False, f"bash not found on PATH ({nowhere})")


def test_a_shell_task_without_a_command_fails_cleanly(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    out = run_shell(Payload(id="t1", kind="shell"), ctx, BASE_ENV)
    assert (out.ok, out.error) == (False, "shell task has no 'run' command")


@pytest.mark.slow
def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    out = returns_before_a_hang(shell, ctx, """
        echo $$ > pids
        sleep 1000 & echo $! >> pids
        bash -c 'sleep 1000 & echo $! >> pids; wait' &
        sleep 1000; wait
    """, timeout=1, grace=2)  # the 1 s timeout stopped the sleeps of 1000 s
    assert (out.ok, out.timed_out, out.error) == (False, True, "timed out after 1 s (process group killed)")
    assert out.exit_code == -signal.SIGTERM  # TERM was enough
    leader, *rest = pids(Path(ctx.work_dir, "pids"))
    assert len(rest) == 2 and all(is_gone(pid) for pid in [leader, *rest])
    assert live_in_group(leader) == []


@pytest.mark.slow
def test_timeout_kills_what_ignores_term_after_the_grace(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    # the script notes each TERM and goes on; its children ignore TERM
    out = returns_before_a_hang(shell, ctx, """
        trap 'echo TERM >> events' TERM
        echo $$ > pids
        (trap '' TERM; exec sleep 1000) & echo $! >> pids
        while :; do wait; echo "alive after TERM" >> events; done
    """, timeout=1, grace=1.5)
    assert (out.timed_out, out.error) == (True, "timed out after 1 s (process group killed)")
    assert out.exit_code == -signal.SIGKILL
    # TERM came first, and the script kept running after it until KILL: KILL came only after the grace
    assert Path(ctx.work_dir, "events").read_text().splitlines()[:2] == ["TERM", "alive after TERM"]
    leader, child = pids(Path(ctx.work_dir, "pids"))
    assert is_gone(leader) and is_gone(child) and live_in_group(leader) == []


def test_timeout_sends_term_first_so_a_script_can_clean_up(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    out = shell(ctx, "trap 'echo caught > outputs/trap.txt; exit 0' TERM; sleep 1000 & wait", timeout=0.5, grace=10)
    assert (out.ok, out.timed_out, out.exit_code) == (False, True, 0)
    assert out.error == "timed out after 0.5 s (process group killed)"
    assert Path(ctx.outputs_dir, "trap.txt").read_text() == "caught\n"


def test_processes_left_in_the_background_are_stopped_when_the_script_ends(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    out = shell(ctx, "echo $$ > pids; sleep 1000 & echo $! >> pids; echo done > outputs/done.txt")
    assert out.ok and out.exit_code == 0
    leader, child = pids(Path(ctx.work_dir, "pids"))
    assert is_gone(child) and live_in_group(leader) == []


def test_a_script_that_ended_with_0_before_a_stop_reached_it_succeeded(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    payload = Payload(id=ctx.task_id, kind="shell", run="echo done > outputs/done.txt")
    ready = ShellLaunch.prepare(payload, ctx, BASE_ENV)
    assert isinstance(ready, ShellLaunch)
    spawned = ready.spawn()
    assert not isinstance(spawned, Outcome)
    stat = Path(f"/proc/{spawned[0].pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # bash has exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    terminate_all(0.5)  # the stop comes now: bash is not registered yet, so it is told when it is
    out = ready.wait(spawned, 0.5)
    assert (out.ok, out.error, out.exit_code) == (True, None, 0)


def test_terminate_all_from_another_thread(tmp_path: Path) -> None:
    assert terminate_all(1.0) == 0
    outcomes: dict[str, Outcome] = {}
    ctxs = [make_ctx(tmp_path, task=f"long{i}") for i in range(2)]

    def run(ctx: TaskContext) -> None:
        outcomes[ctx.task_id] = shell(ctx, "echo $$ > pid; sleep 1000 & wait", timeout=600)

    threads = [threading.Thread(target=run, args=(ctx,)) for ctx in ctxs]
    for t in threads:
        t.start()
    for ctx in ctxs:
        wait_for(Path(ctx.work_dir, "pid"))
    # bash runs before its thread registers the group; one registered after this call stops itself
    assert terminate_all(2.0) in (1, 2)
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    for ctx in ctxs:
        out = outcomes[ctx.task_id]
        assert (out.ok, out.timed_out, out.error, out.exit_code) == (False, False, "terminated by the runner", -15)
        assert live_in_group(pids(Path(ctx.work_dir, "pid"))[0]) == []
    assert terminate_all(1.0) == 0


def test_wall_cpu_and_peak_rss_are_measured(tmp_path: Path) -> None:
    before = time.perf_counter()
    busy = shell(make_ctx(tmp_path), "for ((i = 0; i < 300000; i++)); do :; done")
    outside = time.perf_counter() - before
    assert busy.ok and busy.cpu_s > 0 and 0 < busy.wall_s <= outside  # the time measured is the task's
    fat = shell(make_ctx(tmp_path), f"'{sys.executable}' -c 'x = bytearray(100_000_000)'")
    assert fat.ok and 50 < fat.peak_rss_mb < 10_000


# --- python tasks ----------------------------------------------------------------------------------

HELPERS = '''
import math
import os
import sys

VALUE = 42


def add(a, b):
    return a + b


def with_ctx(x, ctx):
    return {"x": x, "task": ctx.task_id, "work_dir": ctx.work_dir, "attempt": ctx.attempt}


def kw_only(*, ctx, n=1):
    return [ctx.rank, n]


def where():
    env = {k: v for k, v in os.environ.items() if k.startswith("CMBAGENT_") or k == "HELPER_VAR"}
    return {"cwd": os.getcwd(), "env": env}


def nothing():
    return None


def a_set():
    return {1, 2}


def nested():
    return {"a": [1, {2, 3}]}


def not_finite():
    return [math.nan]


class Odd:
    def __repr__(self):
        return "Odd()"


def odd():
    return {"o": Odd()}


def boom(x=1):
    raise ValueError("bad value\\nsecond line")


def leave():
    sys.exit(3)


def burn(n):
    data = bytearray(30_000_000)
    return sum(i * i for i in range(n)) + len(data) * 0


def sleepy():
    import time
    try:
        time.sleep(1000)
    except Exception:
        return "swallowed"


def path_count():
    return sys.path.count(os.path.dirname(os.path.abspath(__file__)))
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("helpers")
    (directory / "runner_helpers.py").write_text(HELPERS)
    (directory / "broken_helpers.py").write_text("raise RuntimeError('no config file')\n")
    (directory / "slow_helpers.py").write_text("import time\ntime.sleep(1000)\n\ndef fn():\n    pass\n")
    yield str(directory)
    while str(directory) in sys.path:
        sys.path.remove(str(directory))
    for name in ("runner_helpers", "broken_helpers", "slow_helpers"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def process_pool() -> Iterator[Executor]:
    # spawn: every payload really crosses a process boundary, nothing is inherited by fork
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def thread_pool() -> Iterator[Executor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture(params=["thread", "process"])
def call(request: pytest.FixtureRequest, helpers: str, tmp_path: Path) -> Any:
    """call(target, args=..., ctx=..., env=...) -> (Outcome, ctx): run_python as the scheduler would."""
    in_process = request.param == "process"
    pool: Executor = request.getfixturevalue("process_pool" if in_process else "thread_pool")

    def run(target: str, args: Any = None, ctx: TaskContext | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> tuple[Outcome, TaskContext]:
        ctx = ctx or make_ctx(tmp_path)
        payload = Payload(id=ctx.task_id, kind="python", call=target, args=args, env=env or {},
                          python_path=(helpers,), timeout=timeout)
        return pool.submit(run_python, payload, ctx, in_process).result(timeout=120), ctx

    run.mode = request.param  # type: ignore[attr-defined]
    return run


def returned(out: Outcome) -> Any:
    assert out.ok, (out.error, out.traceback)
    assert out.result_file is not None
    return json.loads(Path(out.result_file).read_text())


def test_keyword_and_positional_arguments(call: Any) -> None:
    out, ctx = call("runner_helpers:add", {"a": 2, "b": 3})
    assert returned(out) == 5 and out.result_file == os.path.join(ctx.work_dir, "return.json")
    out, _ = call("runner_helpers:add", ["x", "y"])
    assert returned(out) == "xy"
    assert [n for n in os.listdir(ctx.work_dir) if "return" in n] == ["return.json"]  # no temp file left


def test_ctx_is_passed_to_a_function_that_asks_for_it(call: Any, tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, task="fit", attempt=3)
    out, _ = call("runner_helpers:with_ctx", {"x": 1}, ctx=ctx)
    assert returned(out) == {"x": 1, "task": "fit", "work_dir": ctx.work_dir, "attempt": 3}
    out, _ = call("runner_helpers:kw_only", {"n": 4}, ctx=ctx)
    assert returned(out) == [0, 4]
    out, _ = call("runner_helpers:with_ctx", {"x": 1, "ctx": "mine"}, ctx=ctx)
    assert out.error == "args has a key 'ctx', which is reserved for the task context"


def test_none_writes_no_return_file(call: Any) -> None:
    out, ctx = call("runner_helpers:nothing")
    assert out.ok and out.result_file is None
    assert not Path(ctx.work_dir, "return.json").exists()


@pytest.mark.parametrize(("target", "value", "note"), [
    ("runner_helpers:a_set", [1, 2], None),
    ("runner_helpers:nested", {"a": [1, [2, 3]]}, None),
    ("runner_helpers:not_finite", [None], "return value: 1 non-finite float(s) written as null (at 0)"),
    ("runner_helpers:odd", {"o": "Odd()"}, "return value: a value of type 'Odd' written as its repr (at o)"),
])
def test_a_return_value_that_is_not_json_is_converted_and_the_log_says_how(call: Any, target: str, value: Any,
                                                                          note: str | None) -> None:
    out, ctx = call(target)
    assert returned(out) == value
    log = Path(ctx.logs_dir, "stderr.log")
    if note is None:
        assert not log.exists()
    else:
        assert log.read_text().splitlines()[-1] == f"cmbagent-batch: attempt 1: {note}"


def test_an_exception_comes_back_as_one_line_and_the_worker_traceback(call: Any) -> None:
    out, _ = call("runner_helpers:boom", {"x": 2})
    assert (out.ok, out.error) == (False, "ValueError: bad value")
    assert out.traceback is not None and out.traceback.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("bad value\\nsecond line")' in out.traceback and "runner_helpers.py" in out.traceback
    assert "_attempt" not in out.traceback  # the runner's own frame is left out
    out, _ = call("runner_helpers:leave")
    assert (out.ok, out.error) == (False, "SystemExit: 3")
    out, _ = call("runner_helpers:add", {"a": 1})
    assert out.error == "TypeError: add() missing 1 required positional argument: 'b'"


@pytest.mark.parametrize(("target", "args", "error"), [
    ("no_such_module_x:fn", None, "cannot import 'no_such_module_x:fn': No module named 'no_such_module_x'"),
    ("runner_helpers:nope", None,
     "cannot import 'runner_helpers:nope': module 'runner_helpers' has no attribute 'nope'"),
    ("runner_helpers:VALUE", None,
     "cannot import 'runner_helpers:VALUE': runner_helpers.VALUE is not callable (it is of type 'int')"),
    ("broken_helpers:fn", None, "cannot import 'broken_helpers:fn': RuntimeError: no config file"),
    ("no-colon", None, "bad call 'no-colon': expected 'module:function'"),
    ("runner_helpers:add", 5, "args must be a mapping, a list or null, not 'int'"),
])
def test_import_and_argument_errors_are_one_line(call: Any, target: str, args: Any, error: str) -> None:
    out, _ = call(target, args)
    assert (out.ok, out.error) == (False, error)


def test_sys_path_is_extended_once(call: Any) -> None:
    for _ in range(3):
        out, _ = call("runner_helpers:path_count")
        assert returned(out) == 1


def test_cwd_and_environment(call: Any, tmp_path: Path, process_pool: Executor, helpers: str) -> None:
    ctx = make_ctx(tmp_path, matrix={"ell": 2000})
    out, _ = call("runner_helpers:where", ctx=ctx, env={"HELPER_VAR": "set", "CMBAGENT_HOST": "mine"})
    seen = returned(out)
    if call.mode == "thread":  # a thread must not touch the process-wide cwd and environment
        assert seen == {"cwd": os.getcwd(), "env": {}}
        assert not any(k.startswith("CMBAGENT_") for k in os.environ)
        return
    assert seen == {"cwd": ctx.work_dir, "env": {
        "CMBAGENT_TASK_ID": "t1", "CMBAGENT_TASK_DIR": ctx.work_dir, "CMBAGENT_RUN_DIR": ctx.run_dir,
        "CMBAGENT_RANK": "0", "CMBAGENT_ATTEMPT": "1", "CMBAGENT_HOST": "mine", "CMBAGENT_MATRIX_ELL": "2000",
        "HELPER_VAR": "set"}}
    # the same worker afterwards: cwd is back (chdir=False: look without changing anything)
    payload = Payload(id="t1", kind="python", call="runner_helpers:where", python_path=(helpers,))
    after = returned(process_pool.submit(run_python, payload, ctx, False).result(timeout=120))
    assert after["cwd"] == os.getcwd()
    # the next task in that worker sees its own variables and none of the previous task's
    other = make_ctx(tmp_path, task="t2")
    payload = Payload(id="t2", kind="python", call="runner_helpers:where", python_path=(helpers,))
    after = returned(process_pool.submit(run_python, payload, other, True).result(timeout=120))
    assert after["env"] == {"CMBAGENT_TASK_ID": "t2", "CMBAGENT_TASK_DIR": other.work_dir,
                            "CMBAGENT_RUN_DIR": other.run_dir, "CMBAGENT_RANK": "0", "CMBAGENT_ATTEMPT": "1",
                            "CMBAGENT_HOST": "node-a"}


def test_cpu_and_memory(call: Any) -> None:
    before = time.perf_counter()
    out, _ = call("runner_helpers:burn", [300_000])
    outside = time.perf_counter() - before
    assert out.ok and out.cpu_s > 0 and 0 < out.wall_s <= outside  # the time measured is the call's
    if call.mode == "thread":
        assert out.peak_rss_mb == 0.0  # it would be the scheduler's
    else:
        assert out.peak_rss_mb > 25


def test_frozen_arguments_are_thawed(tmp_path: Path, helpers: str) -> None:
    from types import MappingProxyType

    ctx = make_ctx(tmp_path)
    payload = Payload(id="t1", kind="python", call="runner_helpers:add", args=MappingProxyType({"a": (1,), "b": (2,)}),
                      python_path=(helpers,))
    assert returned(run_python(payload, ctx, False)) == [1, 2]


@pytest.mark.slow
def test_process_mode_interrupts_a_call_that_runs_too_long(process_pool: Executor, helpers: str,
                                                           tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)

    def payload(target: str) -> Payload:
        return Payload(id="t1", kind="python", call=target, python_path=(helpers,), timeout=1)

    # the 1 s timeout interrupted a sleep of 1000 s (the result's timeout only guards against a hang)
    out = process_pool.submit(run_python, payload("runner_helpers:sleepy"), ctx, True).result(timeout=120)
    assert (out.ok, out.timed_out, out.error) == (False, True, "timed out after 1 s (python call interrupted)")
    assert out.traceback is not None and "time.sleep(1000)" in out.traceback  # where it was stopped
    out = process_pool.submit(run_python, payload("runner_helpers:nothing"), ctx, True).result(timeout=120)
    assert out.ok and not out.timed_out  # the worker goes on, its alarm cleared
    out = process_pool.submit(run_python, payload("slow_helpers:fn"), ctx, True).result(timeout=120)
    assert (out.timed_out, out.error) == (True, "timed out after 1 s (python call interrupted)")  # import counts
