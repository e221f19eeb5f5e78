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
from array import array
from collections.abc import Callable, Iterator
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
    grid, problems = Grid.of(matrix)
    if grid is None:
        return [], problems
    return [grid.values(k) for k in range(len(grid))], []


def _entry_problems(matrix: dict[str, Any]) -> list[MatrixProblem]:
    """``exclude`` and ``include`` entries naming parameters the matrix does not have, or lacking some."""
    params = [k for k in matrix if k not in ("include", "exclude")]
    problems: list[MatrixProblem] = []
    for key in ("exclude", "include"):
        for i, entry in enumerate(matrix.get(key) or []):
            for name in entry:
                if name not in params and params:
                    problems.append(MatrixProblem((key, i, name), f"{name!r} is not a matrix parameter"))
            missing = [n for n in params if n not in entry]
            if key == "include" and missing:
                problems.append(MatrixProblem((key, i), f"include entry lacks parameter {missing[0]!r}"))
    return problems


@dataclass(frozen=True, slots=True, eq=False)
class Grid:
    """The combinations of one matrix, held compactly: the cross product by index (the last parameter
    varying fastest), without the excluded ones, then the ``include`` entries. Nothing is kept per
    combination but, when some are excluded, the index of each one kept."""

    names: tuple[str, ...]  # the parameters of the cross product, in the order written
    axes: tuple[tuple[Any, ...], ...]  # their values
    kept: array[int] | None  # product indices kept when some are excluded; None: all of them
    extra: tuple[Values, ...]  # the include entries, after the product

    @classmethod
    def of(cls, matrix: dict[str, Any]) -> tuple[Grid | None, list[MatrixProblem]]:
        """The grid of a (schema-valid) matrix, or the problems that make it expand to no task."""
        problems = _entry_problems(matrix)
        if problems:
            return None, problems
        params = {k: tuple(v) for k, v in matrix.items() if k not in ("include", "exclude")}
        size = math.prod(len(v) for v in params.values()) if params else 0
        if size > MAX_TASKS:
            return None, [MatrixProblem((), f"matrix expands to {size:,} tasks, over the limit of {MAX_TASKS:,}")]
        names = tuple(params)
        kept = None
        excludes = [[(names.index(k), v) for k, v in e.items()] for e in matrix.get("exclude") or []]
        if excludes and params:
            kept = array("q", (i for i, combo in enumerate(itertools.product(*params.values()))
                               if not any(all(_same(combo[j], v) for j, v in ex) for ex in excludes)))
        grid = cls(names, tuple(params.values()), kept, tuple(dict(e) for e in matrix.get("include") or []))
        if not len(grid):
            return None, [MatrixProblem((), "matrix expands to no tasks (every combination is excluded)")]
        return grid, []

    @property
    def product_size(self) -> int:
        """How many combinations of the cross product are kept."""
        if self.kept is not None:
            return len(self.kept)
        return math.prod(map(len, self.axes)) if self.axes else 0

    def __len__(self) -> int:
        return self.product_size + len(self.extra)

    def values(self, k: int) -> Values:
        """The values of combination ``k``."""
        n = self.product_size
        if k >= n:
            return dict(self.extra[k - n])
        index = self.kept[k] if self.kept is not None else k
        if len(self.axes) == 2:  # the common sweep: no loop
            a, b = self.axes
            i, j = divmod(index, len(b))
            return {self.names[0]: a[i], self.names[1]: b[j]}
        digits = []
        for axis in reversed(self.axes):
            index, d = divmod(index, len(axis))
            digits.append(axis[d])
        return dict(zip(self.names, reversed(digits)))

    def all_values(self) -> Iterator[Values]:
        """The values of every combination, in order."""
        names = self.names
        yield from (dict(zip(names, row)) for row in self.rows())
        yield from (dict(e) for e in self.extra)

    def rows(self, texts: bool = False) -> Iterator[tuple[Any, ...]]:
        """The cross product's kept combinations as tuples of values (``texts``: formatted), in order."""
        axes = [tuple(map(format_value, a)) for a in self.axes] if texts else self.axes
        rows = itertools.product(*axes) if axes else iter(())
        if self.kept is None:
            return rows
        mask = bytearray(math.prod(map(len, axes)))
        for i in self.kept:
            mask[i] = 1
        return itertools.compress(rows, mask)

    def texts(self, text: str) -> list[str]:
        """``text`` filled in for every combination, in order (the ids of a matrix entry)."""
        out: list[str] = []
        if self.axes:
            form = _format_string(text, self.names)
            out = list(itertools.starmap(form.format, self.rows(texts=True)))
        for values in self.extra:
            fill = template(text, list(values))
            out.append(fill(_texts(values), values) if fill else text)
        return out


def _format_string(text: str, names: tuple[str, ...]) -> str:
    """``text`` as a ``str.format`` string taking the parameters' texts by position."""
    pattern = re.compile(r"(?<!\$)\{(" + "|".join(re.escape(n) for n in names) + r")\}")
    hidden = _protect(text)
    parts = pattern.split(hidden) if "{" in hidden else [hidden]
    return "".join(f"{{{names.index(part)}}}" if i % 2 else _release(part).replace("{", "{{").replace("}", "}}")
                   for i, part in enumerate(parts))


def _texts(values: Values) -> dict[str, str]:
    return {k: format_value(v) for k, v in values.items()}


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
