"""Whether a python task's ``call: module:function`` will resolve, found without running user code.

The module is looked for as the task imports it: in the spec file's directory first, then on this
interpreter's path (``tasks/python.py`` puts the spec's directory in front of ``sys.path``), except that a
module the task runner has imported already wins over one of the same name beside the spec (``json``: the
import finds it in ``sys.modules``). A dotted module's packages are searched level by level in their
directories, never imported; their ``__init__.py`` is parsed, as a syntax error there fails the import.
The function must be bound at the top of the module's source, which is parsed, not run: a ``def``,
``async def`` or ``class``, an assignment, a ``:=`` or an import of that name (under an ``if`` or ``try``
too), or a ``global`` statement naming it in any function (which may be called at import). A module that
can bind any name (a module-level ``__getattr__``, ``from x import *``, ``globals()``, ``exec``, an
assignment onto ``sys.modules[...]``...) and modules without source (extensions, built-ins, namespace
packages) cannot be told: they are accepted. A module this process has imported already is judged by its
attributes instead.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from types import ModuleType

from cmbagent_batch.spec.checks import hint

# Calls at the top of a module that can bind names its source does not show.
DYNAMIC = frozenset({"globals", "vars", "locals", "exec", "setattr"})
# The module every task's process imports before the task's own module, whatever the backend.
TASK_RUNNER = "cmbagent_batch.tasks.runner"
if sys.version_info >= (3, 11):
    TRY: tuple[type[ast.stmt], ...] = (ast.Try, ast.TryStar)
else:  # pragma: no cover - Python 3.10
    TRY = (ast.Try,)
BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # a statement's parts that are not evaluated at once


@dataclass(frozen=True, slots=True)
class Bound:
    """The names a module's source binds at its top level; ``any``: it may bind others, unseen."""

    names: frozenset[str]
    any: bool


@dataclass(frozen=True, slots=True)
class Found:
    """A module as the task will import it; ``shadows``: why that is not the module of the same name beside
    the spec, when it is not (the start of a message)."""

    spec: ModuleSpec
    shadows: str | None = None


