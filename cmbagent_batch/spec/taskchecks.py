"""The checks of a job's tasks that need them all: ids (unique, well formed), ``depends_on`` (resolved to
ids, globs expanded), paths, outputs that make an input ambiguous, and cycles.

They read the entries of ``spec/tasks.py``: what the tasks of an entry share is checked once, what varies,
task by task, so a 10^6-task matrix costs one pass over its ids. Each problem is a ``Finding`` whose path
points into the file as written; the loader locates it.
"""

from __future__ import annotations

import bisect
import fnmatch
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

from cmbagent_batch.spec.checks import (
    GLOB_CHARS,
    KIND_FIELDS,
    KIND_REQUIRES,
    TASK_ID,
    Finding,
    find_cycle,
    hint,
    path_problem,
)
from cmbagent_batch.spec.tasks import Entry


def check_tasks(entries: Sequence[Entry]) -> tuple[list[Finding], dict[str, int], dict[int, tuple[str, ...]]]:
    """Ids, kinds, dependencies, paths and cycles of the tasks of ``entries``.

    Returns the findings, the position of each task by id (the first one made, for a repeated id) and, per
    position, its resolved ``depends_on`` (globs expanded) when it has some. What every task of an entry
    shares is checked once; what varies, task by task.
    """
    findings: list[Finding] = []
    by_id: dict[str, int] = {}
    places = _Places(entries)
    for e in entries:
        findings.extend(_check_entry(e))
        findings.extend(_add_ids(e, by_id, places))
    deps = _Deps(by_id, findings)
    for e in entries:
        deps.resolve(e)
    findings.extend(_check_outputs(entries, by_id))
    findings.extend(_check_cycle(places, by_id, deps.found))
    return findings, by_id, deps.found


