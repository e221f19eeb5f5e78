"""A rank's ledger journal: entries appended by every process of the rank as their calls end.

Several processes append to one journal at once (the runner and its agent subprocesses). Each entry
is one line written with ONE ``os.write`` on an ``O_APPEND`` descriptor and then fsynced, so a process
killed at any moment loses no call that had ended and never leaves half a line inside another.

``merge`` removes a journal once its entries are in ``ledger.jsonl``. A writer holds a shared ``flock``
on the journal while it writes, and the merger an exclusive one while it checks that the file has not
grown since it read it and unlinks it; a writer whose file was unlinked meanwhile opens a new one. So
no entry is written to a journal that has just been removed.
"""

from __future__ import annotations

import fcntl
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from cmbagent_batch.ledger.entry import call_id, entry_fields
from cmbagent_batch.ledger.files import intents_journal_path, journal_path
from cmbagent_batch.ledger.intents import INTENT_FIELDS
from cmbagent_batch.rundir.jsonl import JsonlWriter

_calls = itertools.count(1)


def _restart_count() -> None:
    global _calls
    _calls = itertools.count(1)


os.register_at_fork(after_in_child=_restart_count)


def next_call_id(run_id: str, rank: int) -> str:
    """A new call id for this process: ``<run_id>/<rank>/<pid>/<n>``, ``n`` counting from 1 per process."""
    return call_id(run_id, rank, os.getpid(), next(_calls))


def encode_entry(entry: Mapping[str, Any]) -> bytes:
    """An entry as one journal line, newline included (fields in file order, ``entry_fields``)."""
    try:
        ordered = entry_fields(entry)
    except KeyError as exc:
        raise ValueError(f"ledger entry lacks {exc.args[0]}") from None
    return orjson.dumps(ordered, option=orjson.OPT_APPEND_NEWLINE)


class JournalWriter(JsonlWriter):
    """Appends entries to ``RUN_DIR/ledger/rank-NNNN.jsonl``; safe across threads and processes.

    ``append(entry)`` (an entry from ``make_entry``) writes it durably, fsynced before it returns (with a
    ``sync_interval``, at most that often: the gateway's own thread fsyncs the rest, ``sync``); OSError when
    the disk refuses it.
    """

    record_name = "ledger entry"
    single_writer = False  # the agent processes of a rank append to the same file
    # No reserve: a ledger writer is opened per agent process and per analysis batch, and a full disk stops
    # the run through the state journal's reserve; a ledger append that fails then fails its call loudly.
    reserves = False

    def __init__(self, run_dir: str, rank: int, path: str | None = None, sync_interval: float = 0.0) -> None:
        super().__init__(path or journal_path(run_dir, rank), sync_interval=sync_interval)

    def encode_line(self, record: Mapping[str, Any]) -> bytes:
        return encode_entry(record)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: the journal writer is closed")
        fd = self._locked()
        try:
            super()._write(data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _locked(self) -> int:
        """The descriptor, share-locked, of a journal that is still in place (merge may have removed it)."""
        assert self._fd is not None
        while True:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            if os.fstat(self._fd).st_nlink > 0:
                return self._fd
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = self._open()


class IntentWriter(JournalWriter):
    """Appends intents (``intents.make_intent``) to ``RUN_DIR/ledger/intents-NNNN.jsonl``, the same way:
    one write and an fsync each, share-locked against ``merge``."""

    record_name = "ledger intent"

    def __init__(self, run_dir: str, rank: int, sync_interval: float = 0.0) -> None:
        super().__init__(run_dir, rank, intents_journal_path(run_dir, rank), sync_interval)

    def encode_line(self, record: Mapping[str, Any]) -> bytes:
        return orjson.dumps({k: record[k] for k in INTENT_FIELDS}, option=orjson.OPT_APPEND_NEWLINE)


def parse_line(line: bytes) -> tuple[Any, str | None]:
    """A journal line's entry and what was wrong with the line (None when nothing).

    A writer killed in the middle of a write leaves a torn line, and the next writer's line follows it
    on the same line: the entry at its end is recovered. An unreadable line gives ``(None, problem)``.
    """
    try:
        return orjson.loads(line), None
    except orjson.JSONDecodeError:
        pass
    start = line.rfind(b'{"id":')
    if start > 0:
        try:
            return orjson.loads(line[start:]), "a torn entry before the one at its end was dropped"
        except orjson.JSONDecodeError:
            pass
    return None, "not a complete entry (a writer was killed while writing it?)"


def read_journal(data: bytes, name: str) -> Iterator[tuple[Any, str | None]]:
    """``(entry, problem)`` for every line of a journal's bytes; problems are prefixed with ``name:LINE:``.

    A torn last line (no newline) is reported, never trusted.
    """
    lines = data.split(b"\n")
    tail = lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        entry, problem = parse_line(line)
        yield entry, None if problem is None else f"{name}:{number}: {problem}"
    if tail:
        yield None, f"{name}:{len(lines) + 1}: incomplete last line ignored (a writer was killed while writing it?)"
