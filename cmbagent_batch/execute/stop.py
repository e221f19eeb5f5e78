"""Everything about stopping a run, in one place: where a stop comes from (SIGINT, SIGTERM, SIGUSR1 or
the walltime file, fail-fast), how the scheduler carries it out (``StopControl``: at once, or after a
drain that lets the running attempts finish), what the user is told, and the exit code it leaves.

Signals stop launching, end running attempts and leave a state the next run resumes from; SIGUSR1
(Slurm's warning before the walltime) may first let the running attempts finish (``walltime_grace``).
Only rank 0 acts on them (worker ranks end their own tasks when rank 0 says so).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from types import FrameType
from typing import Any

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.errors import ExitCode
from cmbagent_batch.execute.runs import DrainEvent, DrainStep
from cmbagent_batch.states import DONE_STATES, FAILED_STATES, OutcomeReason, StopReason, TaskState

# Outcomes that say the runner itself ended the attempt (or kept it from starting).
_BY_THE_RUNNER = frozenset({OutcomeReason.TERMINATED_BY_RUNNER, OutcomeReason.NOT_STARTED, OutcomeReason.DISK_FULL})
# How a worker process ends when the job's processes are told to stop (Slurm signals all of them at the walltime).
_STOP_SIGNALS = frozenset({-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT})

Request = Callable[[StopReason, float], None]  # request a stop: reason, drain seconds


class StopAction(Enum):
    """What the scheduler does about a requested stop, now."""

    WAIT = "wait"  # a drain is on: the running attempts go on
    HOLD = "hold"  # a drain starts: hold back what has not started
    DEADLINE = "deadline"  # the drain ran out: terminate the running attempts
    HURRY = "hurry"  # another request cut the drain short: terminate the running attempts
    TERMINATE = "terminate"  # no drain: terminate the running attempts


class StopControl:
    """The stop's state machine. ``request`` may be called from a signal handler (it only sets fields);
    the rest runs on the scheduler thread."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None  # the first request's, which stays the stop's reason
        self.drain = 0.0  # seconds the stop lets running attempts go on
        self.hurry: StopReason | None = None  # a later request, which cuts a drain short
        self.deadline: float | None = None  # when a drain that started ends
        self.terminated_at: float | None = None  # when the running attempts were told to end

    def request(self, reason: StopReason, drain: float = 0.0) -> None:
        """Stop launching and end the running attempts: at once or, with ``drain`` > 0, those still
        running ``drain`` seconds from now. Another request during the drain ends it at once."""
        if self.reason is None:
            self.drain = drain
            self.reason = reason  # set last: the scheduler thread reads it first
        elif self.hurry is None:
            self.hurry = reason

    def next_action(self, now: float) -> StopAction:
        """Hold back what has not started and let the running attempts drain, or end them: at once (no
        drain, or another request came), or when the drain's deadline has passed."""
        if self.deadline is None and self.drain > 0 and self.hurry is None:
            self.deadline = now + self.drain
            return StopAction.HOLD
        action = StopAction.TERMINATE
        if self.deadline is not None:
            if self.hurry is None and now < self.deadline:
                return StopAction.WAIT
            action = StopAction.DEADLINE if self.hurry is None else StopAction.HURRY
        self.terminated_at = now
        return action

    def event(self, action: StopAction, running: int) -> DrainEvent:
        """The drain step ``action`` is, for the user."""
        assert self.reason is not None
        if action is StopAction.HOLD:
            return DrainEvent(DrainStep.HOLD, self.reason, running, self.drain)
        if action is StopAction.HURRY and self.hurry is not None:
            return DrainEvent(DrainStep.HURRY, self.hurry, running, self.drain)
        return DrainEvent(DrainStep.DEADLINE, self.reason, running, self.drain)

    @property
    def draining(self) -> bool:
        """A stop with a drain: nothing starts, the running attempts go on until the deadline."""
        return self.deadline is not None and self.terminated_at is None

    def ended_by_stop(self, outcome: Outcome, not_started: bool) -> bool:
        """Whether a failed attempt failed because the job is stopping. While a drain lets attempts
        finish, one that fails has failed, unless it was held back, its worker process was signalled to
        stop (SIGTERM, SIGKILL, SIGINT; a segfault is the task's own failure), or it was terminated by the
        runner (say, on a worker rank that got the walltime's SIGTERM before rank 0)."""
        if not self.draining:
            return True
        stopped = outcome.worker_died and outcome.exit_code in _STOP_SIGNALS
        return not_started or stopped or outcome.reason in _BY_THE_RUNNER

    @property
    def fail_fast(self) -> bool:
        return self.reason is StopReason.FAIL_FAST

    @property
    def final_state(self) -> TaskState:
        """What a task the stop kept from running (or ended) becomes: cancelled by fail-fast, else
        interrupted (a rerun continues it)."""
        return TaskState.CANCELLED if self.reason is StopReason.FAIL_FAST else TaskState.INTERRUPTED


