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

import ctypes
import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson

_W = TypeVar("_W", bound="JsonlWriter")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full file system, a quota used up
RESERVE = 256 * 1024  # bytes kept allocated beyond a journal's end: the records of a stop on a full disk
_FALLOC_FL_KEEP_SIZE = 1
_GATHER_S = 0.005  # buffered: records reach the file at most this long after a flush, plus the write itself
_WAIT_S = 1.0  # flush(wait=True): the longest wait for the writer thread


def _load_fallocate() -> Any:
    """libc's ``fallocate`` (Linux), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols: libc's among them
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_fallocate()


def encode(record: Mapping[str, Any]) -> bytes:
    """One journal line without its newline: compact UTF-8 JSON (orjson: the scheduler thread writes a
    record per state change, and the stdlib encoder was a tenth of rank 0's time under MPI)."""
    return orjson.dumps(record)


class JsonlWriter:
    """Appends JSON records, one a line, to ``path`` (created with its directory); safe across threads.

    ``close`` writes and fsyncs everything; it raises the ``OSError`` a buffered writer met meanwhile.
    A direct ``append`` raises its own.

    A full file system (ENOSPC, or EDQUOT: a quota used up) loses nothing that was appended: a record
    written in part is cut off again, and what could not be written is kept and written by the next
    flush (``on_full``, called once, lets the owner stop the run).
    And the file keeps ``RESERVE`` bytes allocated beyond its end (``fallocate`` with KEEP_SIZE, where the
    file system has it): when that reserve can no longer be renewed, ``on_full`` is told while the journal
    can still record every state change of the stop, so no task that ended is lost and runs again.
    """

    record_name = "journal record"  # what a line is, in the message of a short write
    single_writer = True  # no other process appends to the file (a record written in part can be cut off)
    reserves = True  # keeps ``RESERVE`` bytes allocated: a state journal, which must record a stop

    def __init__(self, path: str, *, sync_interval: float = 1.0, buffered: bool = False) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._sync_interval = sync_interval
        self._lock = threading.Lock()  # guards the descriptor (direct) or the hand-over (buffered)
        self._fd: int | None = self._open()
        self._reserved = 0  # the file's size up to which blocks are allocated (0: none, or not supported)
        if self.reserves:
            self._reserve(os.fstat(self._fd).st_size)
        self._synced = float("-inf")  # the first write is synced at once
        self._unsynced = False
        self._error: OSError | None = None
        self.on_full: Callable[[OSError], None] | None = None
        self._told_full = False
        self._unwritten = b""  # buffered: what a full file system refused, written first next time
        self._torn = False  # a short write left part of a record that could not be cut off
        # buffered: appended, not handed to the writer thread yet. A deque, whose append and popleft are
        # atomic: any thread may append without the lock, which would double the cost of an append.
        self._queued: deque[bytes] = deque()
        self._handed: list[bytes] = []  # buffered: handed to the writer thread, not written yet
        self._closing = False
        self._work = threading.Event()
        # buffered: hand-overs counted, so that ``flush(wait=True)`` knows when its own are written
        self._handed_n = self._taking = self._written_n = 0
        self._urgent = False  # a flush waits: no gathering
        self._written = threading.Condition()
        self._writer: threading.Thread | None = None
        if buffered:
            self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
            self._writer.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does

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

    def flush(self, wait: bool = False) -> None:
        """Buffered mode: hand what is queued to the writer thread, which writes it soon (in one ``write``,
        with what else comes within ``_GATHER_S``); ``wait``: at once, and return once it is written (or
        after ``_WAIT_S``, when the writer cannot write: a full disk, which ``on_full`` says). Direct mode:
        nothing to do, every record is written already."""
        queued = self._queued
        if not queued:
            return
        with self._lock:  # only what was queued before: other threads may append meanwhile
            self._handed.extend([queued.popleft() for _ in range(len(queued))])
            self._handed_n += 1
            mine = self._handed_n
            if wait:
                self._urgent = True
        self._work.set()
        if wait and self._writer is not None:
            with self._written:
                self._written.wait_for(lambda: self._written_n >= mine or self._closing, _WAIT_S)

    def sync(self) -> None:
        """Direct mode: fsync what was written since the last fsync, if anything (a writer whose
        ``sync_interval`` is long leaves this to a thread of its owner's, which groups the fsyncs). The fsync
        is made on a copy of the descriptor, without the lock: appends go on meanwhile."""
        with self._lock:
            if not self._unsynced or self._fd is None:
                return
            fd = os.dup(self._fd)
            self._unsynced = False
            self._synced = time.monotonic()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write and fsync everything, stop the writer thread, close the file (a second call does nothing)."""
        self.flush()
        if self._writer is not None:
            self._closing = True
            self._work.set()
            self._writer.join()
        rest = self._unwritten + self._take_handed()  # what is left, or was handed over while the writer ended
        self._unwritten = b""
        with self._lock:
            if self._fd is None:
                return
            try:
                if rest:
                    self._write(rest)
                self._sync()
            except OSError as exc:
                self._error = self._error or exc
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
        if self._torn:  # a record was left in part: start on a line of our own
            data = b"\n" + data
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                exc.filename = exc.filename or self.path
            raise
        self._unsynced = True
        self._torn = False
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: the end of this write (no metadata round trip)
        if written != len(data):  # the file system filled up within this write
            self._cut(end - written, written)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes "
                                        f"of a {self.record_name})", self.path)
        if self._reserved and end > self._reserved - RESERVE // 2:
            self._reserve(end)

    def _reserve(self, size: int) -> None:
        """Allocate ``RESERVE`` bytes beyond ``size`` (the file's size does not change). On a full file
        system, tell ``on_full`` (once) while what is still reserved takes the records of the stop."""
        if _fallocate is None or self._fd is None:
            return
        if _fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, size, RESERVE) == 0:
            self._reserved = size + RESERVE
            return
        err = ctypes.get_errno()
        if err in DISK_FULL_ERRNOS and self._reserved:
            self._reserved = 0  # no retry: the writes themselves say when there is room again
            self._tell_full(OSError(err, f"{os.strerror(err)} (the journal's reserve could not be renewed)",
                                    self.path))

    def _tell_full(self, exc: OSError) -> None:
        """Tell ``on_full`` that the file system is full, once."""
        if not self._told_full and self.on_full is not None:
            self._told_full = True
            self.on_full(exc)

    def _cut(self, before: int, written: int) -> None:
        """Take back the part of a record a short write left, in a file no other process appends to;
        elsewhere (or if that fails) the next write starts on a new line, and readers skip the torn one."""
        assert self._fd is not None
        if self.single_writer and os.fstat(self._fd).st_size == before + written:
            try:
                os.ftruncate(self._fd, before)
                return
            except OSError:
                pass
        self._torn = True

    def _sync(self) -> None:
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = False
        self._synced = time.monotonic()

    def _take_handed(self) -> bytes:
        with self._lock:
            lines, self._handed = self._handed, []
            self._taking = self._handed_n
            self._urgent = False
        return b"".join(lines)

    def _write_loop(self) -> None:
        while True:
            timeout = None if not self._unsynced else max(0.0, self._synced + self._sync_interval - time.monotonic())
            self._work.wait(timeout)
            if not self._closing and not self._urgent:
                time.sleep(_GATHER_S)  # what else comes meanwhile goes in the same write (one wake-up)
            self._work.clear()
            try:
                data = self._unwritten + self._take_handed()
                self._unwritten = b""
                if data:
                    self._write_or_keep(data)
                if not self._unwritten:
                    with self._written:
                        self._written_n = self._taking
                        self._written.notify_all()
                if self._closing or time.monotonic() - self._synced >= self._sync_interval:
                    self._sync()
            except OSError as exc:  # reported by close()
                self._error = self._error or exc
                if exc.errno in DISK_FULL_ERRNOS:  # say, fsync on NFS or over a quota
                    self._tell_full(exc)
            if self._closing:
                return

    def _write_or_keep(self, data: bytes) -> None:
        """Write ``data``; on a full file system keep it for the next try and tell ``on_full`` (once)."""
        try:
            self._write(data)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            self._unwritten = data
            self._tell_full(exc)
