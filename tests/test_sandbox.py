"""The code-execution sandbox against the real kernel: confined Python and shell processes in tmp_path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cmbagent_batch.errors import BatchError, SandboxError
from cmbagent_batch.tasks.agent import sandbox
from cmbagent_batch.tasks.agent.sandbox import (
    confine_writes,
    landlock_abi,
    landlock_status,
)

ABI, STATUS = landlock_status()
needs_landlock = pytest.mark.skipif(ABI == 0, reason=f"Linux Landlock is unavailable: {STATUS}")
needs_tcp_rules = pytest.mark.skipif(ABI < 4, reason=f"denying TCP needs Landlock ABI 4; {STATUS}")
SANDBOX = [sys.executable, "-m", "cmbagent_batch.tasks.agent.sandbox"]


class Task:
    """A task's ``codebase/`` in tmp_path, with a file beside it and a private HOME."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.codebase = tmp_path / "codebase"
        self.codebase.mkdir()
        (self.codebase / "inside.txt").write_text("in")
        self.outside = tmp_path / "outside.txt"
        self.outside.write_text("out")
        self.home = tmp_path / "home"
        self.home.mkdir()

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C", "HOME": str(self.home),
                "PYTHONDONTWRITEBYTECODE": "1"}

    def run(self, *command: str, writable: tuple[str, ...] = (), options: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
        paths = [str(self.codebase), *writable]
        argv = [*SANDBOX, *(a for p in paths for a in ("--writable", p)), *options, "--", *command]
        return subprocess.run(argv, cwd=self.codebase, env=self.env(), check=False, capture_output=True, text=True,
                              timeout=60)

    def python(self, statement: str, **kwargs: tuple[str, ...]) -> str:
        """Run ``statement`` confined; ``"ok"`` or the name of the ``OSError`` it raised and its errno."""
        script = textwrap.dedent("""\
            import errno, os, subprocess, sys
            try:
                exec(sys.argv[1])
            except OSError as exc:
                print(type(exc).__name__, errno.errorcode[exc.errno])
            else:
                print("ok")
            """)
        done = self.run(sys.executable, "-c", script, statement, **kwargs)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@pytest.fixture
def task(tmp_path: Path) -> Task:
    return Task(tmp_path)


# --- what confined code may do -------------------------------------------------------------------------

ALLOWED = {
    "write a file in codebase": "open('new.txt', 'w').write('x')",
    "write in new subdirectories": "os.makedirs('a/b'); open('a/b/c.txt', 'w').write('x')",
    "rename within codebase": "os.mkdir('sub'); os.rename('inside.txt', 'sub/moved.txt')",
    "delete within codebase": "os.remove('inside.txt'); os.mkdir('d'); os.rmdir('d')",
    "truncate within codebase": "os.truncate('inside.txt', 0)",
    "symlink within codebase": "os.symlink('inside.txt', 'link')",
    "read a file outside": "assert open('../outside.txt').read() == 'out'",
    "list a directory outside": "assert 'outside.txt' in os.listdir('..')",
    "read system files": "open('/etc/passwd').read(); os.listdir('/usr')",
    "write to /dev/null": "open('/dev/null', 'w').write('x')",
    "run programs": "subprocess.run(['true'], check=True)",
}


@pytest.mark.slow
@needs_landlock
@pytest.mark.parametrize("statement", ALLOWED.values(), ids=ALLOWED.keys())
def test_confined_code_may_read_anything_and_write_beneath_codebase(task: Task, statement: str) -> None:
    assert task.python(statement) == "ok"


@needs_landlock
def test_what_confined_code_writes_in_codebase_is_there_afterwards(task: Task) -> None:
    assert task.python("os.makedirs('a/b'); open('a/b/c.txt', 'w').write('x'); os.rename('inside.txt', 'a/in')") == "ok"
    assert (task.codebase / "a" / "b" / "c.txt").read_text() == "x"
    assert (task.codebase / "a" / "in").read_text() == "in"


# --- what it may not ---------------------------------------------------------------------------------

DENIED = {
    "write a file beside codebase": "open('../new.txt', 'w')",
    "append to a file outside": "open('../outside.txt', 'a').write('x')",
    "truncate a file outside": "os.truncate('../outside.txt', 0)",
    "delete a file outside": "os.remove('../outside.txt')",
    "make a directory outside": "os.mkdir('../made')",
    "write in HOME": "open(os.path.join(os.environ['HOME'], 'new.txt'), 'w')",
    "create a symlink outside": "os.symlink('codebase/inside.txt', '../link')",
    "move a file out of codebase": "os.rename('inside.txt', '../moved.txt')",
    "move a file outside into codebase": "os.rename('../outside.txt', 'moved.txt')",
    "make a fifo outside": "os.mkfifo('../fifo')",
}


@pytest.mark.slow
@needs_landlock
@pytest.mark.parametrize("statement", DENIED.values(), ids=DENIED.keys())
def test_confined_code_may_not_change_anything_outside_codebase(task: Task, statement: str) -> None:
    before = sorted(os.listdir(task.root))
    assert task.python(statement) == "PermissionError EACCES"
    assert sorted(os.listdir(task.root)) == before
    assert task.outside.read_text() == "out"
    assert os.listdir(task.home) == []


@needs_landlock
def test_confined_code_may_not_write_in_tmp(task: Task) -> None:
    target = f"/tmp/cmbagent-sandbox-{uuid.uuid4().hex}"
    try:
        assert task.python(f"open({target!r}, 'w')") == "PermissionError EACCES"
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


@needs_landlock
def test_hard_linking_an_outside_file_into_codebase_is_refused(task: Task) -> None:
    # Through the link it could be written as if it were inside; Landlock refuses with EXDEV, not EACCES.
    assert task.python("os.link('../outside.txt', 'linked')") == "OSError EXDEV"
    assert not (task.codebase / "linked").exists()


@needs_landlock
def test_a_shell_command_is_confined(task: Task) -> None:
    done = task.run("sh", "-c", "echo x > ../outside.txt")
    assert done.returncode != 0
    assert "Permission denied" in done.stderr
    assert task.outside.read_text() == "out"


@needs_landlock
def test_grandchildren_are_confined_too(task: Task) -> None:
    statement = "subprocess.run(['sh', '-c', 'echo x > ../outside.txt; echo y > mine.txt'])"
    assert task.python(statement) == "ok"
    assert task.outside.read_text() == "out"
    assert (task.codebase / "mine.txt").read_text() == "y\n"


@needs_landlock
def test_more_writable_paths_may_be_directories_or_files(task: Task) -> None:
    scratch = task.root / "temp"
    scratch.mkdir()
    statement = "open('../temp/a', 'w').write('a'); open('../outside.txt', 'a').write('+')"
    assert task.python(statement, writable=(str(scratch), str(task.outside))) == "ok"
    assert (scratch / "a").read_text() == "a"
    assert task.outside.read_text() == "out+"
    # A writable file is not a writable directory: its neighbours stay protected.
    assert task.python("os.remove('../outside.txt')", writable=(str(task.outside),)) == "PermissionError EACCES"


@needs_landlock
def test_confine_writes_confines_the_calling_process(task: Task) -> None:
    script = textwrap.dedent(f"""\
        from cmbagent_batch.tasks.agent.sandbox import confine_writes
        confine_writes({str(task.codebase)!r})
        open('new.txt', 'w').write('x')
        try:
            open('../new.txt', 'w')
        except PermissionError:
            print('denied')
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=task.codebase, env=task.env(), check=False,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "denied\n", "")
    assert (task.codebase / "new.txt").read_text() == "x"


BIND_TCP = "import socket; socket.socket().bind(('127.0.0.1', 0))"


@needs_landlock
def test_the_network_is_free_by_default(task: Task) -> None:
    assert task.python(BIND_TCP) == "ok"


@needs_tcp_rules
def test_tcp_may_be_denied(task: Task) -> None:
    assert task.python(BIND_TCP, options=("--deny-tcp",)) == "PermissionError EACCES"


@needs_landlock
def test_the_command_runs_with_default_signal_dispositions(task: Task) -> None:
    # Had SIGPIPE stayed ignored, yes would report a broken pipe instead of dying quietly.
    done = task.run("sh", "-c", "yes | head -n 1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "y\n", "")


# --- failures ----------------------------------------------------------------------------------------


@needs_landlock
def test_a_command_that_is_not_found_exits_127(task: Task) -> None:
    done = task.run("no-such-command-here", "x")
    assert (done.returncode, done.stdout) == (127, "")
    assert done.stderr == "cmbagent-batch sandbox: no-such-command-here: command not found\n"


@needs_landlock
def test_a_command_that_cannot_be_executed_exits_126(task: Task) -> None:
    script = task.codebase / "script.sh"
    script.write_text("#!/bin/sh\n")
    done = task.run(str(script))
    assert (done.returncode, done.stderr) == (126, f"cmbagent-batch sandbox: {script}: Permission denied\n")


def test_a_missing_writable_directory_exits_126(task: Task) -> None:
    missing = str(task.root / "missing")
    done = subprocess.run([*SANDBOX, "--writable", missing, "--", "true"], env=task.env(), check=False,
                          capture_output=True, text=True, timeout=60)
    expected = f"writable path {missing!r} does not exist" if ABI else sandbox.UNAVAILABLE.format(reason=STATUS)
    assert (done.returncode, done.stderr) == (126, f"cmbagent-batch sandbox: {expected}\n")


@pytest.mark.parametrize(("argv", "problem"), [
    (["--", "true"], "--writable is required"),
    (["--writable", "."], "missing -- before COMMAND"),
    (["--writable", ".", "--"], "no COMMAND after --"),
    (["--writable"], "--writable needs a path"),
    (["--writeable", ".", "--", "true"], "unknown argument '--writeable'"),
])
def test_a_wrong_command_line_exits_2_with_the_usage(
        argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sandbox.main(argv) == 2
    assert capsys.readouterr().err == f"cmbagent-batch sandbox: {problem}\n{sandbox.USAGE}\n"


def refuse(code: int) -> Callable[[], int]:
    """A stand-in for the kernel's ABI probe that fails with ``code``."""

    def abi_version() -> int:
        raise OSError(code, os.strerror(code))

    return abi_version


NO_LANDLOCK = (
    "code execution needs Linux Landlock (kernel 5.13 or newer with landlock enabled) to confine agent code "
    "to codebase/; this kernel reports: landlock system calls are not implemented (ENOSYS: Function not implemented)"
)


def test_without_landlock_confining_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox, "_abi_version", refuse(errno.ENOSYS))
    assert landlock_abi() == 0
    assert landlock_status() == (0, "landlock system calls are not implemented (ENOSYS: Function not implemented)")
    with pytest.raises(SandboxError) as raised:
        confine_writes(str(tmp_path))
    assert str(raised.value) == NO_LANDLOCK
    assert isinstance(raised.value, BatchError)


def test_landlock_disabled_at_boot_is_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_abi_version", refuse(errno.EOPNOTSUPP))
    assert landlock_status() == (0, "landlock is built in but disabled at boot (EOPNOTSUPP: Operation not supported)")


def test_without_landlock_the_command_line_exits_126(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sandbox, "_abi_version", refuse(errno.ENOSYS))
    assert sandbox.main(["--writable", str(tmp_path), "--", "true"]) == 126
    assert capsys.readouterr().err == f"cmbagent-batch sandbox: {NO_LANDLOCK}\n"


def test_denying_tcp_needs_abi_4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox, "_abi_version", lambda: 3)
    with pytest.raises(SandboxError, match=r"^denying TCP needs Landlock ABI 4 \(kernel 6.7 or newer\); "
                                           r"this kernel has ABI 3$"):
        confine_writes(str(tmp_path), deny_tcp=True)


def test_each_abi_handles_the_write_rights_it_knows() -> None:
    assert sandbox.handled_fs_rights(1) == 0b1_1111_1111_0010  # WRITE_FILE, REMOVE_*, MAKE_*
    assert sandbox.handled_fs_rights(2) == sandbox.handled_fs_rights(1) | 1 << 13  # REFER
    assert sandbox.handled_fs_rights(4) == sandbox.handled_fs_rights(3) == sandbox.handled_fs_rights(2) | 1 << 14
    assert sandbox.handled_fs_rights(7) == sandbox.handled_fs_rights(5) == sandbox.handled_fs_rights(4) | 1 << 15
    for abi in range(1, 8):  # reading and executing are never handled, so they stay free
        assert sandbox.handled_fs_rights(abi) & 0b1101 == 0
