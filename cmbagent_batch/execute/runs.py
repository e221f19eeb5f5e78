"""What the scheduler works with: each task's run, the limits and options it launches by, and the pools
it hands attempts to (a protocol: the scheduler does not know if these are threads, processes or MPI
ranks, and does not import the backends)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cmbagent_batch.attempt import Attempt, Gate, Outcome
from cmbagent_batch.place.booking import Booking, Placement
from cmbagent_batch.spec.model import Resources
from cmbagent_batch.states import StopReason, TaskState


class Pools(Protocol):
    """Where attempts run; the scheduler does not know if these are threads, processes or MPI ranks."""

    def executor_for(self, kind: str) -> Executor: ...

    def gate(self, kind: str, on_start: Callable[[], None]) -> Gate | None:
        """What reports that a submission of ``kind`` really started, by calling ``on_start`` once: where
        its attempt waits for a free slot, or what the worker that begins it (its first, for a batch)
        reports back through. None: it counts as started when it is submitted."""

    def submit(self, executor: Executor, attempts: Sequence[Attempt], gate: Gate | None) -> Future[Any]:
        """Hand one attempt or a batch of them, with the submission's gate, to ``executor``, with whatever
        runs them there; the result is the attempt's ``Outcome``, or the batch's list of them."""

    def batches(self, kind: str) -> float:
        """Seconds of work a batch of tiny attempts of ``kind`` holds, handed to a worker in one submission
        (0: one attempt per submission): long enough that the round trip costs little beside the work."""

    def hold(self) -> None:
        """Start nothing more: what was handed over and has not started ends as not started (a gate
        refuses it, a queued call is cancelled); running attempts go on."""

    def terminate_running(self, grace: float) -> None: ...


@dataclass
class Limits:
    max_workers: int
    cpus: int  # CPU cores that task reservations may add up to
    memory_mb: float | None  # memory that task reservations may add up to (None: no reservation limit)
    memory_safety_fraction: float = 0.8
    memory_in_use: Callable[[], float] | None = None  # fraction of memory in use now (psutil)
    # Kinds whose attempts may be handed over ahead of a free worker (up to ``prefetch`` more submissions
    # than max_workers), so a worker never idles waiting for this thread's next submission. Safe where
    # the pool itself bounds what executes: a gate (thread pool slots) or one attempt per worker process.
    prefetch_kinds: frozenset[str] = frozenset()
    prefetch: int = 0
    # Cores, GPUs and memory booked per node (None: reservations are counted against cpus and memory_mb).
    booking: Booking | None = None
    backfill_s: float = 60.0  # how long a task that does not fit may be passed by smaller ones (backfill)


@dataclass
class Options:
    keep_going: bool = False
    retries: int = 0
    retry_backoff: float = 1.0  # seconds before the 2nd attempt; doubles each time, with jitter
    kill_grace: float = 5.0


class DrainStep(str, Enum):
    """A step of a stop with a drain."""

    HOLD = "hold"
    """Nothing new starts; the running attempts may finish."""
    DEADLINE = "deadline"
    """The drain ran out: the attempts still running are terminated."""
    HURRY = "hurry"
    """Another stop request came during the drain: the running attempts are terminated now."""


@dataclass(frozen=True)
class DrainEvent:
    """A step of a stop with a drain, for the user (the caller says it)."""

    what: DrainStep
    reason: StopReason  # the request that started the drain; for HURRY, the one that cut it short
    running: int  # attempts running at that moment
    seconds: float  # the drain


@dataclass(slots=True)
class TaskRun:
    """The scheduler's view of one task (mutated only by the scheduler thread)."""

    id: str
    kind: str
    priority: float
    retries: int
    shape: Resources
    deps: tuple[str, ...]
    dependents: tuple[str, ...]
    state: TaskState = TaskState.PENDING
    waiting: int = 0
    attempts: int = 0  # attempts so far, earlier runs included
    reason: str = ""
    outcome: Outcome | None = None
    started: float = 0.0
    wall_s: float = 0.0
    attempts_before: int = 0  # attempts made in earlier runs (not charged against this run's retries)
    fp_record: dict[str, Any] | None = None  # its fingerprint as journaled, made at its launch on a rank
    placement: Placement | None = None  # where its attempt in flight runs (when the job books an inventory)
    launch: str = ""  # its CMBAGENT_LAUNCH there
    # Read from the shape once, as admission reads them for every launch:
    cpus: int = field(init=False)  # every core it books
    memory_mb: float = field(init=False)  # on each node (0: none booked)
    small: bool = field(init=False)  # one core, no GPU, no memory: may be handed over ahead, in batches

    def __post_init__(self) -> None:
        shape = self.shape
        self.cpus = shape.cpus
        self.memory_mb = float(shape.memory_mb or 0)
        self.small = shape.single and shape.memory_mb is None

    @property
    def run_attempts(self) -> int:
        """Attempts made in this run."""
        return self.attempts - self.attempts_before
