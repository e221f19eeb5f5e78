"""The ``spec`` part of task fingerprints: a digest of the fields that change what a task does.

The digest is the sha256 of the canonical JSON of those fields (``spec_digest``), a value journaled by
every finished task: it must never change for a task whose fields did not. For the tasks of a matrix
entry that differ only by their matrix values (``SpecDigests``), the canonical JSON is the same text up
to the ``"matrix":`` member, so the hash of that head is computed once per entry and copied per task;
the result is the same digest, byte for byte, at a tenth of the cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from cmbagent_batch.plan.analysis.cache import canonical, digest
from cmbagent_batch.spec.model import TaskSpec, thaw
from cmbagent_batch.spec.tasks import Entry, Tasks

# Fields that do not change what a task produces (timeouts, retries, resources, estimates) are left out,
# so tuning them does not rerun finished work.
FIELDS = ("kind", "run", "call", "args", "env", "inputs", "outputs", "agent", "instructions", "model",
          "max_turns", "code_execution", "matrix")


def _fields(task: TaskSpec) -> dict[str, Any]:
    fields = {name: thaw(getattr(task, name)) for name in FIELDS}
    if task.kind == "agent":
        fields["description"] = task.description
    return fields


def spec_digest(task: TaskSpec) -> str:
    return digest(_fields(task))


class _EntryHead:
    """The canonical JSON of an entry's shared fields around ``"matrix":``, its head already hashed."""

    __slots__ = ("entry", "head", "tail")

    def __init__(self, entry: Entry, template: TaskSpec) -> None:
        # canonical() of a dict is "{" + the members "KEY:VALUE" in key order, joined by "," + "}"
        fields = _fields(template)
        members = [canonical(k) + b":" + canonical(fields[k]) for k in sorted(fields) if k != "matrix"]
        before = sum(1 for k in fields if k < "matrix")
        self.entry = entry
        self.head = hashlib.sha256(b"{" + b"".join(m + b"," for m in members[:before]) + b'"matrix":')
        self.tail = b"".join(b"," + m for m in members[before:]) + b"}"

    def digest(self, k: int) -> str:
        h = self.head.copy()
        h.update(canonical(self.entry.values(k)))
        h.update(self.tail)
        return h.hexdigest()


class SpecDigests:
    """``spec_digest`` of the task at each position of ``tasks``, per entry when its tasks differ only by
    their matrix values."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self._tasks = tasks
        self._heads: dict[int, _EntryHead | None] = {}

    def __call__(self, position: int) -> str:
        tasks = self._tasks
        if not isinstance(tasks, Tasks):
            return spec_digest(tasks[position])
        entry = tasks.entry_at(position)
        if entry.start not in self._heads:
            self._heads[entry.start] = (
                _EntryHead(entry, entry.template)
                if entry.grid is not None and entry.template is not None and set(entry.fills) <= {"id"} else None)
        head = self._heads[entry.start]
        if head is None:
            return spec_digest(tasks[position])
        return head.digest(position - entry.start)