class Resolver:
    """Tells why calls will not resolve; each module is found and parsed once, however many tasks call it."""

    def __init__(self, spec_dir: str) -> None:
        self._dir = spec_dir
        self._modules: dict[str, Found | str] = {}
        self._bound: dict[str, Bound | str] = {}
        self._told: dict[str, str | None] = {}  # each call is told once, however many entries list it

    def problem(self, call: str) -> str | None:
        """Why ``call`` (``module:function``) will not resolve, or None when it will or it cannot be told."""
        if call not in self._told:
            self._told[call] = self._problem(call)
        return self._told[call]

    def _problem(self, call: str) -> str | None:
        module, _, function = call.partition(":")
        found = self._module(module)
        if isinstance(found, str):
            return f"call {call!r}: {found}"
        spec = found.spec
        loaded = _loaded(spec)
        if loaded is not None:
            attributes = vars(loaded)
            bound: Bound | str = Bound(frozenset(attributes), "__getattr__" in attributes)
        elif _has_source(spec):
            bound = self._parsed(spec)
        else:
            return None  # an extension, a built-in, a namespace package or bytecode only: no source to read
        where = f"{found.shadows}; {module}" if found.shadows else self._where(spec)
        if isinstance(bound, str):
            return f"call {call!r}: {where} {bound}"
        if bound.any or function in bound.names:
            return None
        return f"call {call!r}: {where} defines no function {function!r}{hint(function, bound.names)}"

    def _module(self, name: str) -> Found | str:
        """The module as the task will import it, or why it will not (a message)."""
        if name not in self._modules:
            self._modules[name] = self._find(name)
        return self._modules[name]

    def _find(self, name: str) -> Found | str:
        top, *rest = name.split(".")
        found = self._top_level(top)
        if found is None:
            return (f"no module named {top!r} in the spec's directory {self._dir} or among the modules of "
                    f"{sys.executable}{hint(top, _modules([self._dir]))}")
        spec, done = found.spec, top
        for part in rest:
            inner = f"{done}.{part}"
            imported = getattr(sys.modules.get(inner), "__spec__", None)
            if imported is not None:  # imported here already (os.path): the task finds it the same way
                spec, done = imported, inner
                continue
            why = self._inner(spec, inner)
            if isinstance(why, str):
                return f"{found.shadows}; {why}" if found.shadows else why
            spec, done = why, inner
        return Found(spec, found.shadows)

    def _inner(self, package: ModuleSpec, name: str) -> ModuleSpec | str:
        """The module ``name`` in ``package``, or why the task cannot import it (a message)."""
        places = package.submodule_search_locations
        if places is None:
            return f"{self._where(package)} is a module, not a package: it has no module {name!r}"
        if _has_source(package) and _loaded(package) is None:  # importing name runs the package's __init__.py
            parsed = self._parsed(package)
            if isinstance(parsed, str):
                return f"{self._where(package)} {parsed}"
        found = _find_in(name, list(places))
        if found is None:
            shown = ", ".join(os.path.join(self._shown(p), "") for p in places)
            parent = name.rpartition(".")[0]
            return f"no module named {name!r} in {shown}{hint(name, [f'{parent}.{m}' for m in _modules(places)])}"
        return found

    def _top_level(self, name: str) -> Found | None:
        """A top-level module as a task finds it: in the spec's directory first, then on this interpreter's
        path, built in, or served by an installed finder (an editable install's). A module the task runner
        has imported already wins over the spec's, and a module or regular package over namespace portions,
        wherever they are; portions found in both places are merged."""
        local = _find_in(name, [self._dir])
        try:
            installed = importlib.util.find_spec(name)  # for a top-level name, this imports nothing
        except (ImportError, ValueError):  # a module imported here without a spec (__main__): taken as found
            installed = ModuleSpec(name, None)
        if local is not None and local.loader is not None:
            if installed is None or installed.origin == local.origin or name not in _preloaded():
                return Found(local)
            return Found(installed, self._shadowing(name, installed, local))
        if installed is None or local is None:
            found = installed or local
            return None if found is None else Found(found)
        if installed.loader is not None:
            return Found(installed)
        return Found(_namespace(name, [*(local.submodule_search_locations or ()),
                                       *(installed.submodule_search_locations or ())]))

    def _shadowing(self, name: str, installed: ModuleSpec, local: ModuleSpec) -> str:
        what = ("the standard library's module" if name in sys.stdlib_module_names
                else f"the installed module {self._where(installed)}")
        return f"{name} is {what}, which the task imports instead of {self._where(local)} beside the spec"

    def _parsed(self, spec: ModuleSpec) -> Bound | str:
        """The names the source of ``spec`` binds, or why it cannot be imported; each file is parsed once."""
        origin = spec.origin or ""
        if origin not in self._bound:
            self._bound[origin] = _parse(origin)
        return self._bound[origin]

    def _where(self, spec: ModuleSpec) -> str:
        """The module's file (relative to the spec's directory when inside it), else its name."""
        return self._shown(spec.origin) if spec.has_location and spec.origin else f"module {spec.name!r}"

    def _shown(self, path: str) -> str:
        """``path`` relative to the spec's directory when inside it, else as it is."""
        if not os.path.isabs(path):
            return path
        relative = os.path.relpath(path, self._dir)
        return path if relative.startswith("..") else relative


@functools.cache
def _preloaded() -> frozenset[str]:
    """The top-level modules every task's process has imported before the task's module: those of a fresh
    interpreter once it has imported the task runner (worker processes and the runner's own process have
    more, never fewer). This process's modules are not those, so the interpreter is run, once, and only
    when a module beside a spec has the name of another. Empty if it fails: then no module is taken as
    shadowed (a check must not refuse what may run)."""
    code = (f"import sys\nif sys.path[:1] == ['']: del sys.path[0]\nimport {TASK_RUNNER}\n"
            "print(*(n for n in sys.modules if '.' not in n))")
    try:  # without the current directory on its path: nothing beside the spec may be imported
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(done.stdout.split())


def _loaded(spec: ModuleSpec) -> ModuleType | None:
    """The module of ``spec`` if this process has imported it already (the same file)."""
    module = sys.modules.get(spec.name)
    imported = getattr(module, "__spec__", None)
    same = imported is not None and spec.origin is not None and imported.origin == spec.origin
    return module if same else None


