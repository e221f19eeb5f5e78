"""Code in the fingerprint: an edit to the module behind ``call:`` (or a module beside the spec it imports,
or a script a shell task names in ``inputs``) reruns that task and its downstream, as real runs show."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import cli, q, write_spec
from tests.helpers.runs import published

pytestmark = pytest.mark.slow

CMBPIPE = """
from helpers import scale


def spectrum(h0, side):
    with open(side, "a") as fh:
        fh.write(f"camb-{h0}\\n")
    return {"h0": h0, "cl": scale(h0)}
"""
HELPERS = """
def scale(x):
    return 2 * x
"""
OTHER = """
def work(side):
    with open(side, "a") as fh:
        fh.write("other\\n")
"""
REPORT = """
def summary(side):
    with open(side, "a") as fh:
        fh.write("summary\\n")
"""


def write_job(tmp_path: Path, rerun_on: list[str] | None = None) -> Path:
    side = tmp_path / "side"
    execution = f"execution: {{rerun_on: {json.dumps(rerun_on)}}}" if rerun_on is not None else ""
    for name, text in {"cmbpipe.py": CMBPIPE, "helpers.py": HELPERS, "other.py": OTHER,
                       "report.py": REPORT}.items():
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: cosmo}}
        {execution}
        tasks:
          - id: "camb-{{H0}}"
            kind: python
            call: "cmbpipe:spectrum"
            args: {{h0: "{{H0}}", side: {q(side)}}}
            matrix: {{H0: [64, 67]}}
          - {{id: other, kind: python, call: "other:work", args: {{side: {q(side)}}}}}
          - {{id: summary, kind: python, call: "report:summary", args: {{side: {q(side)}}},
              depends_on: ["camb-*"]}}
    """)
    return side


def counts(side: Path) -> Counter[str]:
    return Counter(side.read_text().split()) if side.exists() else Counter()


def explain(tmp_path: Path) -> dict[str, str]:
    res = cli(tmp_path, "status", str(tmp_path / "runs" / "cosmo"), "--format", "json", "--explain")
    assert res.returncode == 0, res.stderr
    return {row["id"]: row["next_run"] for row in json.loads(res.stdout)["tasks"]}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def run(tmp_path: Path) -> None:
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr


def first_run(tmp_path: Path, rerun_on: list[str] | None = None) -> Path:
    side = write_job(tmp_path, rerun_on)
    run(tmp_path)
    assert counts(side) == {"camb-64": 1, "camb-67": 1, "other": 1, "summary": 1}
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}
    return side


def test_an_edit_to_the_module_behind_call_reruns_its_tasks_and_their_downstream_only(tmp_path: Path) -> None:
    side = first_run(tmp_path)
    edit(tmp_path / "cmbpipe.py", "return {", "# a new comment\n    return {")

    assert explain(tmp_path) == {
        "camb-64": "run (code changed: cmbpipe.py)", "camb-67": "run (code changed: cmbpipe.py)",
        "other": "skip (up to date)", "summary": "run (upstream changed: camb-64, camb-67)"}
    dry = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(dry.stdout.splitlines()) == [
        "camb-64: run (code changed: cmbpipe.py)", "camb-67: run (code changed: cmbpipe.py)",
        "other: skip (up to date)", "summary: run (upstream changed: camb-64, camb-67)"]

    run(tmp_path)
    assert counts(side) == {"camb-64": 2, "camb-67": 2, "other": 1, "summary": 2}
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}
    run(tmp_path)
    assert counts(side) == {"camb-64": 2, "camb-67": 2, "other": 1, "summary": 2}


