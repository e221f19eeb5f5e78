"""One worker process for python tasks (``backends.processes``): its life inside (``serve_calls``) and as the
thread of its parent that runs it sees it (``Worker``).

The worker writes, in memory it shares with its parent, which attempt of its call it is running and when
that call is due to end (``Worker.running``, ``Worker.run``); it reports the outcomes of its attempts in
lists. A worker process leads its own process group (what a python task starts ends with it), outside the
terminal's. Under MPI it leaves the launcher's variables (``PMI_*``) behind: it is not one of the job's MPI
processes.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - before the atexit hook below, which must run before its exit handler
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from cmbagent_batch import watchdog
from cmbagent_batch.attempt import Attempt, Outcome
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.python import watch_timeouts
from cmbagent_batch.tasks.runner import run_attempt

if TYPE_CHECKING:
    from cmbagent_batch.place.launch import TaskSteps

REPORT_EVERY = 0.01  # seconds: how long a worker may keep the outcomes of tiny attempts before reporting them
WATCH_EVERY = 0.25  # seconds: how often the parent looks at a running call's deadline
_MPI_JOB_VARIABLES = ("PMI_", "PMIX_", "PMI2_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDI_", "OMPI_")
# The shared memory of one worker: which attempt of its call (-1: none yet; 2i+1: attempt i runs; 2i+2:
# attempt i has ended) and when the running call must be over (monotonic seconds; 0.0: no deadline).
_PROGRESS, _DUE = 0, 1


@dataclass
class Ran:
    """What came back of a call to one worker."""

    outcomes: list[Outcome]
    gone: bool = False  # the worker died, or was killed
    running: int | None = None  # the attempt it was running then (an index in the call)
    started: bool = True  # it started an attempt of the call


_live: set[Worker] = set()  # workers not closed yet: ended at exit, before multiprocessing joins them
# A forkserver child's exit status is read once from its sentinel, and ``Process.start`` reads those of
# every other child (``multiprocessing.process._cleanup``): two threads reading one at once leave one of
# them with 255 instead of, say, -9 (SIGKILL). Starts, joins and exit codes go one thread at a time.
_reaping = threading.Lock()


class Worker:
    """One worker process, seen from its thread in the parent."""

    def __init__(self, process: Any, conn: Connection, shared: Any) -> None:
        self.process = process
        self.conn = conn
        self.shared = shared
        self.reported_at = 0.0  # monotonic: when it last reported
        self.killed_for_timeout = False
        self.attempts: Sequence[Attempt] = ()  # those of the call it runs
        self.steps: TaskSteps | None = None  # the job steps of the attempt it runs, once a stop ends them

    @classmethod
    def start(cls, context: Any, held: Any) -> Worker:
        parent, child = context.Pipe()
        shared = context.RawArray("d", 2)
        # Not a daemon: a python task may start processes of its own (multiprocessing.Pool, ...).
        process = context.Process(target=serve_calls, args=(child, held, shared), name="python-worker")
        with _reaping:
            process.start()
        child.close()
        watchdog.track(process.pid)  # it leads its own group: ended by the watchdog if this process dies
        worker = cls(process, parent, shared)
        _live.add(worker)
        return worker

    def alive(self) -> bool:
        return not wait([self.process.sentinel], 0)

    def run(self, attempts: Sequence[Attempt]) -> Ran:
        """Send the attempts and collect their outcomes as the worker reports them, until all are in or
        it is gone (dead, or killed because a call overran its deadline)."""
        self.shared[_PROGRESS] = -1.0
        self.shared[_DUE] = 0.0
        self.attempts, self.steps = attempts, None
        try:
            self.conn.send(list(attempts))
        except OSError:  # it died between calls (say, the OOM killer while idle): none started
            return self._gone([], attempts)
        self.reported_at = time.monotonic()
        timed = any(a.payload.timeout is not None for a in attempts)
        outcomes: list[Outcome] = []
        while len(outcomes) < len(attempts):
            ready = wait([self.conn, self.process.sentinel], WATCH_EVERY if timed else None)
            if not ready:
                due = self.shared[_DUE]
                if due and time.monotonic() > due:
                    self.killed_for_timeout = True
                    return self._gone(outcomes, attempts)
                continue
            if self.conn in ready:
                try:
                    outcomes += self.conn.recv()
                    self.reported_at = time.monotonic()
                    continue
                except (EOFError, OSError):
                    pass
            return self._gone(outcomes, attempts)
        return Ran(outcomes)

    def _gone(self, outcomes: list[Outcome], attempts: Sequence[Attempt]) -> Ran:
        """It died or must die: end its process group (what its tasks started too), read what it reported
        before, and find the attempt it was running."""
        self.signal(signal.SIGKILL)  # before it is reaped: its group id cannot have been reused yet
        self._join()
        try:
            while len(outcomes) < len(attempts) and self.conn.poll(0):
                outcomes += self.conn.recv()
        except (EOFError, OSError):
            pass
        running = self._running()
        if running is not None and running < len(outcomes):
            running = None  # it reported that one after all
        return Ran(outcomes, gone=True, running=running, started=self.shared[_PROGRESS] >= 0)

    def _running(self) -> int | None:
        """The index in its call of the attempt it is running; None between two."""
        progress = int(self.shared[_PROGRESS])
        return (progress - 1) // 2 if progress > 0 and progress % 2 == 1 else None

    def attempt(self) -> Attempt | None:
        """The attempt it is running; None between two."""
        running = self._running()
        return self.attempts[running] if running is not None and running < len(self.attempts) else None

    def _join(self) -> None:
        with _reaping:
            self.process.join(5)

    def signal(self, signum: int) -> None:
        pid = self.process.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signum)
        except OSError:  # not its own group yet (it is starting): the process alone
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def exitcode(self) -> int | None:
        with _reaping:
            code = self.process.exitcode
        return int(code) if code is not None else None

    def death(self) -> str:
        """How it died, in a few words: ``SIGSEGV``, ``SIGKILL (...)``, ``exit status 3``."""
        code = self.exitcode()
        if code is None:
            return "it closed its pipe"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"{name} (killed: out of memory, or by another process)" if code == -signal.SIGKILL else name
        return f"exit status {code} (the process exited: os._exit, or a C library called exit)"

    def close(self) -> None:
        """Tell it to end, then end its process group (what its tasks left behind), and reap it."""
        _live.discard(self)
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.conn.close()
        wait([self.process.sentinel], 2)
        self.signal(signal.SIGKILL)
        self._join()
        watchdog.untrack(self.process.pid)

def kill_all(workers: list[Worker]) -> None:
    for w in workers:
        w.signal(signal.SIGKILL)


@atexit.register
def _end_live_workers() -> None:
    """At exit, the workers still there are ended (multiprocessing would otherwise wait for them)."""
    for w in list(_live):
        w.close()


# --- in the worker process ------------------------------------------------------------------------


def serve_calls(conn: Connection, held: Any, shared: Any) -> None:
    """A worker process's life: run each list of attempts it is sent, until it is sent None or its pipe
    closes. It reports their outcomes in lists, at most ``REPORT_EVERY`` seconds apart and at the end
    of a call, and keeps ``shared`` up to date: which attempt it is running, and when a call with a
    timeout is due to end (its ``kill_grace`` included)."""
    os.setpgid(0, 0)
    for name in [n for n in os.environ if n.startswith(_MPI_JOB_VARIABLES)]:
        del os.environ[name]
    grace = [0.0]

    def due(at: float) -> None:
        shared[_DUE] = at + grace[0] if at else 0.0

    watch_timeouts(due)
    while True:
        try:
            attempts = conn.recv()
        except (EOFError, OSError):
            return
        if attempts is None:
            return
        report: list[Outcome] = []
        reported = time.monotonic()
        last = len(attempts) - 1
        for i, a in enumerate(attempts):
            shared[_PROGRESS] = 2 * i + 1
            grace[0] = a.kill_grace
            if held.value and i > 0:  # the first was reported started as it was handed over: it runs
                report.append(Outcome.because(OutcomeReason.NOT_STARTED))
            else:
                report.append(run_attempt(a))
            shared[_PROGRESS] = 2 * i + 2
            now = time.monotonic()
            if i == last or now - reported >= REPORT_EVERY:
                conn.send(report)
                report = []
                reported = now
