"""The shipped JSON Schemas, and checking data against them.

Two validators, two jobs: ``is_valid`` answers yes/no fast (fastjsonschema compiles the schema, without
its annotations, to Python once per process); ``problems`` runs jsonschema's Draft 2020-12 validator to collect every
error and words each one for a person. The slow path runs only when the fast one says no.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from cmbagent_batch.errors import Problem
from cmbagent_batch.spec.yamldata import json_path
from cmbagent_batch.spec.yamlio import Document

SCHEMA_NAMES = ("job", "plan", "run", "ledger-entry")


def schema_text(name: str) -> str:
    """The text of ``schemas/NAME.schema.json`` as shipped in the package."""
    return resources.files("cmbagent_batch.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")


@cache
def load_schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text(name))
    return loaded


@cache
def _fast_validator(name: str) -> Callable[[Any], Any]:
    import fastjsonschema

    # Compiled once per process, at every start, so kept small: a yes or no needs no detail in the
    # exceptions (each would write its subschema into the generated code), nor the annotations.
    return fastjsonschema.compile(checks_only(load_schema(name)), use_default=False, detailed_exceptions=False)


# Keywords that say nothing about what is valid (JSON Schema's annotations, and ours, ``x-hint``)...
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "x-hint"})
# ... and where subschemas are: as a mapping of names to subschemas, as a list of them, or alone.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_ONE = frozenset({"items", "additionalProperties", "propertyNames", "contains", "not", "if", "then", "else",
                         "unevaluatedItems", "unevaluatedProperties", "additionalItems"})


def checks_only(schema: Any) -> Any:
    """``schema`` without its annotations, at every level: what validates the same data the same way. A
    property that is named like an annotation (a task's ``description``) stays: only keywords go. And
    ``const: X`` becomes a subschema ``enum: [X]``, which fastjsonschema checks with the same test: its
    ``const`` cannot be compiled without detailed exceptions (it words their message)."""
    if not isinstance(schema, dict):
        return schema  # a boolean schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: checks_only(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [checks_only(v) for v in value]
        elif key in _SCHEMA_ONE:
            out[key] = checks_only(value)
        else:
            out[key] = value
    if "const" in out:  # as one more subschema: beside an enum of its own, both must hold
        out["allOf"] = [*out.get("allOf", []), {"enum": [out.pop("const")]}]
    return out


def is_valid(data: Any, name: str = "job") -> bool:
    import fastjsonschema

    try:
        _fast_validator(name)(data)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def problems(doc: Document, name: str = "job") -> list[Problem]:
    """Every schema violation of ``doc.data``, located and worded."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(name))
    out: list[Problem] = []
    for error in validator.iter_errors(doc.data):
        out.extend(_explain(error, doc))
    return out


def _explain(error: Any, doc: Document) -> list[Problem]:
    path = tuple(error.absolute_path)
    kind = error.validator
    if kind in ("anyOf", "oneOf") and error.context:
        import jsonschema.exceptions

        return _explain(jsonschema.exceptions.best_match(error.context), doc)
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
        extras = sorted(k for k in error.instance if k not in allowed and not any(p.search(k) for p in patterns))
        return [_problem(doc, path + (k,), unknown_key(k, allowed), key=True) for k in extras]
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        # jsonschema reports a bad key name at its mapping's path, with the name as the instance.
        name = error.instance
        hint = _pattern_hint(error.schema) if kind == "pattern" else _message(error)
        return [_problem(doc, path + (name,), f"invalid name {name!r}: {hint}", key=True)]
    return [_problem(doc, path, _message(error))]


def _pattern_hint(schema: dict[str, Any]) -> str:
    return str(schema.get("x-hint") or f"must match {schema.get('pattern')}")


def _problem(doc: Document, path: tuple[Any, ...], message: str, *, key: bool = False) -> Problem:
    line, column = doc.locate(path, key=key)
    return Problem(doc.file, line, column, json_path(path), message)


def unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r}; valid keys: {', '.join(allowed)}"


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


_BOUNDS = {"minimum": "at least", "exclusiveMinimum": "greater than", "maximum": "at most"}
_FIXED = {  # messages that need nothing of the value
    "minItems": "must not be an empty list",
    "minLength": "must not be empty",
    "minProperties": "must not be an empty mapping",
    "uniqueItems": "entries must be unique",
}


def describe(value: Any) -> str:
    """How a YAML value reads in a message: its kind and, for scalars, itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"the number {value!r}"


def _message(error: Any) -> str:
    kind, expected, value, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        return f"expected {' or '.join(_TYPE_WORDS.get(t, t) for t in types)}, got {describe(value)}"
    if kind == "required":
        missing = [k for k in expected if isinstance(value, dict) and k not in value]
        name = missing[0] if missing else expected[0]
        kind_value = value.get("kind") if isinstance(value, dict) else None
        if kind_value in ("shell", "python", "agent") and name in ("run", "call", "instructions"):
            return f"a {kind_value} task needs {name!r}"
        return f"missing required key {name!r}"
    if kind == "enum":
        options = ", ".join(map(str, expected))
        close = difflib.get_close_matches(str(value), [str(e) for e in expected], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and isinstance(value, str) else ""
        return f"{describe(value)} is not one of: {options}{hint}"
    if kind == "const":
        return f"expected {expected!r}, got {describe(value)}"
    if kind == "pattern":
        return f"invalid value {value!r}: {_pattern_hint(schema)}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {expected}, got {describe(value)}"
    if kind == "maxLength":
        return f"must be at most {expected} characters long"
    return _FIXED.get(kind, str(error.message))
