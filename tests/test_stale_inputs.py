"""A work directory holds what this attempt declares: a rerun sees exactly its current inputs, and what an
earlier attempt or run left goes to ``RANK_DIR/superseded/TASK`` (one kept per task).

Real runs through the command line, locally and on MPI ranks."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from cmbagent_batch.attempt import TaskContext
from cmbagent_batch.tasks import workdir
from tests.helpers.cli import cli, q, write_spec
from tests.helpers.mpi_run import MPIEXEC, manifest, mpirun
from tests.helpers.runs import kept_work_dir, published, work_dir

# The consumers glob their work directory, as the summary of a cosmology pipeline does.
SUMMARY = """
import glob
import json
import os


def summarise(ctx):
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ctx.work_dir, "ana_*.json")))
    values = [json.load(open(os.path.join(ctx.work_dir, n)))["H0"] for n in names]
    with open(os.path.join(ctx.work_dir, "summary.json"), "w") as fh:
        json.dump({"files": names, "H0": values}, fh)
"""


def pipeline(tmp_path: Path, h0: list[int], backend: str = "local") -> None:
    (tmp_path / "summ.py").write_text(textwrap.dedent(SUMMARY))
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: cosmo}}
        execution: {{backend: {backend}}}
        tasks:
          - id: ana-{{h}}
            kind: shell
            matrix: {{h: {json.dumps(h0)}}}
            run: |
              echo '{{"H0": {{h}}}}' > ana_H{{h}}.json
            outputs: ["ana_H{{h}}.json"]
          - id: summary
            kind: shell
            inputs: ["ana_*.json"]
            run: ls ana_*.json > seen.txt
            outputs: [seen.txt]
          - id: summary-py
            kind: python
            inputs: ["ana_*.json"]
            call: summ:summarise
            outputs: [summary.json]
    """)


def seen(run_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """What the consumers found: the shell's listing, the python's files and their values."""
    listing = (published(run_dir, "summary") / "seen.txt").read_text().split()
    summary = json.loads((published(run_dir, "summary-py") / "summary.json").read_text())
    return listing, summary["files"], summary["H0"]


def names(h0: list[int]) -> list[str]:
    return [f"ana_H{h}.json" for h in h0]


@pytest.mark.slow
def test_a_rerun_after_a_matrix_change_sees_exactly_the_new_inputs(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "cosmo"
    pipeline(tmp_path, [64, 67, 70, 73])
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert seen(run_dir) == (names([64, 67, 70, 73]), names([64, 67, 70, 73]), [64, 67, 70, 73])

    pipeline(tmp_path, [64, 67, 70, 74])  # one value replaced
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert seen(run_dir) == (names([64, 67, 70, 74]), names([64, 67, 70, 74]), [64, 67, 70, 74])
    assert sorted(p.name for p in work_dir(run_dir, "summary").glob("ana_*")) == names([64, 67, 70, 74])
    # the earlier run's directory, its links included, is kept as it was
    old = kept_work_dir(run_dir, "summary")
    assert sorted(p.name for p in old.glob("ana_*")) == names([64, 67, 70, 73])
    assert (old / "seen.txt").read_text().split() == names([64, 67, 70, 73])


@pytest.mark.slow
def test_what_earlier_attempts_left_is_moved_aside_and_one_is_kept(tmp_path: Path) -> None:
    """A retry and a rerun with a retry: each attempt starts in an empty directory but for the task's
    log; the one before it is kept in ``superseded/``, those before that are removed. (Attempts count
    on across runs.)"""
    side = tmp_path / "side"
    side.mkdir()

    def spec(version: int) -> None:
        write_spec(tmp_path, f"""
            version: 1
            job: {{name: leftovers}}
            execution: {{retry_backoff: 0}}
            tasks:
              - id: t
                kind: shell
                retries: 1
                run: |
                  ls > "found-$CMBAGENT_ATTEMPT.txt"
                  echo {version} > "scratch-$CMBAGENT_ATTEMPT.txt"
                  mkdir -p ro && echo {version} > ro/f && chmod 555 ro
                  if [ ! -e {q(side)}/v{version} ]; then touch {q(side)}/v{version}; exit 1; fi
        """)

    run_dir = tmp_path / "runs" / "leftovers"
    work = work_dir(run_dir, "t")
    kept = kept_work_dir(run_dir, "t")
    spec(1)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    # attempt 2 found nothing of attempt 1 (only its own logs/ and the listing being written)
    assert (work / "found-2.txt").read_text().split() == ["found-2.txt", "logs"]
    assert sorted(os.listdir(kept)) == ["found-1.txt", "ro", "scratch-1.txt"]
    assert (kept / "scratch-1.txt").read_text() == "1\n"

    spec(2)  # a rerun, whose first attempt (3) fails too
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert sorted(os.listdir(work)) == ["found-4.txt", "logs", "ro", "scratch-4.txt"]
    assert (work / "found-4.txt").read_text().split() == ["found-4.txt", "logs"]
    assert sorted(os.listdir(kept)) == ["found-3.txt", "ro", "scratch-3.txt"]
    assert (kept / "ro" / "f").read_text() == "2\n"
    assert os.listdir(kept.parent) == ["t"]  # attempts 1 and 2 are gone
    # but not the log: every attempt appended to it
    for log in ("stdout.log", "stderr.log"):
        headers = [ln for ln in (work / "logs" / log).read_text().splitlines() if ln.startswith("# attempt")]
        assert headers == ["# attempt 1", "# attempt 2", "# attempt 3", "# attempt 4"]


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_on_mpi_ranks_a_rerun_sees_exactly_the_new_inputs(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
    run_dir = tmp_path / "runs" / "cosmo"
    pipeline(tmp_path, [64, 67, 70, 73], backend="mpi")
    result = mpirun(tmp_path, 3, "run", "job.yaml", "--quiet")
    assert result.returncode == 0, result.stderr
    assert seen(run_dir) == (names([64, 67, 70, 73]), names([64, 67, 70, 73]), [64, 67, 70, 73])
    # The rerun may place a consumer on another rank: give every rank a copy of its directory, as if it
    # had run there before, so that wherever it runs it finds an earlier run's links.
    for task in ("summary", "summary-py"):
        ran = Path(manifest(run_dir)["tasks"][task]["work_dir"])
        for rank in range(3):
            other = work_dir(run_dir, task, rank)
            if not other.exists():
                shutil.copytree(ran, other, symlinks=True)

    pipeline(tmp_path, [64, 67, 70, 74], backend="mpi")
    result = mpirun(tmp_path, 3, "run", "job.yaml", "--quiet")
    assert result.returncode == 0, result.stderr
    assert seen(run_dir) == (names([64, 67, 70, 74]), names([64, 67, 70, 74]), [64, 67, 70, 74])
    ran = manifest(run_dir)["tasks"]["summary"]
    assert ran["work_dir"] == str(work_dir(run_dir, "summary", ran["rank"]))
    assert sorted(p.name for p in kept_work_dir(run_dir, "summary", ran["rank"]).glob("ana_*")) == names(
        [64, 67, 70, 73])


def test_a_fresh_work_directory_costs_no_more_than_its_mkdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_args: object) -> str:
        raise AssertionError("a fresh work directory has nothing to set aside")

    monkeypatch.setattr(workdir, "set_aside_earlier", never)
    work = tmp_path / "run" / "ranks" / "rank-0000" / "tasks" / "t"
    work.parent.mkdir(parents=True)
    workdir.prepare(TaskContext("t", str(tmp_path / "run"), str(work), 0, 1, "h"), ("logs",))
    assert os.listdir(work) == ["logs"]
