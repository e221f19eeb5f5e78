"""The states a task goes through during a run."""

from __future__ import annotations

from enum import Enum

from cmbagent_batch.errors import ExitCode


class TaskState(str, Enum):
    """Where a task is in a run; ``value`` is what journals and ``run.json`` say."""

    PENDING = "pending"
    """Waiting for its dependencies, a worker or resources."""
    RUNNING = "running"
    """An attempt is running."""
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
    """Running or waiting when the job was interrupted (signal); it runs again on the next run."""
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
