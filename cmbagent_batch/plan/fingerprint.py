"""Task fingerprints for resume: a task whose fingerprint is unchanged since it succeeded is skipped.

A fingerprint hashes four parts, kept apart so ``status --explain`` can say which one changed:
``spec`` (the fields that change what the task does), ``deps`` (the spec, deps and inputs parts of the
tasks it depends on, so editing one task reruns it and everything downstream), ``inputs`` (size and
modification time of declared inputs that come from outside the job) and ``code`` (the bytes of the
source files behind the task, see ``CodeFiles``, chained through its dependencies the way ``deps`` is).
``code`` is kept out of ``deps`` so that a journal written before code was fingerprinted still matches.

A success record keeps the full value and each part shortened to ``SHORT`` hex digits (``parts``): enough
to say which part changed. The hashes of the task's own files are kept once per set of files
(``code_sets``), in the journals' index, under the digest of that set (``Fingerprint.own``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from cmbagent_batch.plan.analysis.cache import digest
from cmbagent_batch.plan.codefiles import CodeFile, CodeFiles
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.plan.specdigest import SpecDigests
from cmbagent_batch.spec.model import TaskSpec
from cmbagent_batch.spec.tasks import Entry, Tasks, task_ids

__all__ = ["CodeFile", "CodeFiles", "Fingerprint", "Fingerprints", "external_inputs_digest", "fingerprints"]


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
    own: str = ""  # the digest of the own files (``files``): the key of ``hashes`` among the code sets

    @functools.cached_property
    def value(self) -> str:
        return _digest_hex(self.spec, self.deps, self.inputs, self.code)

    @functools.cached_property
    def base(self) -> str:
        """What a dependent's ``deps`` part hashes (the fingerprint without code, as journals have it)."""
        return _digest_hex(self.spec, self.deps, self.inputs)

    def to_dict(self) -> dict[str, str]:
        """What a success record journals: the value, and ``parts``: ``SPEC.DEPS.INPUTS.CODE[.FILES]``, each
        part's first ``SHORT`` hex digits (INPUTS is empty when the task has no input from outside the job);
        FILES, the key of the own files in the code sets, is left out when it is CODE's (no dependency)."""
        spec, deps, inputs, code, own = (x[:SHORT] for x in (self.spec, self.deps, self.inputs, self.code, self.own))
        return {"fp": self.value, "parts": f"{spec}.{deps}.{inputs}.{code}" + ("" if own == code else f".{own}")}


