"""What a runner receives and returns: plain, picklable data (it may cross a process boundary)."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cmbagent_batch.states import OutcomeReason

WORK_SUBDIRS = ("data", "codebase", "logs", "outputs", "temp", "chats", "cost")


class Sharding(enum.Enum):
    """How a run directory places each task's directories (RUN_DIR/layout.json says which: ``rundir.layout``)."""

    FLAT = "flat"  # RUN_DIR/outputs/TASK: run directories made before shards
    SHARDED = "sharded"  # RUN_DIR/outputs/S/TASK, S the task's shard


class Stopped(Exception):
    """The run is stopping: an attempt that has not started yet does not start. ``str()`` is the
    reason's message (the attempt's error)."""

    def __init__(self, reason: OutcomeReason = OutcomeReason.NOT_STARTED) -> None:
        super().__init__(reason)  # the reason alone in ``args``: it pickles and unpickles as it is
        self.reason = reason

    def __str__(self) -> str:
        return self.reason.message


class Gate(Protocol):
    """Where an attempt waits for a free slot of its pool before it starts (threads only)."""

    def enter(self, start: Callable[[], Any] | None = None) -> Any:
        """Wait for a slot; raise ``Stopped`` if the run is stopping. ``start`` is called once the slot is
        this attempt's, perhaps on the thread that freed it (so it must not need this thread); its result
        is returned."""

    def leave(self, ok: bool) -> None:
        """The attempt ended: a success gives its slot back at once. A failure keeps it until ``settle``,
        so no other attempt starts before the scheduler has seen the failure (fail-fast stops them)."""

    def withdraw(self) -> None:
        """The attempt ends without having entered (no slot is kept for it any longer)."""

    def settle(self) -> None:
        """Give back a slot kept by a failure (called by the scheduler once it has handled the end)."""


@dataclass(frozen=True)
class TaskContext:
    """Where and as what one attempt runs. Given to python callables that accept ``ctx``."""

    task_id: str
    run_dir: str  # absolute
    work_dir: str  # absolute: RUN_DIR/ranks/rank-NNNN/tasks/S/TASK
    rank: int
    attempt: int  # 1-based
    host: str
    matrix: dict[str, Any] = field(default_factory=dict)
    sharding: Sharding = Sharding.FLAT  # the run directory's: where the task's outputs are published
    # Where it was placed: (name, value) of CMBAGENT_LAUNCH, its GPUs... for its environment (a tuple: the
    # empty default is shared, and costs an unplaced attempt nothing to make or to send to a worker).
    launch: tuple[tuple[str, str], ...] = ()

    def sub(self, name: str) -> str:
        """A subdirectory of the work directory: data, codebase, logs, outputs, temp, chats, cost.

        Created when asked for: python tasks get only their work directory up front (thousands of
        tiny tasks would otherwise spend their time in mkdir)."""
        path = os.path.join(self.work_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def outputs_dir(self) -> str:
        return os.path.join(self.work_dir, "outputs")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.work_dir, "logs")

    @property
    def temp_dir(self) -> str:
        return self.sub("temp")


@dataclass(frozen=True)
class Payload:
    """One task, as plain data a worker process can unpickle (no mapping proxies)."""

    id: str
    kind: str
    run: str | None = None
    call: str | None = None
    args: Any = None
    env: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    timeout: float | None = None
    python_path: tuple[str, ...] = ()  # prepended to sys.path for python tasks (the spec's directory)
    agent: dict[str, Any] | None = None  # agent tasks: what the agent process needs (tasks/agent.py), no secret
    # tasks that call models (``models``, and agent tasks): their grant but for the attempt's place (``Grant``
    # without task, attempt, rank, host, run_dir), a local model's server to start in "local"; no secret
    models: dict[str, Any] | None = None


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt."""

    ok: bool
    error: str | None = None  # one line: why it failed
    traceback: str | None = None  # python tasks: the worker's traceback
    exit_code: int | None = None  # shell: exit status; negative: killed by that signal
    timed_out: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    result_file: str | None = None  # python: where the JSON of the return value went
    worker_died: bool = False  # the worker process running it died (``backends.processes``)
    work_bytes: int | None = None  # bytes left in the work directory when the attempt ended
    output_bytes: int | None = None  # bytes published under RUN_DIR/outputs/S/TASK
    budget_exceeded: bool = False  # a task that calls models: stopped, or not started, because an LLM budget was spent
    rank: int | None = None  # MPI backend: the rank that ran the attempt and its host
    host: str | None = None
    work_dir: str | None = None  # where the attempt ran (set by the runner)
    reason: OutcomeReason | None = None  # why it ended, where the runner decides on it (``error`` says it)
    steps: tuple[str, ...] = ()  # the Slurm job steps its $CMBAGENT_LAUNCH started (JOB.STEP), in order
    tokens: int | None = 0  # prompt + completion tokens of its LLM calls through the gateway (None: not known)
    cost_usd: float | None = 0.0  # and their cost in USD, as the ledger prices them

    @classmethod
    def because(cls, reason: OutcomeReason, **measures: Any) -> Outcome:
        """A failed attempt that ended for ``reason``; its error is the reason's message."""
        return cls(ok=False, error=reason.message, reason=reason, **measures)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one task: everything the worker that runs it needs, as one picklable unit (the
    executor never opens it). The gate it waits at is not part of it: a gate belongs to the process
    that made it and is passed beside the attempt (``run_attempt(attempt, gate)``)."""

    payload: Payload
    ctx: TaskContext
    links: Sequence[tuple[str, str]]  # input files to link into the work directory: (source, relative path)
    env: Mapping[str, str]  # the environment shell and agent tasks start from (empty: the worker's own)
    chdir: bool  # python tasks in worker processes run in their work directory (``isolation: process``)
    keep: Sequence[str]  # what retention keeps of the work directory
    kill_grace: float = 5.0  # seconds between SIGTERM and SIGKILL when a task is ended
    missing: Sequence[str] = ()  # inputs not found: the attempt fails with these, without running
    priority: float = 0.0  # its task's bottom level: the most urgent waiting attempt goes first (MPI ranks)
    journal: Mapping[str, Any] | None = None  # MPI: what the worker's journal adds to a success (run id,
    # fingerprints); None: the attempt is journaled by rank 0 alone

    def __reduce__(self) -> tuple[type[Attempt], tuple[Any, ...]]:
        # Pickled as its fields in order, as cheap as a tuple (the generic slots state costs twice that):
        # every attempt under MPI, or in a process pool, crosses this way.
        return Attempt, (self.payload, self.ctx, self.links, self.env, self.chdir, self.keep, self.kill_grace,
                         self.missing, self.priority, self.journal)
