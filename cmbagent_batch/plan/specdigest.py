"""The ``spec`` part of task fingerprints: a digest of the fields that change what a task does.

The digest is the sha256 of the canonical JSON of those fields (``spec_digest``), a value journaled by
every finished task: it must never change for a task whose fields did not. For the tasks of a matrix
entry (``SpecDigests``), the canonical JSON is the same text but for the members that vary between them:
the text they share is encoded once, the hash of its head (up to the first member that varies) is
copied per task, and only the members that vary are encoded per task, from the task's raw values, with
no task made. The result is the same digest, byte for byte, at a fraction of the cost.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from types import MappingProxyType
from typing import Any

from cmbagent_batch.plan.analysis.cache import canonical
from cmbagent_batch.spec.matrix import format_value
from cmbagent_batch.spec.model import EMPTY, TaskSpec, thaw
from cmbagent_batch.spec.tasks import Entry, Tasks

# Fields that do not change what a task produces (timeouts, retries, resources, estimates) are left out,
# so tuning them does not rerun finished work.
FIELDS = ("kind", "run", "call", "args", "env", "inputs", "outputs", "agent", "instructions", "model",
          "max_turns", "code_execution", "matrix")


def _fields(task: TaskSpec) -> dict[str, Any]:
    fields = {name: thaw(getattr(task, name)) for name in FIELDS}
    if task.kind == "agent":
        fields["description"] = task.description
    if task.models:  # only when given: the fingerprints of tasks that call no model stay as they were
        fields["models"] = list(task.models)
    return fields


def _as_object(value: Any) -> dict[str, Any]:
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"a task field holds {type(value).__name__}, which is not JSON")


# canonical() of the fields as the task holds them, frozen: a tuple is an array already and a read-only
# mapping becomes an object when met, so the text is canonical(_fields(task)) without thawing each field
_canonical_frozen = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=_as_object).encode


_NOTHING: dict[str, Any] = {}  # what the shared empty mapping of the fields that have none encodes as


def spec_digest(task: TaskSpec) -> str:
    fields = {name: getattr(task, name) for name in FIELDS}
    for name in ("env", "matrix"):  # most tasks have neither: no call of the encoder's default for them
        if fields[name] is EMPTY:
            fields[name] = _NOTHING
    if task.kind == "agent":
        fields["description"] = task.description
    return hashlib.sha256(_canonical_frozen(fields).encode("utf-8")).hexdigest()


# How a field that varies between the tasks of a matrix entry is made from a task's raw values (the raw
# keys it is made of, placeholders filled; None: the raw value itself), as ``spec.tasks.task_spec`` makes
# it, for the fields an entry's digests are encoded for without making its tasks. A task whose other
# fields vary (an agent's model...) is made to be digested.
_FROM_RAW: dict[str, tuple[tuple[str, ...], Callable[..., Any] | None]] = {
    "run": (("run",), None),
    "call": (("call",), None),
    "instructions": (("instructions",), None),
    "args": (("args",), None),
    "description": (("description",), lambda d: d or ""),
    "outputs": (("outputs",), lambda o: o or []),
    "inputs": (("inputs", "late_inputs"), lambda a, b: [*(a or ()), *(b or ())]),
    "env": (("env",), lambda env: {k: format_value(v) for k, v in (env or {}).items()}),
}
Encoder = Callable[[dict[str, str], dict[str, Any]], bytes]  # a member's canonical JSON from (texts, values)


def _constant(value: Any) -> Callable[[dict[str, str], dict[str, Any]], Any]:
    return lambda texts, values: value


class _EntryHead:
    """The canonical JSON of the fields of an entry's tasks: what they share encoded once, up to the first
    member that varies already hashed; the members that vary (``"matrix"``, and those of ``_FROM_RAW``)
    encoded per task."""

    __slots__ = ("encoders", "entry", "head", "pieces", "varying")

    def __init__(self, entry: Entry, template: TaskSpec, varying: set[str]) -> None:
        # canonical() of a dict is "{" + the members "KEY:VALUE" in key order, joined by "," + "}"
        fields = _fields(template)
        pieces, text = [], b"{"
        for i, key in enumerate(sorted(fields)):
            text += (b"," if i else b"") + canonical(key) + b":"
            if key in varying:
                pieces.append(text)
                text = b""
            else:
                text += canonical(fields[key])
        pieces.append(text + b"}")
        self.entry = entry
        self.head = hashlib.sha256(pieces[0])
        self.pieces = pieces[1:]  # the text after each member that varies
        self.varying = [key for key in sorted(fields) if key in varying]
        self.encoders = [None if key == "matrix" else self._encoder(key) for key in self.varying]

    def _encoder(self, name: str) -> Encoder:
        keys, convert = _FROM_RAW[name]
        fills, body = self.entry.fills, self.entry.body
        if convert is None and keys[0] in fills:
            fill = fills[keys[0]]
            return lambda texts, values: canonical(fill(texts, values))
        getters = [fills.get(k) or _constant(body.get(k)) for k in keys]
        make = convert or (lambda value: value)
        return lambda texts, values: canonical(make(*(get(texts, values) for get in getters)))

    @classmethod
    def of(cls, entry: Entry) -> _EntryHead | None:
        """The encoding of a matrix entry whose fields that vary between its tasks are all in ``_FROM_RAW``."""
        template = entry.template
        if entry.grid is None or template is None:
            return None
        varying = {name for name in _fields(template) if name != "matrix" and entry.varies(name)}
        return cls(entry, template, varying | {"matrix"}) if varying <= _FROM_RAW.keys() else None

    def digest(self, k: int) -> str:
        values = self.entry.values(k)
        return self._hash(canonical(values), values, {n: format_value(v) for n, v in values.items()}).hexdigest()

    def _hash(self, matrix: bytes, values: dict[str, Any], texts: dict[str, str]) -> hashlib._Hash:
        h = self.head.copy()
        members = [matrix if encode is None else encode(texts, values) for encode in self.encoders]
        h.update(b"".join(chain.from_iterable(zip(members, self.pieces))))
        return h

    def hexes(self) -> Iterator[bytes]:
        """The digest of each of the entry's tasks, in order, as ASCII hex: the canonical JSON of a
        combination's values is joined from each parameter's ``"NAME":VALUE`` members, made once."""
        grid = self.entry.grid
        assert grid is not None
        hexlify = binascii.hexlify
        if grid.axes:
            rows = self._rows([[canonical(name) + b":" + canonical(v) for v in axis]
                               for name, axis in zip(grid.names, grid.axes)])
            order = sorted(range(len(grid.names)), key=grid.names.__getitem__)  # canonical JSON sorts keys
            if order != list(range(len(order))):
                rows = map(operator.itemgetter(*order), rows)
            join = b",".join
            if self.varying == ["matrix"]:  # the common sweep: the tasks differ by their matrix values only
                head, tail = self.head, self.pieces[0]
                for row in rows:
                    h = head.copy()
                    h.update(b"{" + join(row) + b"}" + tail)
                    yield hexlify(h.digest())
            else:
                names = grid.names
                texts = self._rows([[format_value(v) for v in axis] for axis in grid.axes])
                values = self._rows([list(axis) for axis in grid.axes])
                for row, text, value in zip(rows, texts, values):
                    yield hexlify(self._hash(b"{" + join(row) + b"}", dict(zip(names, value)),
                                             dict(zip(names, text))).digest())
        for k in range(grid.product_size, len(grid)):
            yield self.digest(k).encode()

    def _rows(self, axes: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
        """The kept combinations of the cross product of ``axes`` (one list per parameter), in order."""
        kept = self.entry.grid.kept if self.entry.grid is not None else None
        rows: Iterator[tuple[Any, ...]] = itertools.product(*axes)
        if kept is not None:
            mask = bytearray(math.prod(map(len, axes)))
            for i in kept:
                mask[i] = 1
            rows = itertools.compress(rows, mask)
        return rows


class SpecDigests:
    """``spec_digest`` of the task at each position of ``tasks``, per entry when its tasks' fields that vary
    are encoded per entry (``_EntryHead``)."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self._tasks = tasks
        self._heads: dict[int, _EntryHead | None] = {}

    def __call__(self, position: int) -> str:
        tasks = self._tasks
        if not isinstance(tasks, Tasks):
            return spec_digest(tasks[position])
        entry = tasks.entry_at(position)
        head = self._head(entry)
        if head is None:
            return spec_digest(tasks[position])
        return head.digest(position - entry.start)

    def of_entry(self, entry: Entry) -> Iterator[bytes]:
        """The digest of each task of ``entry`` (one of ``tasks.entries``), in order, as ASCII hex."""
        head = self._head(entry)
        if head is not None:
            return head.hexes()
        assert isinstance(self._tasks, Tasks)
        return (spec_digest(t).encode() for t in self._tasks.of(entry))

    def _head(self, entry: Entry) -> _EntryHead | None:
        if entry.start not in self._heads:
            self._heads[entry.start] = _EntryHead.of(entry)
        return self._heads[entry.start]
