"""Matrix expansion: one task entry with ``matrix: {PARAM: [values]}`` becomes one task per combination.

Combinations are the cross product of the parameters in the order written, minus every combination
matching an ``exclude`` entry, plus the ``include`` entries. ``{PARAM}`` is replaced by the value in
every string of the entry (id, run, paths, env values, args...); in ``args`` a string that is
exactly ``"{PARAM}"`` becomes the value itself, keeping its type. Nothing else changes: other braces, such
as ``${HOME}`` or awk's ``{print $1}``, are left alone.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

MAX_TASKS = 2_000_000  # across the whole job, after expansion

Values = dict[str, Any]


@dataclass(frozen=True, slots=True)
class MatrixProblem:
    path: tuple[Any, ...]  # relative to the task entry
    message: str


def format_value(value: Any) -> str:
    """A matrix value as it appears in ids and strings: YAML spelling for booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe_values(values: Values) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


def combinations(matrix: dict[str, Any]) -> tuple[list[Values], list[MatrixProblem]]:
    """The value combinations a (schema-valid) matrix stands for, in a deterministic order."""
    params = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    names = list(params)
    problems: list[MatrixProblem] = []
    for key in ("exclude", "include"):
        for i, entry in enumerate(matrix.get(key) or []):
            for name in entry:
                if name not in params and key == "exclude":
                    problems.append(MatrixProblem((key, i, name), f"{name!r} is not a matrix parameter"))
            missing = [n for n in names if n not in entry]
            if key == "include" and missing:
                problems.append(
                    MatrixProblem((key, i), f"include entry lacks parameter {missing[0]!r}")
                )
    if problems:
        return [], problems
    size = math.prod(len(v) for v in params.values()) if params else 0
    if size > MAX_TASKS:
        return [], [MatrixProblem((), f"matrix expands to {size:,} tasks, over the limit of {MAX_TASKS:,}")]
    excludes = [list(e.items()) for e in matrix.get("exclude") or []]
    out: list[Values] = []
    if params:
        for combo in itertools.product(*params.values()):
            values = dict(zip(names, combo))
            if any(all(_same(values.get(k), v) for k, v in ex) for ex in excludes):
                continue
            out.append(values)
    for entry in matrix.get("include") or []:
        out.append(dict(entry))
    if not out:
        problems.append(MatrixProblem((), "matrix expands to no tasks (every combination is excluded)"))
    return out, problems


def _same(a: Any, b: Any) -> bool:
    # 1 and true are different matrix values even though Python says 1 == True.
    return type(a) is type(b) and a == b


def substituter(names: list[str], *, keep_type: bool = False) -> Callable[[Any, Values], Any]:
    """A function replacing ``{NAME}`` placeholders in every string of a JSON-like value.

    With ``keep_type`` (used for python ``args``), a string that is exactly one placeholder becomes
    the value itself.
    """
    if not names:
        return lambda value, values: value
    pattern = re.compile(r"\{(" + "|".join(re.escape(n) for n in names) + r")\}")

    def sub(value: Any, values: Values) -> Any:
        if isinstance(value, str):
            if "{" not in value:
                return value
            whole = pattern.fullmatch(value) if keep_type else None
            if whole:  # "{lmax}" alone keeps the value's type: 500 stays a number
                return values[whole.group(1)]
            return pattern.sub(lambda m: format_value(values[m.group(1)]), value)
        if isinstance(value, list):
            return [sub(v, values) for v in value]
        if isinstance(value, dict):
            return {k: sub(v, values) for k, v in value.items()}
        return value

    return sub


def expand(entry: dict[str, Any]) -> tuple[list[tuple[dict[str, Any], Values]], list[MatrixProblem]]:
    """The tasks one entry stands for, each with its matrix values ({} for a plain entry)."""
    matrix = entry.get("matrix")
    if not isinstance(matrix, dict):
        return [(entry, {})], []
    combos, problems = combinations(matrix)
    if problems:
        return [], problems
    names = sorted({n for c in combos for n in c}, key=lambda n: (-len(n), n))
    sub = substituter(names)
    sub_args = substituter(names, keep_type=True)
    body = {k: v for k, v in entry.items() if k not in ("matrix", "args")}
    out = []
    for values in combos:
        task = sub(body, values)
        if "args" in entry:
            task["args"] = sub_args(entry["args"], values)
        out.append((task, values))
    return out, []
