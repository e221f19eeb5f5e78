"""The states a task goes through during a run."""

from __future__ import annotations

from enum import Enum


class TaskState(str, Enum):
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
