"""The fast yes/no check of a job spec (``spec/schema.py``: fastjsonschema over the schema without its
annotations) against the full validator that words the problems: they must agree on every spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cmbagent_batch.spec.schema import checks_only, is_valid, load_schema
from tests.helpers.cli import cli, write_spec

VALID: dict[str, Any] = {"version": 1, "job": {"name": "x"},
                         "tasks": [{"id": "a", "kind": "shell", "run": "true", "description": "says a"}]}


def keywords(schema: Any, found: set[str]) -> set[str]:
    """Every keyword used in ``schema``, at every level (property names left out)."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key in ("properties", "patternProperties"):
                for sub in value.values():
                    keywords(sub, found)
            elif isinstance(value, (dict, list)) and key not in ("enum", "required"):
                keywords(value, found)
    elif isinstance(schema, list):
        for sub in schema:
            keywords(sub, found)
    return found


def test_the_fast_check_leaves_out_the_annotations_and_keeps_a_property_named_like_one() -> None:
    full = load_schema("job")
    fast = checks_only(full)
    assert {"description", "x-hint", "default", "title"} <= keywords(full, set())
    assert not {"description", "x-hint", "default", "title", "const"} & keywords(fast, set())
    task = fast["properties"]["tasks"]["items"]
    assert task["properties"]["description"] == {"type": "string"}  # a task's own field, not an annotation
    assert fast["properties"]["version"] == {"allOf": [{"enum": [1]}]}


def test_a_const_becomes_one_more_subschema_beside_those_the_schema_has() -> None:
    schema = {"const": 1, "enum": [1, 2], "allOf": [{"type": "integer", "description": "one"}], "title": "t"}
    assert checks_only(schema) == {"enum": [1, 2], "allOf": [{"type": "integer"}, {"enum": [1]}]}
    assert checks_only(True) is True


@pytest.mark.parametrize("change", [
    {},
    {"version": 2},
    {"version": True},
    {"version": 1.0},
    {"version": "1"},
    {"job": {"name": "x", "title": "a job"}},
    {"tasks": [{"id": "a", "kind": "shell", "run": "true", "description": 5}]},
    {"tasks": [{"id": "a", "kind": "shell", "run": "true", "default": 1}]},
    {"tasks": [{"id": "a b", "kind": "shell", "run": "true"}]},
    {"tasks": [{"id": "a", "kind": "python", "call": "no colon"}]},
    {"execution": {"max_workers": 0}},
    {"x-defaults": {"anything": [1, {"goes": None}]}},
])
def test_the_fast_check_says_what_the_full_validator_says(change: dict[str, Any]) -> None:
    data = {**VALID, **change}
    assert is_valid(data) == jsonschema.Draft202012Validator(load_schema("job")).is_valid(data)


def test_a_spec_the_fast_check_refuses_gets_every_problem_worded(tmp_path: Path) -> None:
    write_spec(tmp_path, """\
        version: true
        job: {name: x}
        tasks:
          - {id: a, kind: shell, run: "true", description: 5}
    """)
    res = cli(tmp_path, "validate", "job.yaml")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == ("job.yaml:1:10: $.version: expected 1, got true\n"
                          "job.yaml:4:52: $.tasks[0].description (task 'a'): expected a string, got the number 5\n"
                          "2 problems in 1 file\n")