# --- where stops come from ------------------------------------------------------------------------


@contextmanager
def stop_sources(request: Request, walltime_grace: float, walltime_file: str | None) -> Iterator[None]:
    """While inside: SIGINT and SIGTERM end the running attempts at once; so does SIGUSR1, Slurm's warning
    before the walltime, unless ``walltime_grace`` lets them finish first (a later signal ends them at
    once); ``walltime_file`` appearing means the same as SIGUSR1."""
    previous = _install_signals(request, walltime_grace)
    watching = watch_file(walltime_file, lambda: request(StopReason.SIGUSR1, walltime_grace))
    try:
        yield
    finally:
        watching.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_signals(request: Request, walltime_grace: float) -> dict[int, Any]:
    def stop(reason: StopReason, drain: float) -> Callable[[int, FrameType | None], None]:
        return lambda signum, frame: request(reason, drain)

    previous = {}
    for reason in (StopReason.SIGINT, StopReason.SIGTERM, StopReason.SIGUSR1):
        signum = getattr(signal, reason.value)
        drain = walltime_grace if reason is StopReason.SIGUSR1 else 0.0
        previous[signum] = signal.signal(signum, stop(reason, drain))
    return previous


def watch_file(path: str | None, warned: Callable[[], None]) -> threading.Event:
    """Call ``warned`` once ``path`` exists (polled every 0.5 s, on a thread of its own) until the returned
    event is set. A job script's way to pass on Slurm's walltime warning to rank 0 alone: through srun, a
    signal reaches every process of the job step, the tasks' own included."""
    done = threading.Event()
    if path is None:
        return done

    def poll() -> None:
        while not done.wait(0.5):
            if os.path.exists(path):
                warned()
                return

    threading.Thread(target=poll, name="walltime-file", daemon=True).start()
    return done


# --- what the user is told, and the exit code -----------------------------------------------------


def drain_message(event: DrainEvent) -> str:
    """What the user reads when a stop with a drain holds new tasks back, and when it ends the rest."""
    reason = event.reason
    what = f"{reason.value} (walltime warning)" if reason is StopReason.SIGUSR1 else reason.value
    n, one = event.running, event.running == 1
    tasks = f"{n} running task{'' if one else 's'}"
    if event.what is DrainStep.HOLD:
        return (f"cmbagent-batch: {what}: no new task starts; {tasks} get{'s' if one else ''} up to "
                f"{event.seconds:g} s to finish")
    if event.what is DrainStep.DEADLINE:
        return (f"cmbagent-batch: {what}: {n} task{'' if one else 's'} still running after {event.seconds:g} s: "
                f"terminating {'it' if one else 'them'}")
    return f"cmbagent-batch: {what} during the walltime grace: terminating the {tasks} now"


def say_drain(event: DrainEvent) -> None:
    """Called on the scheduler thread (printing in a signal handler could deadlock on stderr's lock)."""
    erase = "\r\033[K" if sys.stderr.isatty() else ""  # a progress bar drawn on the line
    print(erase + drain_message(event), file=sys.stderr, flush=True)


def cut_short(counts: Mapping[TaskState, int]) -> bool:
    """Whether a stop left tasks undone: one that came as the last tasks were ending (a walltime warning
    whose drain saw them finish) ends the run as if none had come."""
    return any(n for s, n in counts.items() if s not in DONE_STATES)


def stop_that_counts(reason: StopReason | None, counts: Mapping[TaskState, int]) -> StopReason | None:
    """The stop reason ``run.json`` records: none when the stop left nothing undone."""
    return reason if reason is not None and cut_short(counts) else None


def exit_code(reason: StopReason | None, counts: Mapping[TaskState, int]) -> int:
    """A signal's exit code when its stop left tasks undone; else 1 if any task failed or was not run."""
    if reason is not None and reason.exit_code is not None and cut_short(counts):
        return int(reason.exit_code)
    bad = sum(counts[s] for s in FAILED_STATES | {TaskState.CANCELLED, TaskState.INTERRUPTED})
    return int(ExitCode.FAILED) if bad else int(ExitCode.OK)
