"""The scheduler's ``record`` with the trace: the state journal's recorder, then, as each attempt ends,
its row of ``RUN_DIR/trace.tsv`` (``rundir/trace.py``), made from the task's run and the record.

An attempt has a row when its end is journaled with its attempt number: a success, a failure (``failed``,
or ``retrying`` when it runs again), a timeout, an attempt ended by a stop or abandoned (``interrupted``,
``cancelled``), one stopped by the LLM budget. An attempt that a stop kept from starting after it was
handed over is not an attempt (the task's next attempt takes its number): it has no row, nor has a task
that never started (``upstream_failed``, or cancelled before its launch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.place.booking import core_ranges
from cmbagent_batch.rundir.trace import Trace, TraceRow, trace_path
from cmbagent_batch.states import TaskState

FLUSH_S = 0.2  # rows are handed to the trace's writer thread at most this often (each hand-over wakes it)

Record = Callable[[TaskRun, dict[str, Any]], None]


class _Running:
    """What an attempt's ``running`` record said, kept until its end (one per attempt in flight)."""

    __slots__ = ("before", "host", "rank", "t")

    def __init__(self, t: float, rank: int | None, host: str | None, before: Outcome | None) -> None:
        self.t, self.rank, self.host = t, rank, host
        self.before = before  # the task's outcome as it started: an earlier attempt's, not this one's


class Traced:
    """Calls ``record`` (the journal's ``Recorder``) for each state change, then appends the row of an
    attempt that ended to ``trace`` (None: no trace). ``commit`` is the scheduler's: the journal's, then a
    hand-over of the rows to the trace's writer at most every ``FLUSH_S``."""

    def __init__(self, record: Record, commit: Callable[[], None], trace: Trace | None, run_id: str) -> None:
        self._record = record
        self._commit = commit
        self.trace = trace
        self._run = run_id
        self._epoch = time.time() - time.monotonic()  # the scheduler's clock (time.monotonic) to the epoch's
        self._running: dict[str, _Running] = {}
        self._due = 0.0

    def __call__(self, r: TaskRun, extra: dict[str, Any]) -> None:
        state = r.state
        if state is _RUNNING:
            self._record(r, extra)
            rank = extra.get("rank")
            self._running[r.id] = _Running(extra["t"], rank if rank is None or rank >= 0 else None,
                                           extra.get("host") or None, r.outcome)
            return
        attempt = extra.get("attempt")
        if attempt is None:  # no attempt ended
            self._record(r, extra)
            return
        end = extra["t"] = time.time()  # the record's time, and the row's
        self._record(r, extra)
        began = self._running.pop(r.id, None)
        if self.trace is not None and self.trace.on:
            self.trace.add(self._row(r, state, attempt, began, end))

    def _row(self, r: TaskRun, state: TaskState, attempt: int, began: _Running | None, end: float) -> TraceRow:
        o = r.outcome
        if began is not None and o is began.before:  # no outcome of its own (abandoned)
            o = None
        start = began.t if began is not None else None
        rank = o.rank if o is not None and o.rank is not None else (began.rank if began else None)
        host = (o.host if o is not None else None) or (began.host if began else None)
        p = r.placement
        if p is not None:
            nodes = ",".join(p.hosts)
            cores = ";".join(core_ranges(c) for c in p.cores)
            gpus = ";".join(",".join(g) for g in p.gpus) if any(p.gpus) else ""
        else:
            shape = r.shape
            nodes, cores, gpus = str(shape.nodes), str(shape.cpus), str(shape.gpus)
        measures = ((None if start is None else end - start, None, None, None, None, None) if o is None else
                    (o.wall_s, o.cpu_s, o.peak_rss_mb, o.exit_code, o.tokens, o.cost_usd))
        return TraceRow(self._run, r.id, r.kind, state._value_, attempt, rank, host, nodes, cores, gpus,
                        r.started + self._epoch, start, end, *measures)

    def commit(self) -> None:
        self._commit()
        if self.trace is not None and (now := time.monotonic()) >= self._due:
            self._due = now + FLUSH_S
            self.trace.flush()

    def close(self, warn: Callable[[str], None]) -> None:
        """Write out the trace; say if it stopped during the run (among the run's last lines)."""
        trace = self.trace
        if trace is None:
            return
        try:
            trace.close()
        except OSError as exc:
            trace.stop(exc)
        if trace.stopped is not None:
            warn(f"{trace.path} lacks the attempts that ended after {trace.stopped}: it could not be written")


def open_trace(run_dir: str, warn: Callable[[str], None]) -> Trace | None:
    """The run directory's trace, opened to append; None (said through ``warn``) where it cannot be."""
    path = trace_path(run_dir)
    try:
        return Trace(path, warn)
    except OSError as exc:
        warn(f"{path} cannot be opened ({exc.strerror or exc}): the run keeps no trace; the journal keeps every "
             "state change")
        return None


_RUNNING = TaskState.RUNNING