def _has_source(spec: ModuleSpec) -> bool:
    origin = spec.origin
    return spec.has_location and origin is not None and origin.endswith(tuple(importlib.machinery.SOURCE_SUFFIXES))


def _find_in(name: str, places: list[str]) -> ModuleSpec | None:
    """The module ``name`` (its last part) in the directories ``places``: the first module or regular
    package, else a namespace package of every portion found, else None. As ``PathFinder`` finds it, but
    without building a namespace path, which would need the parent package imported."""
    portions: list[str] = []
    for place in places:
        finder = pkgutil.get_importer(place)
        spec = None if finder is None else finder.find_spec(name)
        if spec is not None and spec.loader is not None:
            return spec
        if spec is not None:
            portions.extend(spec.submodule_search_locations or ())
    return _namespace(name, portions) if portions else None


def _namespace(name: str, portions: list[str]) -> ModuleSpec:
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = portions
    return spec


def _modules(places: Iterable[str]) -> list[str]:
    """The names of the modules and packages in ``places`` (for did-you-mean)."""
    return [m.name for m in pkgutil.iter_modules(list(places))]


def _parse(path: str) -> Bound | str:
    """The names bound at the top of the source file ``path``, or why it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except SyntaxError as exc:  # a null byte has no line (Python 3.11 and later)
        return f"cannot be imported: {exc.msg}" if exc.lineno is None else f"cannot be imported: line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # pragma: no cover - a null byte, Python 3.10
        return f"cannot be imported: {exc}"
    return _bound(tree)


def _bound(tree: ast.Module) -> Bound:
    names: set[str] = set()
    dynamic = False
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        for part in ast.iter_child_nodes(node):  # what runs at import: values, conditions, decorators, defaults
            if not isinstance(part, BLOCKS):
                for n in ast.walk(part):
                    if isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
                        names.add(n.target.id)
                    dynamic = dynamic or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                          and n.func.id in DYNAMIC)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            dynamic = dynamic or any(a.name == "*" for a in node.names)
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(_targets(target))
        elif isinstance(node, (ast.AugAssign, ast.For, ast.AsyncFor)) or (
                isinstance(node, ast.AnnAssign) and node.value is not None):  # "x: int" alone binds nothing
            names.update(_targets(node.target))
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            names.update(n for item in node.items if item.optional_vars for n in _targets(item.optional_vars))
        elif isinstance(node, TRY):
            handlers: list[ast.ExceptHandler] = getattr(node, "handlers", [])
            names.update(h.name for h in handlers if h.name)
            stack.extend(s for h in handlers for s in h.body)
        elif isinstance(node, ast.Match):
            stack.extend(s for case in node.cases for s in case.body)
        for field in ("body", "orelse", "finalbody"):  # the blocks of if, while, for, with and try
            stack.extend(getattr(node, field, ()))
    for each in ast.walk(tree):  # anywhere: a function may be called at import
        if isinstance(each, ast.Global):
            names.update(each.names)
        dynamic = dynamic or _rebinds_module(each)
    return Bound(frozenset(names), dynamic or "__getattr__" in names)


def _targets(node: ast.expr) -> list[str]:
    """The names an assignment target binds (``a``, ``a, (b, *c)``); none for ``x.y`` or ``x[0]``."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [n for e in node.elts for n in _targets(e)]
    if isinstance(node, ast.Starred):
        return _targets(node.value)
    return []


def _rebinds_module(node: ast.AST) -> bool:
    """Whether ``node``, wherever it is, may bind names in its module unseen: ``globals()``, the module
    itself (``sys.modules[__name__]``), or an attribute set on an entry of ``sys.modules``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id == "globals" or (node.func.id in ("setattr", "delattr") and bool(node.args)
                                             and _module_entry(node.args[0]))
    if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
        return _module_entry(node.value)
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name) and node.slice.id == "__name__"
            and _module_entry(node))


def _module_entry(node: ast.AST) -> bool:
    """``sys.modules[...]`` (or ``modules[...]``, however ``sys`` is named)."""
    if not isinstance(node, ast.Subscript):
        return False
    table = node.value
    return (isinstance(table, ast.Attribute) and table.attr == "modules") or (
        isinstance(table, ast.Name) and table.id == "modules")
