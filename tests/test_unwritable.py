"""Places that cannot be written: a run directory, a cache directory or an ``-o`` file on a read-only file
system, below a regular file, under /proc, or in a directory that does not exist. Each is exit 2 and one
line on stderr naming the place and the reason, before anything starts: no traceback, no crash log."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import cli, write_spec
from tests.helpers.ledger_entries import entry, write_chain
from tests.helpers.runs import published

SPEC = """
    version: 1
    job: {name: demo}
    tasks:
      - {id: a, kind: shell, run: "echo a > a.txt", outputs: [a.txt]}
"""
PRICES = str(Path(__file__).resolve().parent.parent / "cmbagent_batch" / "spec" / "prices" / "table.json")


def refused(result: subprocess.CompletedProcess[str], home: Path) -> str:
    """The one line a refused command printed, once it is known to be a usage error and nothing more."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert not (home / ".cache" / "cmbagent-batch").exists()  # no crash log
    return lines[0]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    write_spec(tmp_path, SPEC)
    (tmp_path / "afile").write_text("a regular file\n")
    return tmp_path


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs holding an empty directory ``runs/old`` (a real mount: root ignores permission bits)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        (mount / "runs" / "old").mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def test_a_run_directory_on_a_read_only_file_system(job: Path, read_only: Path) -> None:
    home = job / "home"
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "ro/runs/new"), home)
    assert line == f"cmbagent-batch: error: cannot write the run directory {read_only}/runs/new: Read-only file system"
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "ro/runs/old"), home)
    assert line == f"cmbagent-batch: error: cannot write the run directory {read_only}/runs/old: Read-only file system"


def test_fresh_cannot_move_a_read_only_run_directory_aside(job: Path, read_only: Path) -> None:
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "ro/runs/old", "--fresh"), job / "home")
    assert line == (f"cmbagent-batch: error: cannot move the run directory {read_only}/runs/old aside (--fresh): "
                    "Read-only file system")


def test_a_cache_and_an_output_on_a_read_only_file_system(job: Path, read_only: Path) -> None:
    home = job / "home"
    line = refused(cli(job, "plan", "job.yaml", "--cache-dir", "ro/cache"), home)
    assert line == "cmbagent-batch: error: cannot write the cache directory ro/cache: Read-only file system"
    write_chain(job / "ledger.jsonl", [entry(1)])
    line = refused(cli(job, "ledger", "reprice", "ledger.jsonl", "--prices", PRICES, "-o", "ro/new.jsonl"), home)
    assert line == "cmbagent-batch: error: cannot write -o ro/new.jsonl: Read-only file system"


def test_a_run_directory_below_a_file(job: Path) -> None:
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "afile/runs/x"), job / "home")
    assert line == (f"cmbagent-batch: error: cannot write the run directory {job}/afile/runs/x: "
                    f"{job}/afile is not a directory")
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "afile"), job / "home")
    assert line == f"cmbagent-batch: error: cannot write the run directory {job}/afile: it is not a directory"


def test_a_run_directory_under_proc(job: Path) -> None:
    line = refused(cli(job, "run", "job.yaml", "--run-dir", "/proc/cmbagent-batch/run"), job / "home")
    prefix = "cmbagent-batch: error: cannot write the run directory /proc/cmbagent-batch/run: "
    assert line.startswith(prefix) and len(line) > len(prefix)


def test_submit_checks_its_run_directory_before_anything(job: Path) -> None:
    line = refused(cli(job, "submit", "job.yaml", "--run-dir", "afile/run"), job / "home")
    assert line == f"cmbagent-batch: error: cannot write the run directory {job}/afile/run: {job}/afile is not a directory"


def test_a_cache_directory_below_a_file(job: Path) -> None:
    home = job / "home"
    expected = f"cmbagent-batch: error: cannot write the cache directory afile/cache: {job}/afile is not a directory"
    result = cli(job, "plan", "job.yaml", "--cache-dir", "afile/cache")
    assert refused(result, home) == expected and result.stdout == ""
    assert refused(cli(job, "run", "job.yaml", "--cache-dir", "afile/cache"), home) == expected
    assert not (job / "runs").exists()  # no task ran, no run directory was made


def test_ledger_outputs_into_a_missing_directory_or_below_a_file(job: Path) -> None:
    home = job / "home"
    write_chain(job / "ledger.jsonl", [entry(1), entry(2)])
    assert not os.path.exists("/nonexistent")
    line = refused(cli(job, "ledger", "report", "ledger.jsonl", "-o", "/nonexistent/dir/r.html"), home)
    assert line == ("cmbagent-batch: error: cannot write -o /nonexistent/dir/r.html: "
                    "the directory /nonexistent/dir does not exist")
    assert not os.path.exists("/nonexistent")  # not made
    line = refused(cli(job, "ledger", "export", "ledger.jsonl", "-o", "afile/out.csv"), home)
    assert line == f"cmbagent-batch: error: cannot write -o afile/out.csv: {job}/afile is not a directory"
    line = refused(cli(job, "ledger", "reprice", "ledger.jsonl", "--prices", PRICES, "-o", "afile/x/new.jsonl"), home)
    assert line == f"cmbagent-batch: error: cannot write -o afile/x/new.jsonl: {job}/afile is not a directory"
    line = refused(cli(job, "ledger", "report", "ledger.jsonl", "-o", "home"), home)
    assert line == "cmbagent-batch: error: cannot write -o home: it is a directory"


def test_a_writable_run_leaves_no_probe_behind(job: Path) -> None:
    cli(job, "run", "job.yaml", "--quiet", check=True)
    left = [p for p in job.rglob(".probe-*")]
    assert left == []
    assert (published(job / "runs" / "demo", "a") / "a.txt").read_text() == "a\n"
