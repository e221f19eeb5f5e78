"""The state journal: one JSON line per task state change, appended durably.

Records are buffered by ``append`` and written by ``flush``, which the scheduler calls once per loop
iteration, before it waits: one ``write`` for every change of that iteration, on an ``O_APPEND``
descriptor, so a killed process leaves whole lines (at worst one torn last line, which readers skip
and report) and loses at most the changes of the iteration it was in. ``fsync`` is group-committed:
a background thread syncs at most once per ``interval`` (1 s) when something was written, so 10^4
state changes per second cost a few fsyncs, not 10^4. ``sync()`` forces one (at exit, before reporting).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Journal:
    def __init__(self, path: str, interval: float = 1.0) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._dirty = threading.Event()
        self._closed = False
        self._wake = threading.Event()
        self._interval = interval
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-fsync", daemon=True)
        self._syncer.start()

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record; it reaches the file at the next ``flush``."""
        line = _encode(record)
        with self._lock:
            self._pending.append(line)

    def flush(self) -> None:
        """Write the queued records (one ``write``); the syncer fsyncs them within ``interval``."""
        with self._lock:
            if not self._pending:
                return
            data = ("\n".join(self._pending) + "\n").encode("utf-8")
            self._pending.clear()
            while data:  # a regular file takes it all at once, short of a full disk or a signal
                data = data[os.write(self._fd, data):]
        self._dirty.set()

    def sync(self) -> None:
        self.flush()
        self._dirty.clear()
        os.fsync(self._fd)

    def _sync_loop(self) -> None:
        # fsync runs without the write lock: appends go on while the disk catches up.
        while True:
            self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            os.fsync(self._fd)
            self._wake.wait(self._interval)  # close() sets it, so the run ends without waiting

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()
        self._dirty.set()  # wake the syncer so it ends
        self._syncer.join()
        os.fsync(self._fd)
        os.close(self._fd)


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


def replay(paths: list[str], warn: Callable[[str], None] | None = None) -> dict[str, TaskHistory]:
    """Last known state of every task across journals (records ordered by their time stamp)."""
    records = [r for p in paths for r in read_records(p, warn) if "task" in r]
    records.sort(key=lambda r: r.get("t", 0.0))
    out: dict[str, TaskHistory] = {}
    for r in records:
        tid = r["task"]
        prev = out.get(tid)
        attempts = max(prev.attempts if prev else 0, int(r.get("attempt", 0)))
        out[tid] = TaskHistory(state=r["state"], attempts=attempts, record=r)
    return out