SHORT = 12  # hex digits a record keeps of each part: a change goes unseen once in 2^48


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
                 | None = None, entry_code: Callable[[Entry], tuple[CodeFile, ...] | None] | None = None) -> None:
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
        self._tasks = tasks
        self._count = len(tasks)
        self._linked = _linked(deps)
        self._deps: Callable[[str], tuple[str, ...]] = deps.dependencies if isinstance(deps, Dag) else (
            lambda tid: deps.get(tid, ()))
        self._has_dependents = _has_dependents(deps)
        self._inputs = inputs
        self._code = code if callable(code) else (code or {}).get
        self._entry_code = entry_code  # the files all tasks of an entry share (None: they may differ)
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

    def record(self, tid: str) -> dict[str, str]:
        """``self[tid].to_dict()``, made without a ``Fingerprint`` for a task with neither a dependency nor
        a dependent (most of a large sweep's): what a success record journals."""
        if tid in self._linked:
            return self[tid].to_dict()
        code = self._own_code(self._code(tid) or ())[0]
        spec, inputs = self._spec(self._position(tid)), self._inputs.get(tid, "")
        return {"fp": _digest_hex(spec, _NO_DEPS, inputs, code),
                "parts": f"{spec[:SHORT]}.{_NO_DEPS[:SHORT]}.{inputs[:SHORT]}.{code[:SHORT]}"}

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

    def _own_code(self, files: tuple[CodeFile, ...]) -> tuple[str, float, dict[str, str]]:
        """The digest of a task's own files, their newest modification time and each one's short hash."""
        own = self._own.get(id(files))
        if own is None:
            own = self._own[id(files)] = (digest([[f.name, f.sha] for f in files]),
                                          max([0.0, *(f.mtime for f in files)]), {f.name: f.sha[:16] for f in files})
        return own

    def _make(self, t: str, position: int, deps: tuple[str, ...]) -> Fingerprint:
        files = self._code(t) or ()
        code, mtime, hashes = self._own_code(files)
        own = code
        ups = [self._kept[d] for d in deps]
        if ups:
            code = digest([code, [[d, f.code] for d, f in zip(deps, ups)]])
            mtime = max(mtime, *(f.code_mtime for f in ups))
        made = Fingerprint(
            spec=self._spec(position),
            deps=digest([[d, f.base] for d, f in zip(deps, ups)]) if deps else _NO_DEPS,
            inputs=self._inputs.get(t, ""),
            code=code, files=files, code_mtime=mtime, hashes=hashes, own=own,
        )
        if self._has_dependents(t):
            self._kept[t] = _Up.of(made)
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return self._count

    def digests(self) -> Iterator[tuple[str, bytes]]:
        """Every task's id and value (the bytes ``Fingerprint.value`` spells in hex), in order. A task of a
        matrix entry that has neither a dependency nor a dependent costs two hashes and no object."""
        entries = self._entries()
        if entries is None:
            yield from ((tid, bytes.fromhex(self[tid].value)) for tid in self)
            return
        for entry in entries:
            yield from self._entry_digests(entry)

    def _entry_digests(self, entry: Entry) -> Iterator[tuple[str, bytes]]:
        assert self._entry_code is not None
        shared, linked, inputs_of, sha256 = self._entry_code(entry), self._linked, self._inputs.get, hashlib.sha256
        specs = self._spec.of_entry(entry)
        if shared is not None and linked.isdisjoint(entry.ids) and self._inputs.keys().isdisjoint(entry.ids):
            rest = f'","{_NO_DEPS}","","{self._own_code(shared)[0]}"]'.encode()  # the same for all its tasks
            yield from zip(entry.ids, (sha256(b'["' + spec + rest).digest() for spec in specs))
            return
        last: tuple[str, int] | None = None
        rest = b""
        for tid, spec in zip(entry.ids, specs):
            if tid in linked:
                yield tid, bytes.fromhex(self[tid].value)
                continue
            files = shared if shared is not None else (self._code(tid) or ())
            key = (inputs_of(tid, ""), id(files))
            if key != last:  # the parts after ``spec``, as ``_digest_hex`` joins them
                last = key
                rest = f'","{_NO_DEPS}","{key[0]}","{self._own_code(files)[0]}"]'.encode()
            yield tid, sha256(b'["' + spec + rest).digest()

    def code_sets(self) -> dict[str, dict[str, str]]:
        """Each distinct set of own files among the tasks: its digest (``Fingerprint.own``) and each file's
        short hash (``Fingerprint.hashes``)."""
        found = {}
        for files in self._file_sets():
            own, _, hashes = self._own_code(files)
            found[own] = hashes
        return found

    def _file_sets(self) -> Iterator[tuple[CodeFile, ...]]:
        """Each task's own files; once per entry when its tasks share them."""
        entries = self._entries()
        if entries is None:
            yield from (self._code(tid) or () for tid in self)
            return
        for e in entries:
            shared = self._entry_code(e) if self._entry_code is not None else None
            yield from (shared,) if shared is not None else (self._code(tid) or () for tid in e.ids)

    def _entries(self) -> tuple[Entry, ...] | None:
        """The entries of the job's ``Tasks``, when their tasks' files are known per entry."""
        return self._tasks.entries if isinstance(self._tasks, Tasks) and self._entry_code is not None else None


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


def _linked(deps: Mapping[str, tuple[str, ...]] | Dag) -> Set[str]:
    """The tasks that have a dependency or a dependent."""
    if isinstance(deps, Dag):
        return deps.linked()
    return {tid for tid, ds in deps.items() if ds} | set(chain.from_iterable(deps.values()))


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
    if not isinstance(tasks, Tasks):
        found = {tid: code.python(t.call) for tid, t in (tasks.items() if isinstance(tasks, Mapping)
                                                          else ((t.id, t) for t in tasks)) if t.kind == "python"}
        return Fingerprints(tasks, deps, inputs, lambda tid: scripts.get(tid) or found.get(tid, ()))
    # A python task's files are those of its entry's ``call``: looked up per entry.
    by_entry = {e.start: code.python(e.template.call) for e in tasks.entries
                if e.template is not None and e.template.kind == "python"}
    with_scripts = {tasks.entry_at(tasks.position(tid)).start for tid in scripts}

    def entry_code(entry: Entry) -> tuple[CodeFile, ...] | None:
        return None if entry.start in with_scripts else by_entry.get(entry.start, ())

    def files(tid: str) -> tuple[CodeFile, ...]:
        return scripts.get(tid) or by_entry.get(tasks.entry_at(tasks.position(tid)).start, ())

    return Fingerprints(tasks, deps, inputs, files, entry_code)


def _lookup(tasks: Sequence[TaskSpec]) -> Callable[[str], TaskSpec | None]:
    position = _position(tasks)

    def find(tid: str) -> TaskSpec | None:
        try:
            return tasks[position(tid)]
        except KeyError:
            return None

    return find