def test_an_edit_to_a_helper_module_the_callable_imports_counts(tmp_path: Path) -> None:
    side = first_run(tmp_path)
    edit(tmp_path / "helpers.py", "2 * x", "3 * x")
    assert explain(tmp_path) == {
        "camb-64": "run (code changed: helpers.py)", "camb-67": "run (code changed: helpers.py)",
        "other": "skip (up to date)", "summary": "run (upstream changed: camb-64, camb-67)"}
    run(tmp_path)
    assert counts(side) == {"camb-64": 2, "camb-67": 2, "other": 1, "summary": 2}
    result = json.loads(published(tmp_path / "runs" / "cosmo", "camb-64").rglob("return.json").__next__()
                        .read_text())
    assert result == {"h0": 64, "cl": 192}


def test_rerun_on_spec_and_inputs_does_not_rerun_on_a_code_edit(tmp_path: Path) -> None:
    side = first_run(tmp_path, rerun_on=["spec", "inputs"])
    edit(tmp_path / "cmbpipe.py", "return {", "# a new comment\n    return {")
    edit(tmp_path / "helpers.py", "2 * x", "2 * x  # still two")
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}
    run(tmp_path)
    assert counts(side) == {"camb-64": 1, "camb-67": 1, "other": 1, "summary": 1}
    config = cli(tmp_path, "config", "job.yaml", "--format", "json")
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["execution.rerun_on"] == {"value": ["spec", "inputs"], "source": "spec line 3"}


def test_a_shell_task_reruns_when_the_script_it_names_in_inputs_changes(tmp_path: Path) -> None:
    side = tmp_path / "side"
    (tmp_path / "run.sh").write_text(f"echo sim >> {q(side)}\n")
    (tmp_path / "notes.txt").write_text("data\n")
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: cosmo}}
        tasks:
          - {{id: sim, kind: shell, run: "bash run.sh && cat notes.txt", inputs: [run.sh, notes.txt]}}
          - {{id: plot, kind: shell, run: "echo plot >> {q(side)}", depends_on: [sim]}}
          - {{id: alone, kind: shell, run: "echo alone >> {q(side)}"}}
    """)
    run(tmp_path)
    assert counts(side) == {"sim": 1, "plot": 1, "alone": 1}
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}

    (tmp_path / "run.sh").write_text(f"# tuned\necho sim >> {q(side)}\n")
    assert explain(tmp_path) == {"sim": "run (code changed: run.sh)", "plot": "run (upstream changed: sim)",
                                 "alone": "skip (up to date)"}
    run(tmp_path)
    assert counts(side) == {"sim": 2, "plot": 2, "alone": 1}

    (tmp_path / "notes.txt").write_text("more data\n")  # data, not code
    assert explain(tmp_path)["sim"] == "run (its input files changed)"


def strip_code(run_dir: Path) -> None:
    """Make the journals look like those of a version that did not fingerprint code: its parts (as far as
    the records keep them) under their names of then, no code part; and no index, whose places of records
    no longer hold."""
    for path in (run_dir / "journal").glob("*.jsonl"):
        records: list[dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines() if line]
        for r in records:
            if "parts" in r:
                r.update(zip(("spec_fp", "deps_fp", "inputs_fp"), r.pop("parts").split(".")))
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "journal" / "index").unlink()


def test_a_run_journaled_without_code_fingerprints_reruns_only_what_was_edited_after_it(tmp_path: Path) -> None:
    side = first_run(tmp_path)
    strip_code(tmp_path / "runs" / "cosmo")
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}  # upgrading reruns nothing
    run(tmp_path)
    assert counts(side) == {"camb-64": 1, "camb-67": 1, "other": 1, "summary": 1}

    edit(tmp_path / "other.py", 'fh.write("other\\n")', 'fh.write("other\\n")  # edited')
    assert explain(tmp_path) == {"camb-64": "skip (up to date)", "camb-67": "skip (up to date)",
                                 "other": "run (code changed: other.py)", "summary": "skip (up to date)"}
    run(tmp_path)
    assert counts(side) == {"camb-64": 1, "camb-67": 1, "other": 2, "summary": 1}
    assert set(explain(tmp_path).values()) == {"skip (up to date)"}
