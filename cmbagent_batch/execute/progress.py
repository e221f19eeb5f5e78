"""Progress of a run on stderr: a live bar on a terminal, a line every few seconds in a log (Slurm)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

from cmbagent_batch.states import TaskState

if TYPE_CHECKING:
    from cmbagent_batch.execute.scheduler import Scheduler


class Progress:
    """The scheduler's ``tick``: shows its counts, at most every ``interval`` seconds and at the end."""

    def __init__(self, total: int, stream: IO[str] | None = None, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.total = total
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = ""

    def line(self, counts: Mapping[TaskState, int]) -> str:
        done = counts[TaskState.SUCCEEDED] + counts[TaskState.SKIPPED]
        failed = sum(counts[s] for s in (TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED,
                                         TaskState.INTERRUPTED, TaskState.BUDGET_EXCEEDED))
        running = counts[TaskState.RUNNING]
        pending = counts[TaskState.PENDING] + counts[TaskState.RETRYING]
        elapsed = time.monotonic() - self.start
        ran = max(done - counts[TaskState.SKIPPED], 0)
        eta = ""
        if ran and pending + running:
            eta = f", ETA {_clock(elapsed / ran * (pending + running))}"
        text = (f"{done}/{self.total} done, {running} running, {failed} failed, {pending} pending, "
                f"{_clock(elapsed)} elapsed{eta}")
        if self.tty:
            width = 24
            filled = int(width * (done + failed) / self.total) if self.total else width
            text = "[" + "#" * filled + "." * (width - filled) + "] " + text
        return text

    def __call__(self, sched: Scheduler) -> None:
        now = time.monotonic()
        finished = not any(sched.counts[s] for s in (TaskState.RUNNING, TaskState.PENDING, TaskState.RETRYING))
        if now - self._last < self.interval and not finished:
            return
        self._last = now
        text = self.line(sched.counts)
        if text == self._shown:
            return
        self._shown = text
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
