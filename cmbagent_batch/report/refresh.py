"""The run's own report: refreshed while the run goes on, and written once more as it ends.

A refresh is a ``cmbagent-batch report RUN_DIR`` process of its own, started from the scheduler's tick at
most every ``INTERVAL`` seconds (and at least ten times its last duration apart), one at a time: the
scheduler's thread only reads the clock on each tick and never waits for it, nor shares the interpreter's
lock with it. The last page is written once the scheduler is done: in the runner, with the run's own spec
and DAG, for a job of up to ``IN_PROCESS_MAX`` tasks; above, by a ``report`` process the runner waits for,
so that the page's reading of every record never adds to the runner's own memory, which holds the job
(a 10^5-task page takes about 150 MB and 1.5 s of its own). A job of more than ``RUN_WRITES_MAX`` tasks
gets no page from its run, which says so: reading its every record, and its spec again, would take more
memory than the run itself (about 1.2 GB at 10^6 tasks) and a core for a while; ``cmbagent-batch report``
writes it on demand. A report that cannot be written is a warning, never the run's failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from cmbagent_batch.report.job import JobView
from cmbagent_batch.report.page import REPORT, write_report

INTERVAL = 30.0
IN_PROCESS_MAX = 10_000  # tasks of a job whose last page the runner writes itself
RUN_WRITES_MAX = 200_000  # tasks of a job whose run writes its page at all


class Refresher:
    """Keeps ``RUN_DIR/report.html`` of the run in ``run_dir`` up to date (see the module's docstring)."""

    def __init__(self, run_dir: str, warn: Callable[[str], None], interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic, tasks: int = 0) -> None:
        self.path = os.path.join(run_dir, REPORT)
        self.off = tasks > RUN_WRITES_MAX  # too big for the run to write: ``skipped`` says so
        self._run_dir = run_dir
        self._warn = warn
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval
        self._spacing = interval
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._errors: IO[bytes] | None = None
        self._warned = False

    def tick(self, sched: Any = None) -> None:
        """On the scheduler's thread, every turn of its loop: a clock read, and rarely a process started."""
        now = self._clock()
        if now < self._next or self.off:
            return
        if self._proc is not None:
            if self._proc.poll() is None:  # the last refresh is still writing
                self._next = now + 1.0
                return
            self._spacing = max(self._interval, 10 * (now - self._started))
            self._reap()
        self._next = now + self._spacing
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115  # read and closed in _reap
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "cmbagent_batch", "report", self._run_dir],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._errors,
                                          start_new_session=True)
        except OSError as exc:
            self._say(f"could not refresh {self.path}: {exc}")
            self._proc = None
        self._started = now

    def around(self, tick: Callable[[Any], None]) -> Callable[[Any], None]:
        """The scheduler's ``tick``: ``tick`` (the progress line), then this."""
        def both(sched: Any) -> None:
            tick(sched)
            self.tick(sched)
        return both

    def finish(self, job: JobView | None, tasks: int = 0) -> str | None:
        """The run of ``tasks`` tasks has ended: stop a refresh under way and write the last page; its path,
        or None (said, or ``skipped`` says why)."""
        if self.off:
            return None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap(quiet=True)
        if tasks > IN_PROCESS_MAX:
            return self._in_a_process()
        try:
            return write_report(self._run_dir, self.path, job)[0]
        except Exception as exc:  # noqa: BLE001  # the run's results stand whatever the page's trouble
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            self._warn(f"could not write the run report {self.path}: {why}")
            return None

    def skipped(self, tasks: int) -> str:
        """Why the run wrote no page, and how to get one ("" when it wrote one)."""
        if not self.off:
            return ""
        return (f"report not written by the run ({tasks:,} tasks, over {RUN_WRITES_MAX:,}): "
                f"`cmbagent-batch report {os.path.dirname(self.path)}` writes it")

    def _in_a_process(self) -> str | None:
        """The last page, written by a ``report`` process of its own; its path, or None (said)."""
        try:
            done = subprocess.run([sys.executable, "-m", "cmbagent_batch", "report", self._run_dir],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  check=False)
        except OSError as exc:
            self._warn(f"could not write the run report {self.path}: {exc}")
            return None
        if done.returncode:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
            self._warn(f"could not write the run report {self.path}: "
                       + (lines[-1] if lines else f"exit code {done.returncode}"))
            return None
        return self.path

    def _reap(self, quiet: bool = False) -> None:
        proc, errors = self._proc, self._errors
        self._proc = self._errors = None
        if errors is None:
            return
        with errors:
            if proc is not None and proc.returncode and not quiet:
                errors.seek(0)
                lines = errors.read().decode("utf-8", "replace").strip().splitlines()
                self._say(f"could not refresh {self.path}: " + (lines[-1] if lines else f"exit code {proc.returncode}"))

    def _say(self, message: str) -> None:
        if not self._warned:  # once: a page that cannot be written now will not be on the next tick either
            self._warned = True
            self._warn(message)
