"""Matrix expansion: one task entry with ``matrix: {PARAM: [values]}`` becomes one task per combination.

Combinations are the cross product of the parameters in the order written, minus every combination
matching an ``exclude`` entry, plus the ``include`` entries. ``{PARAM}`` is replaced by the value in
every string of the entry (id, run, paths, env values, args...); in ``args`` a string that is
exactly ``"{PARAM}"`` becomes the value itself, keeping its type. Other braces, such as ``${HOME}`` or
awk's ``{print $1}``, are left alone; ``{NAME}`` with a name that is not a parameter is a mistake
(``unknown_placeholders``), unless written ``{{NAME}}``, which gives a literal ``{NAME}``.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TASKS = 2_000_000  # across the whole job, after expansion
_NAMED = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")  # looks like a placeholder; "${NAME}" is the shell's
_ESCAPED = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")  # "{{NAME}}": a literal "{NAME}"
_LATEX = re.compile(r"(?:\\[A-Za-z]+|[\^_}])\Z")  # before a brace: LaTeX's \\cmd{..}, x^{..}, x_{..}, {..}{..}
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters standing for an escaped name's braces meanwhile


def _protect(text: str) -> str:
    """``text`` with each ``{{NAME}}`` hidden from the placeholder patterns (``_release`` gives ``{NAME}``)."""
    return _ESCAPED.sub(_OPEN + r"\1" + _CLOSE, text) if "{{" in text else text


def _release(text: str) -> str:
    return text.replace(_OPEN, "{").replace(_CLOSE, "}")

Values = dict[str, Any]


@dataclass(frozen=True, slots=True)
class MatrixProblem:
    path: tuple[Any, ...]  # relative to the task entry
    message: str
    warning: bool = False  # the entry is still valid


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
                if name not in params and params:
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


Fill = Callable[[dict[str, str], Values], Any]


def template(value: Any, names: list[str], *, keep_type: bool = False) -> Fill | None:
    """Compile a JSON-like value into a function of (texts, values) filling its ``{NAME}`` placeholders.

    Returns None when the value holds no placeholder (it can be shared as it is). ``texts`` maps each
    name to its formatted value; with ``keep_type`` (python ``args``), a string that is exactly one
    placeholder becomes the value itself. Compiling once per entry keeps a 10^5-task matrix fast.
    """
    if not names:
        return None
    # "${NAME}" is the shell's: only a "{NAME}" not preceded by "$" is a placeholder ("{{NAME}}" is hidden).
    pattern = re.compile(r"(?<!\$)\{(" + "|".join(re.escape(n) for n in names) + r")\}")
    return _compile(value, pattern, keep_type)


def _compile(value: Any, pattern: re.Pattern[str], keep_type: bool) -> Fill | None:
    if isinstance(value, str):
        text = _protect(value)
        parts = pattern.split(text) if "{" in text else [text]
        if text is not value:
            parts[0::2] = [_release(p) for p in parts[0::2]]
        if len(parts) == 1:
            if parts[0] == value:
                return None
            literal = parts[0]
            return lambda texts, values: literal
        if keep_type and len(parts) == 3 and parts[0] == parts[2] == "":
            name = parts[1]
            return lambda texts, values: values[name]
        literals, keys = parts[0::2], parts[1::2]
        rest = list(zip(keys, literals[1:]))
        head = literals[0]

        def fill(texts: dict[str, str], values: Values) -> str:
            out = [head]
            for key, literal in rest:
                out.append(texts[key])
                out.append(literal)
            return "".join(out)

        return fill
    if isinstance(value, list):
        items = [(_compile(v, pattern, keep_type), v) for v in value]
        if all(f is None for f, _ in items):
            return None
        return lambda texts, values: [f(texts, values) if f else v for f, v in items]
    if isinstance(value, dict):
        fields = [(k, _compile(v, pattern, keep_type), v) for k, v in value.items()]
        if all(f is None for _, f, _ in fields):
            return None
        return lambda texts, values: {k: f(texts, values) if f else v for k, f, v in fields}
    return None


def unknown_placeholders(entry: dict[str, Any]) -> list[MatrixProblem]:
    """Every ``{NAME}`` in a matrix entry's strings whose name is not a parameter: it stays as written. One
    close to a parameter's name is a mistake (``{HO}`` for ``H0``): an error. Others are warnings, as braces
    have other uses (awk's ``{print}``); LaTeX's (``C_\\ell^{TT}``, ``\\mathrm{dof}``) are left alone. Each
    comes with the path to its string inside the entry."""
    matrix = entry.get("matrix")
    if not isinstance(matrix, dict):
        return []
    params = sorted({k for k in matrix if k not in ("include", "exclude")}
                    | {k for e in matrix.get("include") or [] if isinstance(e, dict) for k in e})
    out: list[MatrixProblem] = []
    for path, text in _strings({k: v for k, v in entry.items() if k not in ("matrix", "id")}, ()):  # ids: checks.py
        hidden = _protect(text)
        names = [m.group(1) for m in _NAMED.finditer(hidden) if not _LATEX.search(hidden, 0, m.start())]
        for name in dict.fromkeys(n for n in names if n not in params):
            close = difflib.get_close_matches(name, params, n=1, cutoff=0.5) or [
                p for p in params if p.lower() == name.lower()][:1]
            if close:
                out.append(MatrixProblem(path, f"unknown placeholder {{{name}}} (did you mean {{{close[0]}}}?): the "
                                               f"matrix parameters are {', '.join(params)}; write {{{{{name}}}}} for "
                                               f"a literal {{{name}}}"))
            else:
                out.append(MatrixProblem(path, f"{{{name}}} is not a matrix parameter ({', '.join(params)}), so it "
                                               f"stays as written; write {{{{{name}}}}} to say so", warning=True))
    return out


def _strings(value: Any, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str]]:
    if isinstance(value, str):
        return [(path, value)] if "{" in value else []
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _strings(v, path + (i,))]
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _strings(v, path + (k,))]
    return []


def expand(entry: dict[str, Any]) -> tuple[list[tuple[dict[str, Any], Values]], list[MatrixProblem]]:
    """The tasks one entry stands for, each with its matrix values ({} for a plain entry)."""
    matrix = entry.get("matrix")
    if not isinstance(matrix, dict):
        return [(entry, {})], []
    combos, problems = combinations(matrix)
    if problems:
        return [], problems
    names = sorted({n for c in combos for n in c}, key=lambda n: (-len(n), n))
    body = {k: v for k, v in entry.items() if k not in ("matrix", "args")}
    fill_body = template(body, names)
    fill_args = template(entry.get("args"), names, keep_type=True)
    out = []
    for values in combos:
        texts = {k: format_value(v) for k, v in values.items()}
        task = fill_body(texts, values) if fill_body else dict(body)
        if "args" in entry:
            task["args"] = fill_args(texts, values) if fill_args else entry["args"]
        out.append((task, values))
    return out, []
