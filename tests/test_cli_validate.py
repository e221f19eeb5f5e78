"""``cmbagent-batch validate`` (and the small commands around it) through a real subprocess."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cmbagent_batch import __version__
from tests.helpers.cli import clean_env
from tests.helpers.cli import cli as run_cli

VALID = """\
version: 1
job:
  name: demo
tasks:
  - id: a
    kind: shell
    run: echo a
  - id: b
    kind: shell
    run: echo b
    depends_on: [a]
"""

INVALID = """\
version: 2
job:
  name: demo
tasks:
  - id: a
    kind: shel
    run: echo a
"""

INVALID_PROBLEMS = [
    "bad.yaml:1:10: $.version: expected 1, got the number 2",
    "bad.yaml:6:11: $.tasks[0].kind (task 'a'): the string 'shel' is not one of: shell, python, agent (did you mean 'shell'?)",
]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line in ``tmp_path`` with ``HOME`` there too."""
    return run_cli(tmp_path, *args, env=clean_env(tmp_path, home=tmp_path))


@pytest.fixture()
def specs(tmp_path: Path) -> Path:
    (tmp_path / "ok.yaml").write_text(VALID, encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(INVALID, encoding="utf-8")
    return tmp_path


def test_valid_spec(specs: Path) -> None:
    r = cli(specs, "validate", "ok.yaml")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok.yaml: valid (2 tasks)\n", "")


def test_valid_spec_with_one_task_says_task(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(VALID.split("  - id: b")[0], encoding="utf-8")
    r = cli(tmp_path, "validate", "one.yaml")
    assert (r.returncode, r.stdout, r.stderr) == (0, "one.yaml: valid (1 task)\n", "")


def test_invalid_spec(specs: Path) -> None:
    r = cli(specs, "validate", "bad.yaml")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [*INVALID_PROBLEMS, "2 problems in 1 file"]


def test_invalid_spec_json(specs: Path) -> None:
    r = cli(specs, "validate", "--format", "json", "bad.yaml")
    assert (r.returncode, r.stderr) == (2, "")
    assert json.loads(r.stdout) == [
        {"file": "bad.yaml", "line": 1, "column": 10, "path": "$.version", "task": None, "severity": "error",
         "message": "expected 1, got the number 2"},
        {"file": "bad.yaml", "line": 6, "column": 11, "path": "$.tasks[0].kind", "task": "a", "severity": "error",
         "message": "the string 'shel' is not one of: shell, python, agent (did you mean 'shell'?)"},
    ]


def test_valid_spec_json_is_an_empty_list(specs: Path) -> None:
    r = cli(specs, "validate", "--format", "json", "ok.yaml")
    assert (r.returncode, r.stderr) == (0, "")
    assert json.loads(r.stdout) == []


def test_several_files_one_valid_one_invalid(specs: Path) -> None:
    r = cli(specs, "validate", "ok.yaml", "bad.yaml")
    assert r.returncode == 2
    assert r.stdout == "ok.yaml: valid (2 tasks)\n"
    assert r.stderr.splitlines() == [*INVALID_PROBLEMS, "2 problems in 1 file"]


def test_several_invalid_files_are_all_reported(specs: Path) -> None:
    (specs / "empty.yaml").write_text("", encoding="utf-8")
    r = cli(specs, "validate", "bad.yaml", "missing.yaml", "empty.yaml", "ok.yaml")
    assert r.returncode == 2
    assert r.stdout == "ok.yaml: valid (2 tasks)\n"
    assert r.stderr.splitlines() == [
        *INVALID_PROBLEMS,
        "missing.yaml: no such file",
        "empty.yaml: the file is empty",
        "4 problems in 3 files",
    ]


def test_several_files_json(specs: Path) -> None:
    r = cli(specs, "validate", "--format", "json", "ok.yaml", "missing.yaml")
    assert r.returncode == 2
    assert json.loads(r.stdout) == [
        {"file": "missing.yaml", "line": None, "column": None, "path": "$", "task": None,
         "severity": "error", "message": "no such file"},
    ]


def test_a_crashing_yaml_value_is_a_spec_problem_not_an_internal_error(tmp_path: Path) -> None:
    (tmp_path / "tag.yaml").write_text(VALID.replace("version: 1", "version: !!int 'one'"), encoding="utf-8")
    r = cli(tmp_path, "validate", "tag.yaml")
    assert "Traceback" not in r.stderr
    assert "internal error" not in r.stderr
    assert r.returncode == 2, r.stderr



def test_version(tmp_path: Path) -> None:
    r = cli(tmp_path, "--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"cmbagent-batch {__version__}\n", "")


def test_help(tmp_path: Path) -> None:
    r = cli(tmp_path, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: cmbagent-batch [-h] [--version] COMMAND ...\n")
    for command in ("validate", "config", "plan", "schema"):
        assert command in r.stdout


@pytest.mark.parametrize("command", ["validate", "config", "plan", "schema"])
def test_help_on_every_subcommand(tmp_path: Path, command: str) -> None:
    r = cli(tmp_path, command, "--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith(f"usage: cmbagent-batch {command} [-h]")


def test_unknown_flag(specs: Path) -> None:
    r = cli(specs, "validate", "--bogus", "ok.yaml")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines()[-2:] == ["cmbagent-batch validate: error: unknown option --bogus",
                                          "valid options: --help/-h, --format"]


def test_no_command(tmp_path: Path) -> None:
    r = cli(tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines()[-1] == "cmbagent-batch: error: the following arguments are required: COMMAND"


def test_validate_needs_a_spec(tmp_path: Path) -> None:
    r = cli(tmp_path, "validate")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines()[-1] == "cmbagent-batch validate: error: the following arguments are required: SPEC"


def test_schema_job(tmp_path: Path) -> None:
    r = cli(tmp_path, "schema", "job")
    assert (r.returncode, r.stderr) == (0, "")
    schema = json.loads(r.stdout)
    assert schema["$id"] == "urn:cmbagent-batch:schema:job:1"
    assert cli(tmp_path, "schema").stdout == r.stdout  # job is the default


@pytest.mark.parametrize("name", ["job", "plan", "run", "ledger-entry"])
def test_every_offered_schema_prints(tmp_path: Path, name: str) -> None:
    r = cli(tmp_path, "schema", name)
    assert (r.returncode, r.stderr) == (0, "")
    assert "$id" in json.loads(r.stdout)
