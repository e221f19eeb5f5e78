"""The state journal: one JSON line per task state change, appended durably.

``append`` queues a record; ``flush`` (the scheduler calls it once per loop iteration, before it waits)
hands what is queued to a writer thread, which writes it with one ``write`` on an ``O_APPEND``
descriptor, so a killed process leaves whole lines (at worst one torn last line, which readers skip
and report). The scheduler never waits for the disk: a write can take 0.1 ms while an fsync runs, and
it would hold back the next task's launch. The writer gathers for 5 ms after it is woken, so a burst
of changes costs one write and one wake-up. A runner killed with SIGKILL loses what was not written yet,
at most a few milliseconds of changes (those tasks run again). ``fsync`` is group-committed: at most
once per ``interval`` (1 s) when something was written, so 10^4 state changes per second cost a few
fsyncs, not 10^4. ``close`` writes and syncs everything (at exit, before reporting).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson

def encode(record: dict[str, Any]) -> bytes:
    """One journal line without its newline: compact UTF-8 JSON (orjson: the scheduler thread writes a
    record per state change, and the stdlib encoder was a tenth of rank 0's time under MPI)."""
    return orjson.dumps(record)
_GATHER_S = 0.005  # records reach the file at most this long after a flush, plus the write itself


class Journal:
    def __init__(self, path: str, interval: float = 1.0) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._queued: list[bytes] = []  # appended, not handed to the writer yet (scheduler thread only)
        self._handed: list[bytes] = []  # handed to the writer, not written yet
        self._work = threading.Event()
        self._closed = False
        self._interval = interval
        self._error: OSError | None = None
        self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._writer.start()

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record; it goes to the writer at the next ``flush``."""
        self._queued.append(encode(record))

    def flush(self) -> None:
        """Hand the queued records to the writer thread (it writes them at once, in one ``write``)."""
        if not self._queued:
            return
        with self._lock:
            self._handed.extend(self._queued)
        self._queued.clear()
        self._work.set()

    def _write_pending(self) -> bool:
        with self._lock:
            lines, self._handed = self._handed, []
        if not lines:
            return False
        data = b"\n".join(lines) + b"\n"
        while data:  # a regular file takes it all at once, short of a full disk or a signal
            data = data[os.write(self._fd, data):]
        return True

    def _write_loop(self) -> None:
        unsynced = False
        last_sync = 0.0
        while True:
            timeout = None if not unsynced else max(0.0, last_sync + self._interval - time.monotonic())
            self._work.wait(timeout)
            if not self._closed:
                time.sleep(_GATHER_S)  # what else comes meanwhile goes in the same write (one wake-up)
            self._work.clear()
            try:
                if self._write_pending():
                    unsynced = True
                if unsynced and (self._closed or time.monotonic() - last_sync >= self._interval):
                    os.fsync(self._fd)
                    unsynced, last_sync = False, time.monotonic()
            except OSError as exc:  # a full disk: reported by close(), the run goes on
                self._error = self._error or exc
            if self._closed and not self._handed:
                return

    def close(self) -> None:
        """Write and fsync everything, stop the writer, close the file (raises the writer's OSError)."""
        self.flush()
        self._closed = True
        self._work.set()
        self._writer.join()
        self._write_pending()  # anything handed over while the writer was ending
        os.fsync(self._fd)
        os.close(self._fd)
        if self._error is not None:
            raise self._error


def read_records(path: str, warn: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a journal; a torn or corrupt line is skipped (and reported through ``warn``)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        for number, raw in enumerate(fh, 1):
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

    state: str
    attempts: int
    record: dict[str, Any]  # the last record


_ENDS = frozenset({"succeeded", "failed"})


def replay(paths: list[str], warn: Callable[[str], None] | None = None) -> dict[str, TaskHistory]:
    """Last known state of every task across journals (records ordered by their time stamp)."""
    records = [r for p in paths for r in read_records(p, warn) if "task" in r]
    records.sort(key=lambda r: r.get("t", 0.0))
    out: dict[str, TaskHistory] = {}
    for r in records:
        tid = r["task"]
        prev = out.get(tid)
        if r["state"] == "running" and prev is not None and prev.state in _ENDS and \
                (prev.record.get("run"), prev.record.get("attempt")) == (r.get("run"), r.get("attempt")):
            # an attempt's end journaled by the worker rank that ran it, on a clock a little behind
            # rank 0's: the end stands
            continue
        attempts = max(prev.attempts if prev else 0, int(r.get("attempt", 0)))
        out[tid] = TaskHistory(state=r["state"], attempts=attempts, record=r)
    return out
