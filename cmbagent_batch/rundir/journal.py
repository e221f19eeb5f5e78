"""The state journal: one JSON line per task state change, appended durably.

``Journal`` is rank 0's, written by the scheduler thread: a buffered ``JsonlWriter`` (``jsonl.py``), so
``append`` only queues, and ``flush`` (once per loop iteration, before the scheduler waits) hands the
queued records to a writer thread that writes them in one ``write`` and group-commits the fsync (at most
once per ``interval``, 1 s). ``close`` writes and syncs everything (at exit, before reporting).
``read_records`` and ``replay`` read the journals back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cmbagent_batch.rundir.history import History, TaskHistory
from cmbagent_batch.rundir.jsonl import JsonlWriter

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


def replay(paths: list[str], warn: Callable[[str], None] | None = None) -> History:
    """Every task's history from the journals ``paths``, read in full (``history.load_history`` reads
    only what the index does not cover)."""
    history = History()
    history.journal_dir = os.path.dirname(paths[0]) if paths else ""
    history.read_tails(paths, warn)
    return history
