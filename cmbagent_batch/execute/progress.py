"""Progress of a run on stderr: a live bar on a terminal, a line every few seconds in a log (Slurm), and
the last line when the run ends."""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING

from cmbagent_batch.states import Tally, TaskState

if TYPE_CHECKING:
    from cmbagent_batch.execute.scheduler import Scheduler
    from cmbagent_batch.place.booking import Booking


class Progress:
    """The scheduler's ``tick``: shows its tally, at most every ``interval`` seconds and at the end."""

    def __init__(self, total: int, stream: IO[str] | None = None, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.total = total
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = ""

    def line(self, tally: Tally, finished: bool = False, booked: Booking | None = None) -> str:
        """``8/17 done: 2 running, 3 queued, 4 pending, 8 succeeded; 0:03 elapsed, ETA 0:04``: each state by
        the name the run's last line and ``status`` give it; with a booking, ``; 3/4 CPUs busy, 1/2 GPUs``."""
        done = tally.done
        elapsed = time.monotonic() - self.start
        ahead = sum(tally[s] for s in (TaskState.RUNNING, TaskState.QUEUED, TaskState.PENDING, TaskState.RETRYING))
        ran = tally[TaskState.SUCCEEDED]
        eta = f", ETA {_clock(elapsed / ran * ahead)}" if ran and ahead and not finished else ""
        text = f"{done}/{self.total} done: {tally.text()}; {_clock(elapsed)} elapsed{eta}"
        if booked is not None and not finished:
            text += f"; {booked.busy_cpus}/{booked.total_cpus} CPUs busy"
            if booked.total_gpus:
                text += f", {booked.busy_gpus}/{booked.total_gpus} GPUs"
        if self.tty:
            width = 24
            ended = self.total - ahead
            filled = int(width * ended / self.total) if self.total else width
            text = "[" + "#" * filled + "." * (width - filled) + "] " + text
        return text

    def __call__(self, sched: Scheduler) -> None:
        now = time.monotonic()
        finished = sched.finished
        if now - self._last < self.interval and not finished:
            return
        self._last = now
        text = self.line(Tally.from_counts(sched.counts), finished, sched.admission.limits.booking)
        if text == self._shown and not finished:
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
