"""``RUN_DIR/trace.tsv``: one tab-separated row per attempt, appended as each attempt ends.

The columns (``COLUMNS``) are fixed; the header line is written once, when the file is new or empty, and
every run of a resumed job appends below it (each row names its run). A field is empty where the value is
unknown; a tab, newline or carriage return inside a value is written as a space.

``Trace`` appends rows as the state journal appends records (``jsonl.JsonlWriter``, buffered): ``add``
only queues, ``flush`` hands the queued rows to a writer thread, which writes them in one ``write`` on an
``O_APPEND`` descriptor and group-commits the fsync. A runner killed with SIGKILL leaves whole rows (a
row torn all the same is cut off when the next run opens the file) and loses at most the rows of its last
moments. The trace is not the run's record (the journal is): a file system that fills up, or any other
error writing it, stops the trace, once, with a warning, and the run goes on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple

from cmbagent_batch.rundir.jsonl import JsonlWriter

TRACE = "trace.tsv"


class TraceRow(NamedTuple):
    """One attempt's row (a named tuple: one is made per attempt on the scheduler thread, as cheaply as a
    tuple). Times are seconds since the epoch; ``None``: unknown (an empty field)."""

    run: str  # the run's id
    task: str
    kind: str  # shell, python or agent
    state: str  # the task's state that the attempt's end journaled (retrying: it failed and runs again)
    attempt: int  # 1-based, counting the attempts of earlier runs
    rank: int | None  # the rank that ran it (0: the runner itself, on local pools)
    host: str | None
    nodes: str  # booked: the hosts of its placement, joined by ","; else the task's node count
    cores: str  # booked: each node's cores as compact ranges ("0-3,8"), nodes joined by ";"; else a count
    gpus: str  # booked: each node's GPU ids joined by ",", nodes by ";" (empty: none); else a count
    queued: float  # when the scheduler handed it over
    start: float | None  # its ``running`` record's time
    end: float  # its end record's time
    wall_s: float | None
    cpu_s: float | None
    peak_rss_mb: float | None
    exit_code: int | None
    tokens: int | None  # prompt + completion tokens of its LLM calls (0: no call)
    cost_usd: float | None  # their cost in USD

    def line(self) -> bytes:
        """The row as one line of the file, newline included."""
        return (f"{_clean(self.run)}\t{_clean(self.task)}\t{self.kind}\t{self.state}\t{self.attempt}\t"
                f"{_blank(self.rank)}\t{_clean(self.host or '')}\t{_clean(self.nodes)}\t{self.cores}\t"
                f"{_clean(self.gpus)}\t{utc(self.queued)}\t{utc(self.start)}\t{utc(self.end)}\t"
                f"{_fixed(self.wall_s, 3)}\t{_fixed(self.cpu_s, 3)}\t{_fixed(self.peak_rss_mb, 1)}\t"
                f"{_blank(self.exit_code)}\t{_blank(self.tokens)}\t{_blank(self.cost_usd)}\n").encode()


COLUMNS = TraceRow._fields
HEADER = ("\t".join(COLUMNS) + "\n").encode()
_SPACES = str.maketrans("\t\n\r", "   ")


def _clean(value: str) -> str:
    return value.translate(_SPACES) if "\t" in value or "\n" in value or "\r" in value else value


def _blank(value: object) -> object:
    return "" if value is None else value


def _fixed(value: float | None, places: int) -> str:
    return "" if value is None else f"{value:.{places}f}"


_second = [-1, ""]  # the last whole second formatted, and its text: rows come in time order


def utc(t: float | None) -> str:
    """``t`` (seconds since the epoch) as UTC ISO 8601 with milliseconds: ``2026-12-06T23:08:47.123Z``."""
    if t is None:
        return ""
    ms = round(t * 1000)
    second, milli = divmod(ms, 1000)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{milli:03d}Z"


def trace_path(run_dir: str) -> str:
    return os.path.join(run_dir, TRACE)


class Trace(JsonlWriter):
    """Appends ``TraceRow``s to ``path`` (see the module's doc). ``warn`` is told once if the trace stops;
    ``on`` is False from then on, and ``stopped`` says when and why."""

    record_name = "trace row"
    reserves = False  # no stop needs it: the trace stops on a full disk, the journal records the stop

    def __init__(self, path: str, warn: Callable[[str], None], sync_interval: float = 1.0) -> None:
        super().__init__(path, sync_interval=sync_interval, buffered=True)
        self.on = True
        self.stopped: str | None = None
        self._warn = warn
        self.on_full = self.stop
        if self._cut_torn_row() == 0:
            self._queued.append(HEADER)

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: a torn last row

    def add(self, row: TraceRow) -> None:
        """Queue ``row`` for the next ``flush`` (its line is made here, on the caller's thread)."""
        self._queued.append(row.line())

    def stop(self, exc: OSError) -> None:
        """Append nothing more: ``exc`` was met writing the file (from any thread; the first one counts)."""
        if not self.on:
            return
        self.on = False
        self.stopped = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._warn(f"{self.path} could not be written ({exc.strerror or exc}): the trace stops here; the "
                   "journal keeps every state change")

    def _cut_torn_row(self) -> int:
        """Cut off a last row that a killed runner left without its newline; return the file's size."""
        fd = self._fd
        assert fd is not None
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        start = max(0, size - 65536)  # a row is far shorter
        tail = os.pread(fd, size - start, start)
        if b"\n" not in tail and start:
            self._torn = True  # not a row of ours: the next one starts on a line of its own
            return size
        keep = start + tail.rfind(b"\n") + 1
        os.ftruncate(fd, keep)
        return keep

    def _write_or_keep(self, data: bytes) -> None:
        try:
            super()._write_or_keep(data)
        except OSError as exc:  # not a full disk (that one is kept and ``on_full`` is told): no more tries
            self.stop(exc)
