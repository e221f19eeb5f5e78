"""Task fingerprints for resume: a task whose fingerprint is unchanged since it succeeded is skipped.

A fingerprint hashes four parts, kept apart so ``status --explain`` can say which one changed:
``spec`` (the fields that change what the task does), ``deps`` (the spec, deps and inputs parts of the
tasks it depends on, so editing one task reruns it and everything downstream), ``inputs`` (size and
modification time of declared inputs that come from outside the job) and ``code`` (the bytes of the
source files behind the task, see ``CodeFiles``, chained through its dependencies the way ``deps`` is).
``code`` is kept out of ``deps`` so that a journal written before code was fingerprinted still matches.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from cmbagent_batch.plan.analysis.cache import digest
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.plan.specdigest import SpecDigests
from cmbagent_batch.spec.model import TaskSpec
from cmbagent_batch.spec.tasks import Tasks, task_ids

# A shell task's input is a script (code, not data) when the command names it and it is executable,
# starts with "#!" or has one of these suffixes.
_SCRIPT_SUFFIXES = (".sh", ".bash", ".zsh", ".csh", ".ksh", ".py", ".pl", ".rb", ".r", ".jl", ".lua", ".awk",
                    ".tcl", ".m")


@dataclass(frozen=True)
class CodeFile:
    """One source file behind a task: ``name`` as shown to the user, ``sha`` of its bytes, ``mtime``."""

    name: str
    sha: str
    mtime: float


def _digest_hex(*parts: str) -> str:
    """``digest(list(parts))`` for parts that are hex digests or empty: their canonical JSON is written
    directly (no character of theirs needs escaping)."""
    return hashlib.sha256(('["' + '","'.join(parts) + '"]').encode()).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    spec: str
    deps: str
    inputs: str
    code: str = ""  # own files and the code parts of the dependencies
    files: tuple[CodeFile, ...] = ()  # the task's own code files
    code_mtime: float = 0.0  # newest modification time among the files ``code`` covers
    hashes: Mapping[str, str] = field(default_factory=dict, hash=False)  # each own file's name: its sha, shortened

    @functools.cached_property
    def value(self) -> str:
        return _digest_hex(self.spec, self.deps, self.inputs, self.code)

    @functools.cached_property
    def base(self) -> str:
        """What a dependent's ``deps`` part hashes (the fingerprint without code, as journals have it)."""
        return _digest_hex(self.spec, self.deps, self.inputs)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"fp": self.value, "spec_fp": self.spec, "deps_fp": self.deps,
                                  "inputs_fp": self.inputs, "code_fp": self.code}
        if self.hashes:
            out["code_files"] = self.hashes
        return out


def external_inputs_digest(patterns: Iterable[str], base_dir: str) -> str:
    """Size and mtime of the files outside the job that ``patterns`` match (relative to ``base_dir``)."""
    return _stat_digest(_matches(patterns, base_dir), base_dir)


def _matches(patterns: Iterable[str], base_dir: str) -> list[str]:
    return [path for pattern in patterns for path in sorted(glob.glob(os.path.join(base_dir, pattern)))]


def _stat_digest(paths: list[str], base_dir: str) -> str:
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        stats.append([os.path.relpath(path, base_dir), st.st_size, st.st_mtime_ns])
    return digest(stats)


