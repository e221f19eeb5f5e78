"""A job's tasks held compactly: one ``Entry`` per ``$.tasks`` entry, its tasks made when asked for.

A matrix entry of 10^6 tasks keeps its raw body once, its ``Grid`` of combinations (no object per
combination), the functions filling its placeholders and its tasks' ids; ``JobSpec.tasks`` is a ``Tasks``
sequence that makes a ``TaskSpec`` for the task asked for, and finds a task by id in O(1). Code that
looks at every task of a large job reads an entry at a time (``Tasks.entries``): what does not vary
between its tasks (``Entry.varies``) is read once from ``Entry.template``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, overload

from cmbagent_batch.spec.matrix import Fill, Grid, Values, describe_values, template
from cmbagent_batch.spec.model import EMPTY, Resources, TaskSpec, Unplaceable, freeze

DEFAULT_RESOURCES = Resources()
_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec))
_AT = {name: i for i, name in enumerate(_FIELDS)}
_RAW_KEYS = {"inputs": ("inputs", "late_inputs")}  # a TaskSpec field made of more than its own raw key


class Entry:
    """The tasks of one ``$.tasks`` entry: its raw body, shared, and what differs from task to task."""

    __slots__ = ("_args", "body", "fills", "grid", "ids", "index", "line", "start", "template")

    def __init__(self, index: int, body: dict[str, Any], grid: Grid | None, fills: dict[str, Fill], start: int) -> None:
        self.index = index  # position in $.tasks
        self.body = body  # the raw entry without its matrix, placeholders unfilled
        self.grid = grid  # None: a plain entry, one task
        self.fills = fills  # raw key -> what fills its placeholders, for the keys that have some
        self.start = start  # position of its first task in the job
        tid = body.get("id")
        if grid is None:
            self.ids: list[Any] = [tid]
        elif isinstance(tid, str) and "id" in fills:
            self.ids = grid.texts(tid)
        else:
            self.ids = [tid] * len(grid)
        self.line = 0
        self.template: TaskSpec | None = None  # set by ``finish``: the fields all its tasks share
        self._args: list[Any] = []

    def __len__(self) -> int:
        return len(self.ids)

    def values(self, k: int) -> Values:
        """The matrix values of its task ``k`` ({} for a plain entry)."""
        return self.grid.values(k) if self.grid is not None else {}

    def raw(self, k: int) -> dict[str, Any]:
        """The raw body of its task ``k``, placeholders filled."""
        if not self.fills:
            return self.body if self.grid is None else dict(self.body)
        values = self.values(k)
        texts = {name: _text(v) for name, v in values.items()}
        return {**self.body, **{key: fill(texts, values) for key, fill in self.fills.items()}}

    def field(self, key: str, k: int) -> Any:
        """The raw value of ``key`` in its task ``k``, placeholders filled (None when absent)."""
        fill = self.fills.get(key)
        if fill is None:
            return self.body.get(key)
        values = self.values(k)
        return fill({name: _text(v) for name, v in values.items()}, values)

    def note(self, k: int) -> str:
        """Suffix naming the matrix values of its task ``k``, for messages about that task."""
        return f" (with {describe_values(self.values(k))})" if self.grid is not None else ""

    def origin(self, k: int) -> str:
        where = f"$.tasks[{self.index}]"
        return f"{where} ({describe_values(self.values(k))})" if self.grid is not None else where

    def varies(self, name: str) -> bool:
        """Whether the ``TaskSpec`` field ``name`` may differ between its tasks (``depends_on`` aside)."""
        if name in ("id", "matrix"):
            return self.grid is not None
        fills = self.fills
        return bool(fills) and any(key in fills for key in _RAW_KEYS.get(name, (name,)))  # a listed task's: none

    def finish(self, line: int, default_model: str | None) -> None:
        """Make its template, once its tasks are known to be valid."""
        self.line = line
        self.template = task_spec(self.body, {}, (), default_model, self.index, line)
        if self.grid is not None and set(self.fills) <= {"id"}:
            self._args = [getattr(self.template, name) for name in _FIELDS]


class Tasks(Sequence[TaskSpec]):
    """Every task of a job, in file order (a matrix entry's in the order of its combinations)."""

    __slots__ = ("_deps", "_index", "_model", "_starts", "entries")

    def __init__(self, entries: Sequence[Entry], index: dict[str, int], deps: Mapping[int, tuple[str, ...]],
                 default_model: str | None) -> None:
        self.entries = tuple(entries)
        self._index = index  # id -> position
        self._deps = deps  # position -> its resolved depends_on, for the tasks that have some
        self._model = default_model
        self._starts = [e.start for e in self.entries]
        for e in self.entries:
            if e.grid is None and e.template is not None:  # a plain entry is its one task: its raw body goes
                resolved = deps.get(e.start, ())
                if resolved != e.template.depends_on:  # a replace costs more than reading the whole entry
                    e.template = dataclasses.replace(e.template, depends_on=resolved)
                e.body = {"kind": e.template.kind}

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> TaskSpec: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[TaskSpec]: ...

    def __getitem__(self, i: int | slice) -> TaskSpec | Sequence[TaskSpec]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self._index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("task position out of range")
        entry = self.entry_at(i)
        return self._make(entry, i - entry.start)

    def __iter__(self) -> Iterator[TaskSpec]:
        for entry in self.entries:
            yield from self.of(entry)

    def of(self, entry: Entry) -> Iterator[TaskSpec]:
        """The tasks of ``entry``, made one at a time."""
        if not entry._args or entry.grid is None:
            yield from (self._make(entry, k) for k in range(len(entry)))
            return
        args, deps = entry._args.copy(), self._deps
        at_id, at_matrix, at_deps = _AT["id"], _AT["matrix"], _AT["depends_on"]
        for pos, tid, values in zip(itertools.count(entry.start), entry.ids, entry.grid.all_values()):
            args[at_id], args[at_matrix], args[at_deps] = tid, MappingProxyType(values), deps.get(pos, ())
            yield TaskSpec(*args)

    def of_kind(self, kind: str) -> Iterator[TaskSpec]:
        """The tasks of one kind (``agent``...): the other entries are not looked at task by task."""
        for entry in self.entries:
            if entry.body.get("kind") == kind:
                yield from self.of(entry)

    def position(self, task_id: str) -> int:
        """Where the task ``task_id`` is; KeyError if there is none."""
        return self._index[task_id]

    def entry_at(self, position: int) -> Entry:
        """The entry that made the task at ``position``."""
        entries = self.entries
        if position < len(entries):  # a job of listed tasks: the entry at the same place, found at once
            entry = entries[position]
            if entry.start == position and entry.ids:  # then the next one starts further on
                return entry
        return entries[bisect.bisect_right(self._starts, position) - 1]

    def id_at(self, position: int) -> str:
        entry = self.entry_at(position)
        return str(entry.ids[position - entry.start])

    def field(self, position: int, name: str) -> Any:
        """The field ``name`` of the task at ``position``; the task is made only when it varies in its entry."""
        entry = self.entry_at(position)
        if entry.template is not None and name != "depends_on" and not entry.varies(name):
            return getattr(entry.template, name)
        return getattr(self[position], name)

    def depends_on(self, position: int) -> tuple[str, ...]:
        """The resolved ``depends_on`` of the task at ``position``."""
        return self._deps.get(position, ())

    def dependencies(self) -> Iterator[tuple[int, tuple[str, ...]]]:
        """(position, depends_on) of every task that has some, in file order."""
        return iter(sorted(self._deps.items()))

    @property
    def ids(self) -> Iterable[str]:
        """Every id, in file order."""
        return itertools.chain.from_iterable(e.ids for e in self.entries)

    def _make(self, entry: Entry, k: int) -> TaskSpec:
        if entry.grid is None and entry.template is not None:
            return entry.template
        pos = entry.start + k
        deps = self._deps.get(pos, ())
        if entry._args:
            args = entry._args.copy()
            args[_AT["id"]] = entry.ids[k]
            if entry.grid is not None:
                args[_AT["matrix"]] = MappingProxyType(entry.grid.values(k))
            args[_AT["depends_on"]] = deps
            return TaskSpec(*args)
        return task_spec(entry.raw(k), entry.values(k), deps, self._model, entry.index, entry.line)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fills(body: dict[str, Any], names: list[str]) -> dict[str, Fill]:
    """For each key of a matrix entry's raw body holding placeholders of ``names``, what fills them."""
    out = {}
    for key, value in body.items():
        fill = template(value, names, keep_type=key == "args")
        if fill is not None:
            out[key] = fill
    return out


def task_spec(d: dict[str, Any], values: Values, depends_on: tuple[str, ...], default_model: str | None,
              index: int, line: int) -> TaskSpec:
    """The ``TaskSpec`` of one raw (valid) task body."""
    kind = d["kind"]
    return TaskSpec(
        id=d["id"],
        kind=kind,
        description=d.get("description", ""),
        depends_on=depends_on,
        inputs=tuple(d.get("inputs", ())) + tuple(d.get("late_inputs", ())),
        late_inputs=tuple(d.get("late_inputs", ())),
        outputs=tuple(d.get("outputs", ())),
        env=MappingProxyType({k: _text(v) for k, v in d["env"].items()}) if "env" in d else EMPTY,
        timeout=d.get("timeout"),
        retries=d.get("retries"),
        resources=resources(d["resources"]) if "resources" in d else DEFAULT_RESOURCES,
        budget_usd=d.get("budget_usd"),
        models=tuple(d.get("models", ())),
        estimate=d.get("estimate"),
        when_unplaceable=Unplaceable(d["when_unplaceable"]) if "when_unplaceable" in d else Unplaceable.REFUSE,
        run=d.get("run"),
        call=d.get("call"),
        args=freeze(d["args"]) if "args" in d else None,
        agent=d.get("agent", "assistant") if kind == "agent" else None,
        instructions=d.get("instructions"),
        model=d.get("model", default_model) if kind == "agent" else None,
        max_turns=d.get("max_turns", 10),
        code_execution=d.get("code_execution", False),
        matrix=MappingProxyType(values) if values else EMPTY,
        entry=index,
        line=line,
    )


def resources(raw: dict[str, int]) -> Resources:
    """A valid ``resources`` mapping as a shape (``cpus`` is ``cpus_per_rank`` of one rank)."""
    if "cpus" not in raw:
        return Resources(**raw)
    return Resources(**{("cpus_per_rank" if k == "cpus" else k): v for k, v in raw.items()})


def entries_of(tasks: Sequence[TaskSpec]) -> tuple[Entry, ...] | None:
    """The entries of a job's ``Tasks``; None for another sequence (tasks made one by one)."""
    return tasks.entries if isinstance(tasks, Tasks) else None


def by_entry(tasks: Sequence[TaskSpec]) -> Iterator[tuple[TaskSpec, Sequence[str]]]:
    """Each entry's shared fields and its tasks' ids: a ``TaskSpec`` whose fields that vary between the
    entry's tasks (``Entry.varies``) are left unfilled, so only the others may be read. For tasks that are
    not a ``Tasks``, each task with its own id."""
    entries = entries_of(tasks)
    if entries is None:
        yield from ((t, (t.id,)) for t in tasks)
        return
    for e in entries:
        assert e.template is not None
        yield e.template, e.ids


def of_kind(tasks: Sequence[TaskSpec], kind: str) -> Iterator[TaskSpec]:
    """The tasks of one kind; of a ``Tasks``, only the entries of that kind are made task by task."""
    if isinstance(tasks, Tasks):
        return tasks.of_kind(kind)
    return (t for t in tasks if t.kind == kind)


def calling_models(tasks: Sequence[TaskSpec]) -> Iterator[TaskSpec]:
    """The tasks that declare ``models``; of a ``Tasks``, only the entries that do are made task by task."""
    if not isinstance(tasks, Tasks):
        yield from (t for t in tasks if t.models)
        return
    for entry in tasks.entries:
        if "models" in entry.body:
            yield from tasks.of(entry)


def task_ids(tasks: Sequence[TaskSpec]) -> Iterable[str]:
    """Every task's id, in order, without making the tasks of a ``Tasks``."""
    return tasks.ids if isinstance(tasks, Tasks) else (t.id for t in tasks)
