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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cmbagent_batch.plan.analysis.cache import digest
from cmbagent_batch.spec.model import TaskSpec, thaw

# Fields that do not change what a task produces (timeouts, retries, resources, estimates) are left out,
# so tuning them does not rerun finished work.
_FIELDS = ("kind", "run", "call", "args", "env", "inputs", "outputs", "agent", "instructions", "model",
           "max_turns", "code_execution", "matrix")

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
        return digest([self.spec, self.deps, self.inputs, self.code])

    @functools.cached_property
    def base(self) -> str:
        """What a dependent's ``deps`` part hashes (the fingerprint without code, as journals have it)."""
        return digest([self.spec, self.deps, self.inputs])

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"fp": self.value, "spec_fp": self.spec, "deps_fp": self.deps,
                                  "inputs_fp": self.inputs, "code_fp": self.code}
        if self.hashes:
            out["code_files"] = self.hashes
        return out


def spec_digest(task: TaskSpec) -> str:
    fields = {name: thaw(getattr(task, name)) for name in _FIELDS}
    if task.kind == "agent":
        fields["description"] = task.description
    return digest(fields)


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
    """Every task's fingerprint, each computed when first asked for (with those of its dependencies).

    A fresh run asks for most of them once, when the task succeeds: 20,000 of them cost 0.2 s, which
    then overlaps the run instead of delaying its first launch. The external inputs and the code files
    are looked at up front, so a fingerprint describes the files as they were when the run started.
    """

    def __init__(self, tasks: dict[str, TaskSpec], deps: dict[str, tuple[str, ...]], inputs: dict[str, str],
                 code: Mapping[str, tuple[CodeFile, ...]] | None = None) -> None:
        self._tasks = tasks
        self._deps = deps
        self._inputs = inputs
        self._code = code or {}
        self._own: dict[int, tuple[str, float, dict[str, str]]] = {}  # by id of a files tuple (tasks share them)
        self._done: dict[str, Fingerprint] = {}

    def __getitem__(self, tid: str) -> Fingerprint:
        done = self._done.get(tid)
        if done is not None:
            return done
        if tid not in self._tasks:
            raise KeyError(tid)
        stack = [(tid, False)]  # iterative post-order: a chain of 10^5 tasks is no recursion
        while stack:
            t, ready = stack.pop()
            if t in self._done:
                continue
            deps = self._deps.get(t, ())
            if not ready:
                stack.append((t, True))
                stack.extend((d, False) for d in deps if d not in self._done)
                continue
            self._done[t] = self._make(t, deps)
        return self._done[tid]

    def _make(self, t: str, deps: tuple[str, ...]) -> Fingerprint:
        files = self._code.get(t, ())
        own = self._own.get(id(files))
        if own is None:
            own = self._own[id(files)] = (digest([[f.name, f.sha] for f in files]),
                                          max([0.0, *(f.mtime for f in files)]), {f.name: f.sha[:16] for f in files})
        code, mtime, hashes = own
        ups = [self._done[d] for d in deps]
        if ups:
            code = digest([code, [[d, f.code] for d, f in zip(deps, ups)]])
            mtime = max(mtime, *(f.code_mtime for f in ups))
        return Fingerprint(
            spec=spec_digest(self._tasks[t]),
            deps=digest([[d, f.base] for d, f in zip(deps, ups)]) if deps else _NO_DEPS,
            inputs=self._inputs.get(t, ""),
            code=code, files=files, code_mtime=mtime, hashes=hashes,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


_NO_DEPS = digest([])


@dataclass
class _Scan:
    inputs: dict[str, str] = field(default_factory=dict)
    code: dict[str, tuple[CodeFile, ...]] = field(default_factory=dict)


def fingerprints(tasks: dict[str, TaskSpec], deps: dict[str, tuple[str, ...]], external: dict[str, list[str]],
                 base_dir: str, code: CodeFiles | None = None) -> Fingerprints:
    """Fingerprints of all tasks (``external``: the input patterns of each task that no task writes).

    ``code`` finds each task's source files (default: a ``CodeFiles`` over ``base_dir``); python tasks
    sharing a module share one reading of it."""
    code = code or CodeFiles(base_dir)
    scan = _Scan()
    for tid, patterns in external.items():
        if patterns:
            paths = _matches(patterns, base_dir)
            scan.inputs[tid] = _stat_digest(paths, base_dir)
            task = tasks.get(tid)
            if task is not None and task.kind == "shell" and task.run:
                scan.code[tid] = code.scripts(paths, task.run)
    for tid, task in tasks.items():
        if task.kind == "python":
            scan.code[tid] = code.python(task.call)
    return Fingerprints(tasks, deps, scan.inputs, scan.code)