class CodeFiles:
    """The source files behind tasks, each read, hashed and parsed once per run (10^5 tasks calling one
    module cost one read and then a dictionary look-up each). User code is never imported.

    A python task's files: the module ``call:`` names, found as the task's worker finds it (the spec's
    directory first, then ``sys.path``); the packages that contain it; and, transitively, every module
    that one of these imports (``import``/``from ... import`` anywhere in the file, relative imports
    included) when it is found under the spec's directory. Installed libraries are left out: they change
    by upgrades, not edits, and hashing them would read thousands of files.
    """

    def __init__(self, base_dir: str, search_path: Iterable[str] | None = None) -> None:
        self._base = os.path.abspath(base_dir)
        others = [os.path.abspath(p) for p in (sys.path if search_path is None else search_path) if p]
        self._roots = [self._base, *[p for p in others if p != self._base]]
        self._files: dict[str, tuple[CodeFile, tuple[str, ...]] | None] = {}  # path -> file, its imports
        self._python: dict[str, tuple[CodeFile, ...]] = {}  # module name -> its files

    def python(self, call: str | None) -> tuple[CodeFile, ...]:
        module = (call or "").partition(":")[0]
        done = self._python.get(module)
        if done is None:
            done = self._python[module] = self._closure(module) if module else ()
        return done

    def scripts(self, paths: Iterable[str], command: str) -> tuple[CodeFile, ...]:
        """The files among ``paths`` (a shell task's external inputs) that ``command`` runs as scripts."""
        out = []
        for path in paths:
            rel = os.path.relpath(path, self._base)
            if rel not in command and os.path.basename(path) not in command:
                continue
            entry = self._file(path, parse=False)
            if entry is not None and _is_script(path):
                out.append(entry[0])
        return tuple(sorted(out, key=lambda f: f.name))

    def _closure(self, module: str) -> tuple[CodeFile, ...]:
        found: dict[str, CodeFile] = {}
        first = self._find(module, self._roots)
        if first is None:
            return ()
        todo = [*self._parents(module, first), (module, first)]
        seen = {path for _, path in todo}
        while todo:
            name, path = todo.pop()
            entry = self._file(path, parse=path.startswith(self._base + os.sep))
            if entry is None:
                continue
            found[path] = entry[0]
            for imported in _resolve(name, path, entry[1]):
                where = self._find(imported, [self._base])
                if where is not None and where not in seen:
                    for item in [*self._parents(imported, where), (imported, where)]:
                        if item[1] not in seen:
                            seen.add(item[1])
                            todo.append(item)
        return tuple(sorted(found.values(), key=lambda f: f.name))

    def _parents(self, module: str, path: str) -> list[tuple[str, str]]:
        """The ``__init__.py`` of each package above ``module`` (run when it is imported), under its root."""
        parts = module.split(".")
        depth = len(parts) - 1 + (os.path.basename(path) == "__init__.py")
        root = path
        for _ in range(depth + 1):
            root = os.path.dirname(root)
        out = []
        for i in range(1, len(parts)):
            init = os.path.join(root, *parts[:i], "__init__.py")
            if os.path.isfile(init):
                out.append((".".join(parts[:i]), init))
        return out

    @staticmethod
    def _find(module: str, roots: list[str]) -> str | None:
        parts = module.split(".")
        for root in roots:
            package = os.path.join(root, *parts, "__init__.py")
            if os.path.isfile(package):
                return package
            plain = os.path.join(root, *parts) + ".py"
            if os.path.isfile(plain):
                return plain
        return None

    def _file(self, path: str, parse: bool) -> tuple[CodeFile, tuple[str, ...]] | None:
        if path in self._files:
            return self._files[path]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            mtime = os.stat(path).st_mtime
        except OSError:
            self._files[path] = None
            return None
        imports: tuple[str, ...] = ()
        if parse:
            try:
                imports = _imports(ast.parse(data, path))
            except (SyntaxError, ValueError):  # the worker reports it; the bytes are still hashed
                pass
        entry = (CodeFile(self._name(path), hashlib.sha256(data).hexdigest(), mtime), imports)
        self._files[path] = entry
        return entry

    def _name(self, path: str) -> str:
        if path.startswith(self._base + os.sep):
            return os.path.relpath(path, self._base)
        for root in self._roots:
            if path.startswith(root + os.sep):
                return os.path.relpath(path, root)
        return path