class _Places:
    """The entry and the index in it of a task, by position."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = entries
        self.starts = [e.start for e in entries]

    def __call__(self, pos: int) -> tuple[Entry, int]:
        e = self.entries[bisect.bisect_right(self.starts, pos) - 1]
        return e, pos - e.start


def _first(e: Entry, by_id: dict[str, int]) -> Iterator[tuple[int, str]]:
    """(index, id) of each task of ``e`` that is the one its id names (a repeated id names the first)."""
    if not isinstance(e.body.get("id"), str):
        return
    for k, tid in enumerate(e.ids):
        if by_id.get(tid) == e.start + k:
            yield k, tid


def _add_ids(e: Entry, by_id: dict[str, int], places: _Places) -> list[Finding]:
    if not isinstance(e.body.get("id"), str):
        return []
    ids = e.ids
    if e.grid is None:  # a listed task: one id
        if ids[0] not in by_id and TASK_ID.fullmatch(ids[0]):
            by_id[ids[0]] = e.start
            return []
    elif all(map(TASK_ID.fullmatch, ids)):
        new = dict(zip(ids, range(e.start, e.start + len(ids))))
        if len(new) == len(ids) and by_id.keys().isdisjoint(new):
            by_id.update(new)
            return []
    out = []
    for k, tid in enumerate(ids):
        if not TASK_ID.fullmatch(tid):
            continue
        if tid in by_id:
            first, j = places(by_id[tid])
            out.append(Finding(("tasks", e.index, "id"),
                               f"duplicate task id {tid!r}{e.note(k)}: also made by {first.origin(j)}"))
            continue
        by_id[tid] = e.start + k
    return out


_PATH_FIELDS = ("inputs", "late_inputs", "outputs")
# The fields of the other kinds than each kind, with the kind they are for.
_FOREIGN: dict[Any, tuple[tuple[str, str], ...]] = {
    kind: tuple((name, other) for other, fields in KIND_FIELDS.items() if other != kind for name in fields)
    for kind in KIND_FIELDS
}


def _check_entry(e: Entry) -> list[Finding]:
    out: list[Finding] = []
    data = e.body
    tid = data.get("id")
    # The schema checks plain ids; placeholders are checked once they are filled in.
    if isinstance(tid, str) and (e.grid is not None or "{" in tid) and not all(map(TASK_ID.fullmatch, e.ids)):
        for k, filled in enumerate(e.ids):
            if TASK_ID.fullmatch(filled):
                continue
            if "{" in filled:
                out.append(Finding(("tasks", e.index, "id"), f"id {filled!r} has a placeholder that is not a matrix parameter"))
            else:
                out.append(Finding(("tasks", e.index, "id"),
                                   f"task id {filled!r}{e.note(k)} may only use letters, digits, '_', '.', '-'"))
    kind = data.get("kind")
    if kind in KIND_REQUIRES and KIND_REQUIRES[kind] not in data:
        article = "an" if kind == "agent" else "a"
        out.append(Finding(("tasks", e.index), f"{article} {kind} task needs {KIND_REQUIRES[kind]!r}"))
    for name, other in _FOREIGN.get(kind, ()):
        if name in data:
            out.append(Finding(("tasks", e.index, name), f"{name!r} is for {other} tasks; this is a {kind} task", key=True))
    if "resources" in data:
        out.extend(_shape_findings(e.index, data["resources"]))
    if not e.fills and data.keys().isdisjoint(_PATH_FIELDS):
        return out
    for field in _PATH_FIELDS:
        if field in e.fills:
            for k in range(len(e)):
                out.extend(_path_findings(e, field, e.field(field, k), k))
        elif any(isinstance(p, str) and path_problem(p) for p in data.get(field) or []):
            for k in range(len(e)):
                out.extend(_path_findings(e, field, data.get(field), k))
    return out


def _shape_findings(index: int, res: Any) -> list[Finding]:
    """A shape that contradicts itself (the schema has checked each number)."""
    if not isinstance(res, dict):
        return []
    at = ("tasks", index, "resources")
    if "cpus" in res and "cpus_per_rank" in res:
        return [Finding((*at, "cpus"), "give 'cpus' (the CPUs of a one-rank task) or 'cpus_per_rank', not both",
                        key=True)]
    ranks, nodes = res.get("ranks", 1), res.get("nodes", 1)
    if "cpus" in res and ranks != 1:
        return [Finding((*at, "cpus"), f"'cpus' is the CPUs of a one-rank task; with {ranks} ranks give "
                        "'cpus_per_rank'", key=True)]
    if isinstance(ranks, int) and isinstance(nodes, int) and nodes > 0 and ranks % nodes:
        return [Finding((*at, "ranks"), f"{ranks} ranks cannot be spread evenly over {nodes} nodes: give a "
                        f"multiple of {nodes}")]
    return []


def _path_findings(e: Entry, field: str, paths: Any, k: int) -> list[Finding]:
    return [Finding(("tasks", e.index, field, j), why) for j, p in enumerate(paths or [])
            if isinstance(p, str) and (why := path_problem(p, e.note(k)))]


class _Deps:
    """Each task's ``depends_on`` resolved to ids (globs expanded once per pattern), with its problems."""

    def __init__(self, by_id: dict[str, int], findings: list[Finding]) -> None:
        self.by_id = by_id
        self.findings = findings
        self.found: dict[int, tuple[str, ...]] = {}
        self._globs: dict[str, list[str]] = {}
        self._sorted: list[str] | None = None
        self._hints: dict[str, str] = {}

    def resolve(self, e: Entry) -> None:
        if "depends_on" in e.fills:
            for k, tid in _first(e, self.by_id):
                self._one(e, k, tid, e.field("depends_on", k))
            return
        written = e.body.get("depends_on") or []
        if not written:
            return
        # Literal ids of other entries' tasks: every task of this entry depends on the same ones.
        plain = all(isinstance(d, str) and not GLOB_CHARS.search(d) and d in self.by_id
                    and not e.start <= self.by_id[d] < e.start + len(e) for d in written)
        shared: tuple[str, ...] | None = None
        for k, tid in _first(e, self.by_id):
            if shared is None or not plain:
                shared = self._one(e, k, tid, written)
            elif shared:
                self.found[e.start + k] = shared

    def _one(self, e: Entry, k: int, tid: str, written: Any) -> tuple[str, ...]:
        resolved: set[str] = set()
        for j, dep in enumerate(written or []):
            if not isinstance(dep, str):
                continue
            where = ("tasks", e.index, "depends_on", j)
            if GLOB_CHARS.search(dep):
                matched = [i for i in self._glob(dep) if i != tid]
                if not matched:
                    itself = f" other than {tid!r} itself" if fnmatch.fnmatchcase(str(tid), dep) else ""
                    self.findings.append(Finding(where, f"{dep!r}{e.note(k)} matches no task{itself}"))
                resolved.update(matched)
            elif dep == tid:
                self.findings.append(Finding(where, f"task {tid!r} depends on itself"))
            elif dep not in self.by_id:
                if dep not in self._hints:
                    self._hints[dep] = hint(dep, self.by_id)
                self.findings.append(Finding(where, f"unknown task {dep!r}{e.note(k)}{self._hints[dep]}"))
            else:
                resolved.add(dep)
        out = tuple(sorted(resolved))
        if out:
            self.found[e.start + k] = out
        return out

    def _glob(self, pattern: str) -> list[str]:
        if pattern not in self._globs:
            if self._sorted is None:
                self._sorted = sorted(self.by_id)
            self._globs[pattern] = fnmatch.filter(self._sorted, pattern)
        return self._globs[pattern]


