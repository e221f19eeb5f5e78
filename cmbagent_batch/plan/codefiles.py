"""The source files behind tasks (``CodeFiles``): the ``code`` part of their fingerprints hashes them."""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

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
