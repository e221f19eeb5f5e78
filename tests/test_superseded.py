"""``RUN_DIR/superseded/`` stays bounded: each run keeps the newest ``job.keep_superseded`` output sets of
each task (``CMBAGENT_KEEP_SUPERSEDED``), ``run --prune-superseded`` removes them all, oldest first, saying
what and how many bytes; the current outputs are never touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmbagent_batch.rundir.prune import prune_superseded, superseded_to_prune
from tests.helpers.cli import clean_env, cli, write_spec
from tests.helpers.runs import published, superseded_sets

JOB = """\
version: 1
job:
  name: sup
{keep}tasks:
  - id: make
    kind: shell
    run: head -c $SIZE /dev/zero > out.bin
    outputs: [out.bin]
    env: {{SIZE: "{size}"}}
  - id: other
    kind: shell
    run: echo other > other.txt
    outputs: [other.txt]
    env: {{SIZE: "{size}"}}
"""
NAME = re.compile(r"(make|other)-\d{8}T\d{12}Z-[0-9a-f]{8}")


def run_with(tmp_path: Path, size: int, *flags: str, keep: str = "", env: dict[str, str] | None = None) -> str:
    """Run the job with outputs of ``size`` bytes; its stderr."""
    write_spec(tmp_path, JOB.format(size=size, keep=f"  keep_superseded: {keep}\n" if keep else ""))
    result = cli(tmp_path, "run", "job.yaml", "--quiet", *flags, env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def superseded(tmp_path: Path) -> list[str]:
    return [p.name for p in superseded_sets(tmp_path / "runs" / "sup", ("make", "other"))]


def test_the_newest_three_of_each_task_are_kept_by_default(tmp_path: Path) -> None:
    for size in range(1000, 1005):  # five runs: four earlier output sets of each task
        assert run_with(tmp_path, size) == ""
    before = superseded(tmp_path)
    assert len(before) == 8 and all(NAME.fullmatch(n) for n in before)
    err = run_with(tmp_path, 1005)  # before it starts: the oldest of each task goes
    oldest = sorted((n for n in before), key=lambda n: n.split("-", 1)[1])[:2]
    assert sorted(oldest) == sorted([min(n for n in before if n.startswith("make")),
                                     min(n for n in before if n.startswith("other"))])
    assert err == (f"cmbagent-batch: removed 2 earlier output sets (1,006 bytes) from {tmp_path}/runs/sup/superseded, "
                   f"oldest first (the newest 3 of each task kept: job.keep_superseded): {', '.join(oldest)}\n")
    after = superseded(tmp_path)
    assert set(before) - set(after) == set(oldest)
    assert len(after) == 8  # three kept of each, plus the one this run set aside
    assert (published(tmp_path / "runs" / "sup", "make") / "out.bin").stat().st_size == 1005


def test_the_setting_and_its_variable_say_how_many(tmp_path: Path) -> None:
    for size in range(1000, 1004):
        run_with(tmp_path, size)
    err = run_with(tmp_path, 1004, env=clean_env(tmp_path, CMBAGENT_KEEP_SUPERSEDED="1"))
    assert "(the newest 1 of each task kept: job.keep_superseded)" in err
    assert len(superseded(tmp_path)) == 4  # one kept of each, and the one of this run
    config = cli(tmp_path, "config", "job.yaml", env=clean_env(tmp_path, CMBAGENT_KEEP_SUPERSEDED="1"))
    assert "job.keep_superseded               1                         env CMBAGENT_KEEP_SUPERSEDED\n" in config.stdout
    err = run_with(tmp_path, 1005, keep="0")
    assert err.startswith("cmbagent-batch: removed 4 earlier output sets (2,017 bytes) from ")
    assert "(the newest 0 of each task kept: job.keep_superseded)" in err
    assert len(superseded(tmp_path)) == 2


def test_prune_superseded_removes_them_all_first(tmp_path: Path) -> None:
    for size in range(1000, 1003):
        run_with(tmp_path, size)
    before = superseded(tmp_path)
    err = run_with(tmp_path, 1003, "--prune-superseded")
    names = sorted(before, key=lambda n: n.split("-", 1)[1])
    assert err == (f"cmbagent-batch: removed 4 earlier output sets (2,013 bytes) from {tmp_path}/runs/sup/superseded, "
                   f"oldest first (--prune-superseded): {', '.join(names)}\n")
    assert len(superseded(tmp_path)) == 2  # what this run set aside
    assert (published(tmp_path / "runs" / "sup", "other") / "other.txt").read_text() == "other\n"


def test_nothing_is_removed_by_a_dry_run_or_when_there_is_nothing(tmp_path: Path) -> None:
    assert run_with(tmp_path, 10, "--prune-superseded") == ""  # no superseded/ yet
    run_with(tmp_path, 11)
    result = cli(tmp_path, "run", "job.yaml", "--prune-superseded", "--dry-run")
    assert (result.returncode, result.stderr) == (0, "")
    assert len(superseded(tmp_path)) == 2


def test_a_bad_setting_is_refused(tmp_path: Path) -> None:
    write_spec(tmp_path, JOB.format(size=1, keep="  keep_superseded: -1\n"))
    result = cli(tmp_path, "run", "job.yaml")
    assert (result.returncode, result.stderr) == (2, "job.yaml:4:20: $.job.keep_superseded: must be at least 0, got "
                                                     "the number -1\n")
    write_spec(tmp_path, JOB.format(size=1, keep=""))
    result = cli(tmp_path, "run", "job.yaml", env=clean_env(tmp_path, CMBAGENT_KEEP_SUPERSEDED="all"))
    assert (result.returncode, result.stderr) == (2, "cmbagent-batch: error: environment variable "
                                                     "CMBAGENT_KEEP_SUPERSEDED='all': expected a whole number\n")


# -- what is chosen, and the removal itself ------------------------------------------------------------------


def name(task: str, second: int, token: str = "0a1b2c3d") -> str:
    return f"{task}-20260102T0304{second:02d}000000Z-{token}"


def test_the_oldest_beyond_the_newest_n_of_each_task_are_chosen_oldest_first() -> None:
    names = [name("a", 5), name("sim-1", 1), name("a", 1), name("sim-1", 3), name("a", 3), name("a-2026", 0),
             "notes.txt", "a-20260102T030400Z-zz"]
    assert superseded_to_prune(names, 1) == [name("a", 1), name("sim-1", 1), name("a", 3)]
    assert superseded_to_prune(names, 0) == [name("a-2026", 0), name("a", 1), name("sim-1", 1), name("a", 3),
                                             name("sim-1", 3), name("a", 5)]
    assert superseded_to_prune(names, 3) == []


def test_read_only_directories_in_an_output_set_are_removed_too(tmp_path: Path) -> None:
    old = tmp_path / "superseded" / name("t", 1)
    (old / "sub" / "deep").mkdir(parents=True)
    (old / "sub" / "deep" / "x.bin").write_bytes(b"x" * 300)
    (old / "y.txt").write_bytes(b"y" * 12)
    (old / "link").symlink_to(old / "y.txt")
    (old / "sub" / "deep").chmod(0o500)
    (old / "sub").chmod(0o500)
    kept = tmp_path / "superseded" / name("t", 2)
    kept.mkdir()
    pruned = prune_superseded(str(tmp_path), 1)
    assert (pruned.removed, pruned.size, pruned.failed) == ((name("t", 1),), 312, ())
    assert [p.name for p in (tmp_path / "superseded").iterdir()] == [kept.name]


@pytest.mark.parametrize("keep", [0, 2])
def test_no_superseded_directory_is_nothing_to_do(tmp_path: Path, keep: int) -> None:
    pruned = prune_superseded(str(tmp_path), keep)
    assert (pruned.removed, pruned.size, pruned.lines("x")) == ((), 0, [])



def test_a_whole_number_written_as_a_float_is_that_number(tmp_path: Path) -> None:
    for size in range(1000, 1004):  # four runs: three earlier output sets of each task
        run_with(tmp_path, size)
    before = superseded(tmp_path)
    err = run_with(tmp_path, 1004, keep="2.0")
    oldest = sorted(min(n for n in before if n.startswith(task)) for task in ("make", "other"))
    oldest.sort(key=lambda n: n.split("-", 1)[1])
    assert err == (f"cmbagent-batch: removed 2 earlier output sets (1,006 bytes) from {tmp_path}/runs/sup/superseded, "
                   f"oldest first (the newest 2 of each task kept: job.keep_superseded): {', '.join(oldest)}\n")
    config = cli(tmp_path, "config", "job.yaml")
    assert "job.keep_superseded               2                         spec line 4\n" in config.stdout


def test_a_superseded_path_that_is_not_a_directory_is_said_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "runs" / "sup").mkdir(parents=True)
    (tmp_path / "runs" / "sup" / "superseded").write_text("not a directory\n")
    err = run_with(tmp_path, 10)
    assert err == (f"cmbagent-batch: warning: cannot read {tmp_path}/runs/sup/superseded (Not a directory); no earlier "
                   "output set was removed\n")
    assert (published(tmp_path / "runs" / "sup", "make") / "out.bin").stat().st_size == 10