def _check_outputs(entries: Sequence[Entry], by_id: dict[str, int]) -> list[Finding]:
    """An input that two tasks write is ambiguous (which one should it be linked from?).

    Tasks writing the same relative path is fine otherwise: each task publishes its outputs under
    ``outputs/TASK/``, so a sweep whose tasks all write ``out.txt`` collides nowhere.
    """
    owners: dict[str, list[str]] = {}
    for e in entries:
        if "outputs" in e.fills:
            for k, tid in _first(e, by_id):
                for path in _written(e.field("outputs", k)):
                    owners.setdefault(path, []).append(tid)
        elif paths := _written(e.body.get("outputs")):
            ids = [tid for _, tid in _first(e, by_id)]
            for path in paths:
                owners.setdefault(path, []).extend(ids)
    shared = {path: ids for path, ids in owners.items() if len(ids) > 1}
    if not shared:
        return []
    shared_paths = sorted(shared)
    sets = {path: set(ids) for path, ids in shared.items()}
    out: list[Finding] = []
    for e in entries:
        for k, tid in _first(e, by_id):
            for j, p in enumerate(e.field("inputs", k) or []):
                if not isinstance(p, str) or path_problem(p):
                    continue
                norm = posixpath.normpath(p)
                hits = fnmatch.filter(shared_paths, norm) if GLOB_CHARS.search(norm) else [norm] if norm in shared else []
                for path in hits:
                    count = len(shared[path]) - (tid in sets[path])
                    if count > 1:
                        writers = [w for w in shared[path][:6] if w != tid][:5]
                        names = ", ".join(repr(w) for w in writers) + (f" and {count - 5} more" if count > 5 else "")
                        out.append(Finding(("tasks", e.index, "inputs", j),
                                           f"input {p!r}{e.note(k)} is ambiguous: {path!r} is written by {names}"))
                        break
    return out


def _written(outputs: Any) -> list[str]:
    """The literal paths among a task's outputs, normalised, each once."""
    return list(dict.fromkeys(posixpath.normpath(p) for p in outputs or []
                              if isinstance(p, str) and not path_problem(p) and not GLOB_CHARS.search(p)))


def _check_cycle(places: _Places, by_id: dict[str, int], deps: dict[int, tuple[str, ...]]) -> list[Finding]:
    graph: dict[str, tuple[str, ...]] = {}
    for pos, ds in deps.items():
        e, k = places(pos)
        graph[e.ids[k]] = ds
    for ds in list(graph.values()):
        for d in ds:
            graph.setdefault(d, ())
    cycle = find_cycle(graph)
    if cycle is None:
        return []
    e, k = places(by_id[cycle[0]])
    j = next(
        (j for j, d in enumerate(e.field("depends_on", k) or [])
         if isinstance(d, str) and (d == cycle[1] or fnmatch.fnmatchcase(cycle[1], d))),
        None,
    )
    where: tuple[Any, ...] = ("tasks", e.index, "depends_on", j) if j is not None else ("tasks", e.index)
    return [Finding(where, f"dependency cycle: {' -> '.join(cycle)} ('->' reads 'depends on')")]
