"""File-inferred edges: a task whose ``inputs`` match another task's ``outputs`` depends on it.

Paths and globs are compared as written (normalised), both ways: an input glob matches output
paths, and an output glob matches input paths. Literal paths are looked up in a dict, so a job of
10^5 tasks with literal paths costs one pass; only globs are matched against every other side.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Sequence

from cmbagent_batch.plan.dag import Edge
from cmbagent_batch.spec.model import TaskSpec

_GLOB = re.compile(r"[*?\[]")
Sources = dict[str, list[tuple[str, list[tuple[str, str]]]]]
"""For every task id, each declared input with the (producer id, produced path) pairs it matches."""


def input_sources(tasks: Sequence[TaskSpec]) -> Sources:
    """For every task, each declared input with the (producer id, produced path) pairs it matches.

    An input matched by no other task's outputs gets an empty list: it must come from outside the job.
    A glob is matched once however many tasks read it (a sweep whose tasks all read ``data/*.fits``).
    """
    literal_out: dict[str, str] = {}  # output path -> producer id
    glob_out: list[tuple[str, str]] = []  # (output glob, producer id)
    for task in tasks:
        for path in task.outputs:
            norm = posixpath.normpath(path)
            if _GLOB.search(norm):
                glob_out.append((norm, task.id))
            else:
                literal_out.setdefault(norm, task.id)
    literal_paths = sorted(literal_out)
    globbed: dict[str, list[tuple[str, str]]] = {}
    out: Sources = {}
    for task in tasks:
        entries = []
        for path in task.inputs:
            norm = posixpath.normpath(path)
            if _GLOB.search(norm):
                if norm not in globbed:
                    globbed[norm] = [(literal_out[p], p) for p in fnmatch.filter(literal_paths, norm)] + [
                        (pid, g) for g, pid in glob_out if g == norm]
                matches = globbed[norm]
            else:
                matches = [(literal_out[norm], norm)] if norm in literal_out else []
                matches += [(pid, norm) for g, pid in glob_out if fnmatch.fnmatchcase(norm, g)]
            entries.append((path, [(pid, p) for pid, p in matches if pid != task.id]))
        if entries:
            out[task.id] = entries
    return out


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
