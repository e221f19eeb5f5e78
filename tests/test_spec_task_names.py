"""A spec problem inside a task names the task: ``$.tasks[0] (task 'build'): ...``, by its id as written
(a matrix entry's id template), wherever the problem is found (YAML, schema or semantic checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmbagent_batch.errors import SpecError
from cmbagent_batch.spec import load_spec
from tests.helpers.cli import cli, write_spec

HEAD = """
    version: 1
    job: {name: demo}
    tasks:
"""


def problems(tmp_path: Path, tasks: str) -> list[str]:
    path = write_spec(tmp_path, HEAD + tasks.lstrip("\n"))
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


def test_a_task_missing_its_command_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, """
      - id: build
        kind: shell
    """) == ["4:5: $.tasks[0] (task 'build'): a shell task needs 'run'"]


def test_a_matrix_entry_is_named_by_its_id_template(tmp_path: Path) -> None:
    assert problems(tmp_path, """
      - id: gen-{i}
        kind: shell
        run: echo {i}
        matrix: {i: [1, 2]}
        depends_on: [nope]
    """) == [
        "8:18: $.tasks[0].depends_on[0] (task 'gen-{i}'): unknown task 'nope' (with i=1)",
        "8:18: $.tasks[0].depends_on[0] (task 'gen-{i}'): unknown task 'nope' (with i=2)",
    ]


def test_schema_yaml_and_semantic_problems_name_their_tasks(tmp_path: Path) -> None:
    assert problems(tmp_path, """
      - id: fetch
        kind: shell
        run: echo a
        retries: many
      - id: fit
        kind: python
        call: fit:main
        run: echo
    """) == [
        "7:14: $.tasks[0].retries (task 'fetch'): expected an integer, got the string 'many'",
        "11:5: $.tasks[1].run (task 'fit'): 'run' is for shell tasks; this is a python task",
    ]
    assert problems(tmp_path, """
      - id: fetch
        kind: shell
        run: echo a
        run: echo b
    """) == ["7:5: $.tasks[0].run (task 'fetch'): duplicate key 'run' (first defined at line 6)"]


def test_a_task_without_a_usable_id_is_not_named(tmp_path: Path) -> None:
    assert problems(tmp_path, """
      - kind: shell
        run: echo a
      - id: 12
        kind: shell
    """) == [
        "4:5: $.tasks[0]: missing required key 'id'",
        "6:5: $.tasks[1]: a shell task needs 'run'",
        "6:9: $.tasks[1].id: expected a string, got the number 12",
    ]


def test_a_problem_with_the_id_itself_quotes_it_once(tmp_path: Path) -> None:
    assert problems(tmp_path, """
      - {id: a, kind: shell, run: echo}
      - {id: a, kind: shell, run: echo}
    """) == ["5:10: $.tasks[1].id: duplicate task id 'a': also made by $.tasks[0]"]


def test_validate_names_the_task_in_text_and_json(tmp_path: Path) -> None:
    write_spec(tmp_path, HEAD + """\
      - id: build
        kind: shel
        run: make
    """, name="bad.yaml")
    r = cli(tmp_path, "validate", "bad.yaml")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == ("bad.yaml:5:11: $.tasks[0].kind (task 'build'): the string 'shel' is not one "
                                        "of: shell, python, agent (did you mean 'shell'?)")
    r = cli(tmp_path, "validate", "--format", "json", "bad.yaml")
    assert [(p["path"], p["task"]) for p in json.loads(r.stdout)] == [("$.tasks[0].kind", "build")]
