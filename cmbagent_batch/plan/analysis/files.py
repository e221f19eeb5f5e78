"""File-inferred edges: a task whose ``inputs`` match another task's ``outputs`` depends on it.

Paths and globs are compared as written (normalised), both ways: an input glob matches output
paths, and an output glob matches input paths. Literal paths are looked up in a dict, so a job of
10^5 tasks with literal paths costs one pass; only globs are matched against every other side.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterator, Sequence

from cmbagent_batch.plan.dag import Edge
from cmbagent_batch.spec.model import TaskSpec
from cmbagent_batch.spec.tasks import Tasks, entries_of

_GLOB = re.compile(r"[*?\[]")
Sources = dict[str, list[tuple[str, list[tuple[str, str]]]]]
"""For every task id, each declared input with the (producer id, produced path) pairs it matches."""


def input_sources(tasks: Sequence[TaskSpec]) -> Sources:
    """For every task, each declared input with the (producer id, produced path) pairs it matches.

    An input matched by no other task's outputs gets an empty list: it must come from outside the job.
    A glob is matched once however many tasks read it (a sweep whose tasks all read ``data/*.fits``), and
    the inputs of a matrix entry's tasks, when they do not vary, once for the entry: its tasks then share
    one list (unless one of them writes what it reads).
    """
    literal_out: dict[str, str] = {}  # output path -> producer id
    glob_out: list[tuple[str, str]] = []  # (output glob, producer id)
    for outputs, ids in _column(tasks, "outputs"):
        norms = [posixpath.normpath(path) for path in outputs]
        for norm in norms:
            if not _GLOB.search(norm):
                literal_out.setdefault(norm, ids[0])
        if globs := [norm for norm in norms if _GLOB.search(norm)]:
            glob_out.extend((norm, tid) for tid in ids for norm in globs)
    match = _Matcher(literal_out, glob_out)
    out: Sources = {}
    for inputs, ids in _column(tasks, "inputs"):
        if not inputs:
            continue
        found = [(path, match(path)) for path in inputs]
        producers = {pid for _, matches in found for pid, _ in matches}
        if len(ids) > 1 and producers.isdisjoint(ids):
            out.update(dict.fromkeys(ids, found))
            continue
        for tid in ids:
            out[tid] = [(path, [(pid, p) for pid, p in matches if pid != tid]) for path, matches in found]
    return out


class _Matcher:
    """The (producer id, produced path) pairs one input matches."""

    def __init__(self, literal_out: dict[str, str], glob_out: list[tuple[str, str]]) -> None:
        self.literal_out = literal_out
        self.glob_out = glob_out
        self.literal_paths = sorted(literal_out)
        self.globbed: dict[str, list[tuple[str, str]]] = {}

    def __call__(self, path: str) -> list[tuple[str, str]]:
        norm = posixpath.normpath(path)
        if _GLOB.search(norm):
            if norm not in self.globbed:
                self.globbed[norm] = [(self.literal_out[p], p) for p in fnmatch.filter(self.literal_paths, norm)] + [
                    (pid, g) for g, pid in self.glob_out if g == norm]
            return self.globbed[norm]
        matches = [(self.literal_out[norm], norm)] if norm in self.literal_out else []
        return matches + [(pid, norm) for g, pid in self.glob_out if fnmatch.fnmatchcase(norm, g)]


def _column(tasks: Sequence[TaskSpec], name: str) -> Iterator[tuple[tuple[str, ...], Sequence[str]]]:
    """(a path field's value, the ids of the tasks that have it): once for an entry whose tasks share it."""
    entries = entries_of(tasks)
    if entries is None:
        yield from ((getattr(t, name), (t.id,)) for t in tasks)
        return
    assert isinstance(tasks, Tasks)
    for e in entries:
        if e.varies(name):
            yield from ((getattr(t, name), (t.id,)) for t in tasks.of(e))
        else:
            assert e.template is not None
            yield getattr(e.template, name), e.ids


def file_edges(tasks: Sequence[TaskSpec]) -> list[Edge]:
    """One edge per (producer, consumer) pair, the reason naming the first matching file."""
    found: dict[tuple[str, str], str] = {}
    for consumer, entries in input_sources(tasks).items():
        for _, matches in entries:
            for producer, produced in matches:
                found.setdefault((producer, consumer), produced)
    return [
        Edge(src, dst, "file", "files", f"{dst!r} reads {path!r}, which {src!r} writes")
        for (src, dst), path in sorted(found.items())
    ]