def _imports(tree: ast.AST) -> tuple[str, ...]:
    """Each import as ``level:module:names`` (resolved against the importing module by ``_resolve``)."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(f"0:{a.name}:" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append(f"{node.level}:{node.module or ''}:{','.join(a.name for a in node.names)}")
    return tuple(out)


def _resolve(module: str, path: str, imports: tuple[str, ...]) -> list[str]:
    """Absolute names of the modules ``imports`` may load (a ``from`` name may be a submodule)."""
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    out = []
    for item in imports:
        level_text, name, names = item.split(":")
        level = int(level_text)
        if level:
            anchor = package.split(".") if package else []
            if level - 1 > len(anchor):
                continue
            anchor = anchor[:len(anchor) - (level - 1)]
            name = ".".join([*anchor, name] if name else anchor)
        if not name:
            continue
        out.append(name)
        out.extend(f"{name}.{n}" for n in names.split(",") if n and n != "*")
    return out


def _is_script(path: str) -> bool:
    if path.lower().endswith(_SCRIPT_SUFFIXES) or os.access(path, os.X_OK):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return False


class Fingerprints(Mapping[str, Fingerprint]):
    """Every task's fingerprint, computed when asked for (with those of its dependencies).

    A fresh run asks for most of them once, when the task succeeds, which then overlaps the run instead of
    delaying its first launch. The external inputs and the code files are looked at up front, so a
    fingerprint describes the files as they were when the run started. What a dependent needs of a task
    (its ``base``, ``code`` and ``code_mtime``) is kept for the tasks that have dependents only: the
    others' fingerprints are made again when asked for again, so a 10^6-task sweep keeps no object per task.
    """

    def __init__(self, tasks: Mapping[str, TaskSpec] | Sequence[TaskSpec], deps: Mapping[str, tuple[str, ...]] | Dag,
                 inputs: dict[str, str], code: Callable[[str], tuple[CodeFile, ...]] | Mapping[str, tuple[CodeFile, ...]]
                 | None = None) -> None:
        if isinstance(tasks, Mapping):
            self._ids: Sequence[str] | Mapping[str, TaskSpec] = tasks
            listed = list(tasks.values())
            index = {tid: i for i, tid in enumerate(tasks)}
            self._position: Callable[[str], int] = index.__getitem__
            self._spec = SpecDigests(listed)
        else:
            self._ids = _Ids(tasks)
            self._position = _position(tasks)
            self._spec = SpecDigests(tasks)
        self._count = len(tasks)
        self._deps: Callable[[str], tuple[str, ...]] = deps.dependencies if isinstance(deps, Dag) else (
            lambda tid: deps.get(tid, ()))
        self._has_dependents = _has_dependents(deps)
        self._inputs = inputs
        self._code = code if callable(code) else (code or {}).get
        self._own: dict[int, tuple[str, float, dict[str, str]]] = {}  # by id of a files tuple (tasks share them)
        self._kept: dict[str, _Up] = {}  # of the tasks with dependents

    def __getitem__(self, tid: str) -> Fingerprint:
        try:
            position = self._position(tid)
        except KeyError:
            raise KeyError(tid) from None
        deps = self._deps(tid)
        if deps:
            self._keep(deps)
        return self._make(tid, position, deps)

    def _keep(self, roots: tuple[str, ...]) -> None:
        """Keep what dependents need of ``roots`` and of everything upstream of them not kept yet."""
        kept = self._kept
        stack = [(t, False) for t in roots if t not in kept]  # iterative post-order: a long chain is no recursion
        while stack:
            t, ready = stack.pop()
            if t in kept:
                continue
            deps = self._deps(t)
            if not ready:
                stack.append((t, True))
                stack.extend((d, False) for d in deps if d not in kept)
                continue
            self._make(t, self._position(t), deps)  # kept: it has a dependent

    def _make(self, t: str, position: int, deps: tuple[str, ...]) -> Fingerprint:
        files = self._code(t) or ()
        own = self._own.get(id(files))
        if own is None:
            own = self._own[id(files)] = (digest([[f.name, f.sha] for f in files]),
                                          max([0.0, *(f.mtime for f in files)]), {f.name: f.sha[:16] for f in files})
        code, mtime, hashes = own
        ups = [self._kept[d] for d in deps]
        if ups:
            code = digest([code, [[d, f.code] for d, f in zip(deps, ups)]])
            mtime = max(mtime, *(f.code_mtime for f in ups))
        made = Fingerprint(
            spec=self._spec(position),
            deps=digest([[d, f.base] for d, f in zip(deps, ups)]) if deps else _NO_DEPS,
            inputs=self._inputs.get(t, ""),
            code=code, files=files, code_mtime=mtime, hashes=hashes,
        )
        if self._has_dependents(t):
            self._kept[t] = _Up.of(made)
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True, slots=True)
class _Up:
    """What a dependent's fingerprint needs of a task's."""

    base: str
    code: str
    code_mtime: float

    @classmethod
    def of(cls, fp: Fingerprint) -> _Up:
        return cls(fp.base, fp.code, fp.code_mtime)


class _Ids(Sequence[str]):
    """The ids of a sequence of tasks, without making the tasks."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self._tasks = tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, i: Any) -> Any:
        return self._tasks[i].id

    def __iter__(self) -> Iterator[str]:
        return iter(task_ids(self._tasks))


