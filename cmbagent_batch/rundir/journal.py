"""The state journal: one JSON line per task state change, appended durably.

``Journal`` is rank 0's, written by the scheduler thread: a buffered ``JsonlWriter`` (``jsonl.py``), so
``append`` only queues, and ``flush`` (once per loop iteration, before the scheduler waits) hands the
queued records to a writer thread that writes them in one ``write`` and group-commits the fsync (at most
once per ``interval``, 1 s). ``close`` writes and syncs everything (at exit, before reporting).
``read_records`` and ``replay`` read the journals back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.rundir.jsonl import JsonlWriter
from cmbagent_batch.states import TaskState

__all__ = ["Journal", "TaskHistory", "read_records", "replay"]


class Journal(JsonlWriter):
    """The state journal at ``path``: the scheduler never waits for the disk (see the module's doc)."""

    def __init__(self, path: str, interval: float = 1.0) -> None:
        super().__init__(path, sync_interval=interval, buffered=True)


def read_records(path: str, warn: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a journal; a torn or corrupt line is skipped (and reported through ``warn``)."""
    try:
        with open(path, "rb") as fh:
            yield from _records(fh, path, warn)
    except FileNotFoundError:  # no journal yet (reading its lines raises no FileNotFoundError)
        return


def _records(lines: Iterable[bytes], path: str, warn: Callable[[str], None] | None) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if warn is not None:
                torn = not raw.endswith(b"\n")
                warn(f"{path}:{number}: {'torn last line' if torn else 'corrupt line'} skipped")
            continue
        yield record


@dataclass
class TaskHistory:
    """What the journals say about one task: its last state and every attempt."""

    state: TaskState
    attempts: int
    record: dict[str, Any]  # the last record


_STATES = {s.value: s for s in TaskState}  # the journals' state texts
_ENDS = frozenset({TaskState.SUCCEEDED, TaskState.FAILED})


def replay(paths: list[str], warn: Callable[[str], None] | None = None) -> dict[str, TaskHistory]:
    """Last known state of every task across journals (records ordered by their time stamp). A record
    with a state this version does not know (a newer one wrote it) counts as the task not done."""
    records = [r for p in paths for r in read_records(p, warn) if "task" in r]
    records.sort(key=lambda r: r.get("t", 0.0))
    out: dict[str, TaskHistory] = {}
    for r in records:
        tid = r["task"]
        prev = out.get(tid)
        state = _STATES.get(r["state"], TaskState.INTERRUPTED)
        if state is TaskState.RUNNING and prev is not None and prev.state in _ENDS and \
                (prev.record.get("run"), prev.record.get("attempt")) == (r.get("run"), r.get("attempt")):
            # an attempt's end journaled by the worker rank that ran it, on a clock a little behind
            # rank 0's: the end stands
            continue
        attempts = max(prev.attempts if prev else 0, int(r.get("attempt", 0)))
        out[tid] = TaskHistory(state=state, attempts=attempts, record=r)
    return out


def current_state(recorded: str, history: TaskHistory | None, runner_gone: bool) -> TaskState:
    """A task's state now: its last journal record's, else the state run.json ``recorded``; a task still
    running when its runner is gone (killed without a word) was interrupted. ``status`` and the Slurm
    after-step count tasks with it, so both say the same after a SIGKILL."""
    state = history.state if history is not None else TaskState(recorded)
    return TaskState.INTERRUPTED if runner_gone and state is TaskState.RUNNING else state
