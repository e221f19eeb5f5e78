"""The up-to-date check of a rerun and ``run --dry-run``, and the success records it reads: compact
records (the full fingerprint, its parts shortened, the code files once per set, in the journals'
index), and journals written by earlier versions read as they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cmbagent_batch.plan.analysis.deps import analyse
from cmbagent_batch.plan.build import build_dag
from cmbagent_batch.plan.fingerprint import Fingerprints, fingerprints
from cmbagent_batch.rundir.history import History
from cmbagent_batch.spec.loader import load_spec
from tests.helpers.cli import cli, write_spec
from tests.helpers.runs import published, read_run, work_dir

NOOP = "def run(**kw):\n    return None\n"


def python_job(tmp_path: Path, n: int = 3) -> Path:
    (tmp_path / "noop.py").write_text(NOOP)
    write_spec(tmp_path, f"""\
        version: 1
        job: {{name: sweep}}
        execution: {{max_workers: 2}}
        tasks:
          - id: t-{{i}}
            kind: python
            call: noop:run
            matrix: {{i: {list(range(n))}}}
    """)
    return tmp_path / "runs" / "sweep"


def journal(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines()]


def job_fingerprints(tmp_path: Path) -> Fingerprints:
    spec = load_spec(str(tmp_path / "job.yaml"))
    return fingerprints(spec.tasks, build_dag(spec, analyse(spec, None, refresh=False, warn=print)), {}, str(tmp_path))


def dry_run(tmp_path: Path) -> list[str]:
    res = cli(tmp_path, "run", "job.yaml", "--dry-run", check=True)
    return sorted(res.stdout.splitlines())


def test_a_success_record_keeps_the_fingerprint_and_its_parts_short_and_the_code_files_once(tmp_path: Path) -> None:
    run_dir = python_job(tmp_path)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    records = journal(run_dir)
    running = [r for r in records if r.get("state") == "running"]
    succeeded = [r for r in records if r.get("state") == "succeeded"]
    assert {frozenset(r) for r in running} == {frozenset({"t", "run", "task", "state", "attempt"})}
    # cpu_s is left out at 0, which a no-op's CPU time, counted in clock ticks, most often is
    assert {frozenset(r) - {"cpu_s"} for r in succeeded} == {frozenset({"t", "run", "task", "state", "attempt", "fp",
                                                                       "parts", "wall_s", "peak_rss_mb"})}
    fps = job_fingerprints(tmp_path)
    for r in succeeded:
        fp = fps[r["task"]]
        assert r["fp"] == fp.value
        assert r["parts"] == f"{fp.spec[:12]}.{fp.deps[:12]}..{fp.code[:12]}"  # no input files; FILES is CODE's
    assert History.from_index(str(run_dir / "journal")).code_sets == {fps["t-0"].own: {"noop.py": fps["t-0"].hashes["noop.py"]}}
    rows = read_run(run_dir)["tasks"]
    assert {(row["rank"], row["work_bytes"], row["output_bytes"]) for row in rows.values()} == {(0, 0, 0)}
    timed = {r["task"] for r in succeeded if "cpu_s" in r}
    assert all(row["cpu_s"] == 0 for tid, row in rows.items() if tid not in timed)
    assert rows["t-1"]["host"] == read_run(run_dir)["host"]
    assert rows["t-1"]["work_dir"] == str(work_dir(run_dir, "t-1"))


def old_records(tmp_path: Path, with_code: bool) -> list[dict[str, Any]]:
    """The records an earlier version journaled for a run of ``python_job``: every part in full (and,
    ``with_code``, the code part and each file's hash; before that, no code at all)."""
    fps = job_fingerprints(tmp_path)
    out: list[dict[str, Any]] = []
    for tid in fps:
        fp = fps[tid]
        head = {"t": os.path.getmtime(tmp_path / "noop.py") + 5, "run": "0123456789ab", "task": tid}
        parts: dict[str, Any] = {"fp": fp.value, "spec_fp": fp.spec, "deps_fp": fp.deps, "inputs_fp": fp.inputs}
        if with_code:
            parts.update(code_fp=fp.code, code_files=dict(fp.hashes))
        else:  # the fingerprint of then: no code in it
            parts["fp"] = fp.base
        out += [{**head, "state": "running", "attempt": 1, "rank": 0, "host": "vm",
                 "work_dir": str(tmp_path / "runs" / "sweep" / "ranks" / "rank-0000" / "tasks" / tid)},
                {**head, "state": "succeeded", "attempt": 1, **parts, "wall_s": 0.001, "cpu_s": 0.0,
                 "peak_rss_mb": 26.4, "work_bytes": 0, "output_bytes": 0}]
    return out


def write_old_journal(tmp_path: Path, with_code: bool) -> None:
    run_dir = tmp_path / "runs" / "sweep"
    (run_dir / "journal").mkdir(parents=True)
    (run_dir / "journal" / "rank-0000.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in old_records(tmp_path, with_code)))


def test_a_journal_of_full_parts_and_code_files_is_read_as_it_is(tmp_path: Path) -> None:
    python_job(tmp_path)
    write_old_journal(tmp_path, with_code=True)
    assert dry_run(tmp_path) == ["t-0: skip (up to date)", "t-1: skip (up to date)", "t-2: skip (up to date)"]
    (tmp_path / "noop.py").write_text(NOOP + "# edited\n")
    assert dry_run(tmp_path) == ["t-0: run (code changed: noop.py)", "t-1: run (code changed: noop.py)",
                                 "t-2: run (code changed: noop.py)"]
    cli(tmp_path, "run", "job.yaml", "--quiet", "--only", "t-1", check=True)  # its record: the compact one
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace("{i: [0, 1, 2]}",
                                                                                  "{i: [0, 1, 2], j: [x]}"))
    assert dry_run(tmp_path) == ["t-0: run (its spec changed)", "t-1: run (its spec changed)",
                                 "t-2: run (its spec changed)"]


def test_a_journal_from_before_code_fingerprints_reruns_only_code_edited_since(tmp_path: Path) -> None:
    python_job(tmp_path)
    write_old_journal(tmp_path, with_code=False)
    assert dry_run(tmp_path) == ["t-0: skip (up to date)", "t-1: skip (up to date)", "t-2: skip (up to date)"]
    (tmp_path / "noop.py").write_text(NOOP + "# edited\n")
    later = os.path.getmtime(tmp_path / "noop.py") + 60
    os.utime(tmp_path / "noop.py", (later, later))
    assert dry_run(tmp_path) == ["t-0: run (code changed: noop.py)", "t-1: run (code changed: noop.py)",
                                 "t-2: run (code changed: noop.py)"]


def test_rerun_on_without_code_keeps_tasks_whose_code_alone_changed(tmp_path: Path) -> None:
    python_job(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(spec.read_text().replace("{max_workers: 2}", "{max_workers: 2, rerun_on: [spec, inputs]}"))
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    (tmp_path / "noop.py").write_text(NOOP + "# edited\n")
    assert dry_run(tmp_path) == ["t-0: skip (up to date)", "t-1: skip (up to date)", "t-2: skip (up to date)"]
    spec.write_text(spec.read_text().replace("[spec, inputs]", "[spec, inputs, code]"))
    assert dry_run(tmp_path) == ["t-0: run (code changed: noop.py)", "t-1: run (code changed: noop.py)",
                                 "t-2: run (code changed: noop.py)"]


def test_a_fingerprint_that_differs_in_no_part_it_keeps_still_reruns(tmp_path: Path) -> None:
    run_dir = python_job(tmp_path)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    path = run_dir / "journal" / "rank-0000.jsonl"
    path.write_text("".join(json.dumps({**r, "fp": "0" * 64} if r["task"] == "t-2" and "fp" in r else r) + "\n"
                            for r in journal(run_dir)))
    (run_dir / "journal" / "index").unlink()  # its places of records no longer hold
    assert dry_run(tmp_path) == ["t-0: skip (up to date)", "t-1: skip (up to date)",
                                 "t-2: run (its fingerprint changed)"]


def test_code_whose_files_no_index_keeps_is_said_so(tmp_path: Path) -> None:
    run_dir = python_job(tmp_path)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    (run_dir / "journal" / "index").unlink()
    (tmp_path / "noop.py").write_text(NOOP + "# edited\n")
    assert dry_run(tmp_path) == [f"t-{i}: run (code changed (its files' hashes are not in journal/index))"
                                 for i in range(3)]


def test_the_published_outputs_of_each_task_are_looked_for(tmp_path: Path) -> None:
    write_spec(tmp_path, """\
        version: 1
        job: {name: shells}
        tasks:
          - id: s-{i}
            kind: shell
            run: echo {i} > out.txt
            outputs: [out.txt]
            matrix: {i: [0, 1, 2, 3]}
          - {id: quiet, kind: shell, run: "true"}
    """)
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    run_dir = tmp_path / "runs" / "shells"
    shutil.rmtree(published(run_dir, "s-2"))
    assert dry_run(tmp_path) == ["quiet: skip (up to date)", "s-0: skip (up to date)", "s-1: skip (up to date)",
                                 "s-2: run (its published outputs are missing)", "s-3: skip (up to date)"]
    shutil.rmtree(run_dir / "outputs")
    assert dry_run(tmp_path) == ["quiet: skip (up to date)"] + [
        f"s-{i}: run (its published outputs are missing)" for i in range(4)]
    cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert (published(run_dir, "s-3") / "out.txt").read_text() == "3\n"
    assert dry_run(tmp_path) == ["quiet: skip (up to date)"] + [f"s-{i}: skip (up to date)" for i in range(4)]