def _position(tasks: Sequence[TaskSpec]) -> Callable[[str], int]:
    if isinstance(tasks, Tasks):
        return tasks.position
    index = {t.id: i for i, t in enumerate(tasks)}
    return index.__getitem__


def _has_dependents(deps: Mapping[str, tuple[str, ...]] | Dag) -> Callable[[str], bool]:
    if isinstance(deps, Dag):
        return lambda tid: bool(deps.dependents(tid))
    return set(chain.from_iterable(deps.values())).__contains__


_NO_DEPS = digest([])


def fingerprints(tasks: Mapping[str, TaskSpec] | Sequence[TaskSpec], deps: Mapping[str, tuple[str, ...]] | Dag,
                 external: dict[str, list[str]], base_dir: str, code: CodeFiles | None = None) -> Fingerprints:
    """Fingerprints of all tasks (``external``: the input patterns of each task that no task writes).

    ``tasks``: by id, or the job's ``spec.tasks`` (then no task is made to fingerprint a matrix entry's);
    ``deps``: each task's dependencies, by id, or the job's ``Dag``. ``code`` finds each task's source files
    (default: a ``CodeFiles`` over ``base_dir``); python tasks sharing a module share one reading of it,
    and tasks with the same external inputs one look at them."""
    code = code or CodeFiles(base_dir)
    lookup = tasks.get if isinstance(tasks, Mapping) else _lookup(tasks)
    inputs: dict[str, str] = {}
    scripts: dict[str, tuple[CodeFile, ...]] = {}
    seen: dict[tuple[str, ...], tuple[list[str], str]] = {}
    for tid, patterns in external.items():
        if patterns:
            key = tuple(patterns)
            if key not in seen:
                paths = _matches(patterns, base_dir)
                seen[key] = (paths, _stat_digest(paths, base_dir))
            paths, inputs[tid] = seen[key]
            task = lookup(tid)
            if task is not None and task.kind == "shell" and task.run:
                scripts[tid] = code.scripts(paths, task.run)
    python = _python_code(tasks, code)
    return Fingerprints(tasks, deps, inputs, lambda tid: scripts.get(tid) or python(tid))


def _lookup(tasks: Sequence[TaskSpec]) -> Callable[[str], TaskSpec | None]:
    position = _position(tasks)

    def find(tid: str) -> TaskSpec | None:
        try:
            return tasks[position(tid)]
        except KeyError:
            return None

    return find


def _python_code(tasks: Mapping[str, TaskSpec] | Sequence[TaskSpec], code: CodeFiles) -> Callable[[str], tuple[CodeFile, ...]]:
    """Each python task's files: looked up per entry for the tasks of a ``Tasks`` (its ``call`` is the same)."""
    if isinstance(tasks, Tasks):
        files = {e.start: code.python(e.template.call) for e in tasks.entries
                 if e.template is not None and e.template.kind == "python"}
        return lambda tid: files.get(tasks.entry_at(tasks.position(tid)).start, ())
    found = {tid: code.python(t.call) for tid, t in (tasks.items() if isinstance(tasks, Mapping)
                                                      else ((t.id, t) for t in tasks)) if t.kind == "python"}
    return lambda tid: found.get(tid, ())
