"""The states a task goes through during a run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from cmbagent_batch.errors import ExitCode


class TaskState(str, Enum):
    """Where a task is in a run; ``value`` is what journals and ``run.json`` say."""

    PENDING = "pending"
    """Waiting for its dependencies, a worker or resources."""
    QUEUED = "queued"
    """Handed to a worker ahead of a free slot (or behind another task of its batch), not started yet.
    The scheduler's alone, never journaled: a stop that keeps it from starting ends it not run."""
    RUNNING = "running"
    """Its attempt has started: a process or thread runs the task now (of a batch of tiny tasks, which a
    worker runs one after the other, the first counts as running until the batch ends)."""
    RETRYING = "retrying"
    """An attempt failed; the next one waits out its backoff."""
    SUCCEEDED = "succeeded"
    """Finished with success; its outputs are published."""
    SKIPPED = "skipped"
    """Succeeded in an earlier run with the same inputs and spec: not run again."""
    FAILED = "failed"
    """Every attempt failed (exit code, exception, timeout, missing output)."""
    UPSTREAM_FAILED = "upstream_failed"
    """Not run because a task it depends on failed; the state's reason names the root task."""
    CANCELLED = "cancelled"
    """Not run because the job stopped launching (fail-fast)."""
    INTERRUPTED = "interrupted"
    """Running, or handed over to a worker, when the job was interrupted (signal); it runs again on the
    next run."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """Not run, or stopped, because the LLM budget was spent."""


FINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.SKIPPED,
        TaskState.FAILED,
        TaskState.UPSTREAM_FAILED,
        TaskState.CANCELLED,
        TaskState.INTERRUPTED,
        TaskState.BUDGET_EXCEEDED,
    }
)
DONE_STATES = frozenset({TaskState.SUCCEEDED, TaskState.SKIPPED})
FAILED_STATES = frozenset({TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.BUDGET_EXCEEDED})
# Tasks a run left to do: a rerun (or a Slurm requeue) continues them.
LEFT_STATES = frozenset({TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING,
                         TaskState.INTERRUPTED})

# The order a tally names states in: what happens now, then how tasks ended.
_TOLD = (TaskState.RUNNING, TaskState.QUEUED, TaskState.RETRYING, TaskState.PENDING, TaskState.SUCCEEDED,
         TaskState.SKIPPED, TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.BUDGET_EXCEEDED,
         TaskState.CANCELLED, TaskState.INTERRUPTED)
_BY_VALUE = {s.value: s for s in TaskState}


@dataclass(frozen=True)
class Tally:
    """How many tasks are in each state. The progress line, ``status``, the run's last line, the Slurm
    job's log and ``run.json`` all say it through ``text`` (or ``to_json``), so their words and numbers
    agree: each state by its own name, none lumped into another."""

    counts: Mapping[TaskState, int]

    @classmethod
    def of(cls, states: Iterable[TaskState]) -> Tally:
        """The tally of tasks in ``states`` (one item per task)."""
        return cls(MappingProxyType(dict(Counter(states))))

    @classmethod
    def from_counts(cls, counts: Mapping[TaskState, int]) -> Tally:
        """A copy of counts kept elsewhere (the scheduler's, updated at each state change)."""
        return cls(MappingProxyType({s: n for s, n in counts.items() if n}))

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Tally:
        """``run.json``'s "counts"; a state this version does not know (a newer one wrote it) counts as
        interrupted, as the journal's replay reads it."""
        counts: Counter[TaskState] = Counter()
        for name, n in data.items():
            counts[_BY_VALUE.get(name, TaskState.INTERRUPTED)] += int(n)
        return cls(MappingProxyType(dict(counts)))

    def __getitem__(self, state: TaskState) -> int:
        return self.counts.get(state, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Succeeded, in this run or an earlier one."""
        return self[TaskState.SUCCEEDED] + self[TaskState.SKIPPED]

    @property
    def left(self) -> int:
        """Not run to an end yet: a rerun (or a requeue) continues them."""
        return sum(self[s] for s in LEFT_STATES)

    def text(self) -> str:
        """``8 succeeded, 1 failed, 1 upstream_failed, 7 cancelled``: every state with tasks, by its name."""
        return ", ".join(f"{self[s]} {s.value}" for s in _TOLD if self[s]) or "no tasks"

    def to_json(self) -> dict[str, int]:
        """The states with tasks, by name (sorted), as ``run.json`` and ``status --format json`` say."""
        return {s.value: n for s, n in sorted(self.counts.items(), key=lambda item: item[0].value) if n}


class OutcomeReason(str, Enum):
    """Why an attempt ended without running to its own end, where the runner needs to know (it decides
    on it: a stop's casualty is not charged as the task's failure). ``message`` is what people read."""

    TERMINATED_BY_RUNNER = "terminated_by_runner"
    """The runner ended its process group (a stop, a walltime drain running out)."""
    NOT_STARTED = "not_started"
    """Handed over, then a stop kept it from starting (at its gate, or before bash started)."""
    CANCELLED = "cancelled"
    """Cancelled before it started: by the executor, or by a worker that held it back."""
    WORKER_DIED = "worker_died"
    """The worker process running it died (killed, or out of memory)."""
    DISK_FULL = "disk_full"
    """Its work directory or outputs could not be written: no space left (or the quota is used up)."""

    @property
    def message(self) -> str:
        """The one-line error of an attempt that ended for this reason (the journal's, the user's)."""
        return _OUTCOME_MESSAGES[self]


_OUTCOME_MESSAGES = {
    OutcomeReason.TERMINATED_BY_RUNNER: "terminated by the runner",
    OutcomeReason.NOT_STARTED: "terminated by the runner before it started",
    OutcomeReason.CANCELLED: "cancelled before it started",
    OutcomeReason.WORKER_DIED: "the worker process running it died (killed, or out of memory)",
    OutcomeReason.DISK_FULL: "no space left on the run directory's file system",
}


class StopReason(str, Enum):
    """Why a run stopped launching; ``value`` is what ``run.json`` ("stop_reason") and messages say."""

    SIGINT = "SIGINT"
    """Interrupted (Ctrl-C): the running attempts are terminated."""
    SIGTERM = "SIGTERM"
    """Terminated (``kill``, Slurm's end of the job): the running attempts are terminated."""
    SIGUSR1 = "SIGUSR1"
    """Slurm's warning before the walltime (or the walltime file): a drain may let attempts finish."""
    FAIL_FAST = "fail-fast"
    """A task failed and ``keep_going`` is off: nothing more is launched."""
    DISK_FULL = "disk-full"
    """The run directory's file system is full (or the quota used up): nothing more starts, the running
    attempts are terminated, the journal keeps what it has; a rerun continues once there is space."""

    @property
    def exit_code(self) -> ExitCode | None:
        """The run's exit code when this stop left tasks undone; None: the tasks' states decide."""
        return _STOP_EXIT_CODES.get(self)

    @property
    def interrupts(self) -> bool:
        """A signal or a full disk: the run is "interrupted" and a rerun (or a requeue) continues it."""
        return self in _STOP_EXIT_CODES


_STOP_EXIT_CODES = {
    StopReason.DISK_FULL: ExitCode.FAILED,
    StopReason.SIGINT: ExitCode.SIGINT,
    StopReason.SIGTERM: ExitCode.SIGTERM,
    StopReason.SIGUSR1: ExitCode.SIGUSR1,
}
