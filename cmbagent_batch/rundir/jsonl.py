"""The one appender of JSON lines: the state journals (``RUN_DIR/journal/``) and the ledger journals.

Every record is one line written with one ``write`` on an ``O_APPEND`` descriptor, so writers in several
threads or processes never interleave inside a line, and a killed process leaves whole lines (at worst
one torn last line, which readers skip and report). ``fsync`` is group-committed: at most once per
``sync_interval`` seconds when something was written (``0``: after every record), and on ``close``.

Two modes:

- **direct** (the default): ``append`` writes before it returns, so a record is on its way to the disk
  before anyone is told of what it records (a rank journals a task's end before rank 0 hears of it).
- **buffered**: ``append`` only queues; ``flush`` wakes a writer thread, which gathers for 5 ms and writes
  all that is queued in one ``write``. The scheduler appends a record per state change and flushes once
  per loop iteration, so it never waits for the disk (a ``write`` can take 0.1 ms while an ``fsync``
  runs); a burst of changes costs one write and one wake-up. A process killed with SIGKILL loses what was
  not written yet, a few milliseconds of changes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, TypeVar

import orjson

_W = TypeVar("_W", bound="JsonlWriter")
_GATHER_S = 0.005  # buffered: records reach the file at most this long after a flush, plus the write itself


def encode(record: Mapping[str, Any]) -> bytes:
    """One journal line without its newline: compact UTF-8 JSON (orjson: the scheduler thread writes a
    record per state change, and the stdlib encoder was a tenth of rank 0's time under MPI)."""
    return orjson.dumps(record)


class JsonlWriter:
    """Appends JSON records, one a line, to ``path`` (created with its directory); safe across threads.

    ``close`` writes and fsyncs everything; it raises the ``OSError`` a buffered writer met meanwhile
    (a full disk does not stop a run, it is reported at the end). A direct ``append`` raises its own.
    """

    record_name = "journal record"  # what a line is, in the message of a short write

    def __init__(self, path: str, *, sync_interval: float = 1.0, buffered: bool = False) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._sync_interval = sync_interval
        self._lock = threading.Lock()  # guards the descriptor (direct) or the hand-over (buffered)
        self._fd: int | None = self._open()
        self._synced = float("-inf")  # the first write is synced at once
        self._unsynced = False
        self._error: OSError | None = None
        # buffered: appended, not handed to the writer thread yet. A deque, whose append and popleft are
        # atomic: any thread may append without the lock, which would double the cost of an append.
        self._queued: deque[bytes] = deque()
        self._handed: list[bytes] = []  # buffered: handed to the writer thread, not written yet
        self._closing = False
        self._work = threading.Event()
        self._writer: threading.Thread | None = None
        if buffered:
            self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
            self._writer.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def encode_line(self, record: Mapping[str, Any]) -> bytes:
        """``record`` as one line, newline included."""
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (direct mode), or queue it for the next ``flush`` (buffered mode)."""
        line = self.encode_line(record)
        if self._writer is not None:
            self._queued.append(line)
            return
        with self._lock:
            self._write(line)
            if time.monotonic() - self._synced >= self._sync_interval:
                self._sync()

    def flush(self) -> None:
        """Buffered mode: hand what is queued to the writer thread, which writes it at once (in one
        ``write``). Direct mode: nothing to do, every record is written already."""
        queued = self._queued
        if not queued:
            return
        with self._lock:  # only what was queued before: other threads may append meanwhile
            self._handed.extend([queued.popleft() for _ in range(len(queued))])
        self._work.set()

    def close(self) -> None:
        """Write and fsync everything, stop the writer thread, close the file (a second call does nothing)."""
        self.flush()
        if self._writer is not None:
            self._closing = True
            self._work.set()
            self._writer.join()
        rest = self._take_handed()  # anything handed over while the writer was ending
        with self._lock:
            if self._fd is None:
                return
            try:
                if rest:
                    self._write(rest)
                self._sync()
            finally:
                os.close(self._fd)
                self._fd = None
        if self._error is not None:
            raise self._error

    def __enter__(self: _W) -> _W:  # typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The writing itself: one thread at a time (under the lock in direct mode; in buffered mode the
    # writer thread alone, then ``close``), so the scheduler never waits for a write or an fsync.

    def _write(self, data: bytes) -> None:
        """One ``write`` of whole lines; a subclass may wrap it (the ledger takes a shared flock)."""
        if self._fd is None:
            raise ValueError(f"{self.path}: the journal writer is closed")
        written = os.write(self._fd, data)
        self._unsynced = True
        if written != len(data):  # a full disk: readers skip the torn line and say so
            raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes of a {self.record_name}")

    def _sync(self) -> None:
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = False
        self._synced = time.monotonic()

    def _take_handed(self) -> bytes:
        with self._lock:
            lines, self._handed = self._handed, []
        return b"".join(lines)

    def _write_loop(self) -> None:
        while True:
            timeout = None if not self._unsynced else max(0.0, self._synced + self._sync_interval - time.monotonic())
            self._work.wait(timeout)
            if not self._closing:
                time.sleep(_GATHER_S)  # what else comes meanwhile goes in the same write (one wake-up)
            self._work.clear()
            try:
                if data := self._take_handed():
                    self._write(data)
                if self._closing or time.monotonic() - self._synced >= self._sync_interval:
                    self._sync()
            except OSError as exc:  # a full disk: reported by close(), the run goes on
                self._error = self._error or exc
            if self._closing:
                return
