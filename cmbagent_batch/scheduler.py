"""The dependency-driven scheduler: one thread owns every task's state.

A task is launched as soon as all its dependencies are done and a worker and its resources are free;
there is no barrier between levels. Among ready tasks the one with the longest remaining critical path
(bottom level) goes first, ties by id. Attempts run on ``concurrent.futures`` executors; their completion
callbacks only put the future on a queue, which this thread drains.

A stop (a signal, fail-fast) stops launching and ends the running attempts at once. A stop with a
drain (Slurm's warning before the walltime) stops launching and holds back what was handed over but has
not started, and lets the running attempts go on until the drain's deadline, when it ends those left.

Two things keep workers busy when tasks are tiny or many. Attempts may be handed over ahead of a free
worker (``Limits.prefetch_kinds``): a thread pool then holds them behind a gate (a slot semaphore) and
each reports when it really starts (on a deque this thread drains whenever it wakes, before any end),
which is when it is journaled ``running``, with that time (under MPI: when rank 0 sends it to a worker).
And where a round trip to a worker costs more than a task (a process pool), ready attempts of tasks whose
observed duration is short go over in batches of about ``BATCH_SECONDS`` of work; those count as
running from the hand-over.
"""

from __future__ import annotations

import functools
import heapq
import os
import queue
import random
import socket
import time
import traceback
from collections import Counter, deque
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cmbagent_batch.states import DONE_STATES, FINAL_STATES, TaskState
from cmbagent_batch.tasks.base import Gate, Outcome, TaskContext

Clock = Callable[[], float]


class Pools(Protocol):
    """Where attempts run; the scheduler does not know if these are threads, processes or MPI ranks."""

    def executor_for(self, kind: str) -> Executor: ...

    def gate(self, kind: str, on_start: Callable[[], None]) -> Gate | None:
        """Where an attempt of ``kind`` waits for a free slot; it calls ``on_start`` when it gets one.
        None: the attempt counts as started when it is submitted."""

    def batches(self, kind: str) -> bool:
        """Whether tiny attempts of ``kind`` are worth handing to a worker several at a time."""

    def replace_broken(self, executor: Executor) -> None: ...

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


@dataclass
class Options:
    keep_going: bool = False
    retries: int = 0
    retry_backoff: float = 1.0  # seconds before the 2nd attempt; doubles each time, with jitter
    kill_grace: float = 5.0


@dataclass(frozen=True)
class DrainEvent:
    """A step of a stop with a drain, for the user (the caller says it)."""

    what: str  # "hold": nothing new starts; "deadline": the drain ran out; "hurry": another stop request came
    reason: str  # the request that started the drain; for "hurry", the one that cut it short
    running: int  # attempts running at that moment
    seconds: float  # the drain


@dataclass
class TaskRun:
    """The scheduler's view of one task (mutated only by the scheduler thread)."""

    id: str
    kind: str
    priority: float
    retries: int
    cpus: int
    memory_mb: float
    deps: tuple[str, ...]
    dependents: tuple[str, ...]
    state: TaskState = TaskState.PENDING
    waiting: int = 0
    attempts: int = 0  # attempts so far, earlier runs included
    reason: str = ""
    outcome: Outcome | None = None
    started: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Launch:
    """What the runner needs to start one attempt; built by the caller's ``prepare`` function."""

    fn: Callable[..., Outcome]
    args: tuple[Any, ...]
    ctx: TaskContext


def run_batch(calls: list[tuple[Callable[..., Outcome], tuple[Any, ...]]]) -> list[Outcome]:
    """Several attempts of tiny tasks, one after the other, in one submission (one round trip)."""
    return [fn(*args) for fn, args in calls]


# A batch holds at most BATCH_MAX attempts and, by their observed durations, about BATCH_SECONDS of work:
# enough to make the round trip to a worker process negligible, little enough to balance the workers.
BATCH_MAX = 64
BATCH_SECONDS = 0.02


@dataclass
class _Unit:
    """One submission to an executor: one attempt, or a batch run one after the other by one worker."""

    members: list[str]
    kind: str
    executor: Executor
    cpus: int
    memory_mb: float
    batch: bool


class Scheduler:
    def __init__(self, runs: dict[str, TaskRun], pools: Pools, limits: Limits, options: Options,
                 prepare: Callable[[TaskRun, Gate | None], Launch],
                 record: Callable[[TaskRun, dict[str, Any]], None],
                 tick: Callable[["Scheduler"], None] = lambda s: None, clock: Clock = time.monotonic,
                 commit: Callable[[], None] = lambda: None,
                 batch: Callable[[list[tuple[Callable[..., Outcome], tuple[Any, ...]]]], list[Outcome]] | None = None,
                 on_drain: Callable[[DrainEvent], None] = lambda event: None,
                 ) -> None:
        self.runs = runs
        self.pools = pools
        self.limits = limits
        self.options = options
        self._prepare = prepare
        self._record = record  # journal a state change (the caller adds what it knows)
        self._commit = commit  # make the recorded changes durable-ish (written out) before waiting
        self._batch = batch or run_batch  # what runs a batch on a worker (a top-level, picklable function)
        self._tick = tick
        self._clock = clock
        self._on_drain = on_drain
        # SimpleQueue: put() is safe from a signal handler (request_stop), Queue's lock is not re-entrant.
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._starts: deque[tuple[str, int, float]] = deque()  # (task, attempt, time.time()), by pool threads
        self._ready: list[tuple[float, str]] = []
        self._timers: list[tuple[float, str]] = []
        self._units: dict[Future[Any], _Unit] = {}  # submitted and not yet handled
        self._running: dict[str, Future[Any]] = {}  # task -> the submission holding its attempt
        self._starting: dict[str, TaskContext] = {}  # submitted behind a gate, not started yet
        self._gates: dict[str, Gate] = {}  # gate of each running attempt that has one
        self._unsettled: list[Gate] = []  # gates of failed attempts, whose slots wait for a possible stop
        self._unit_kinds: Counter[str] = Counter()
        self._suspects_running = 0  # attempts rerun alone after a worker process died
        self._broken: dict[int, int] = {}  # broken executor -> attempts it held when it broke
        self._avg_wall: dict[str, float] = {}  # kind -> moving average of attempt wall seconds
        self._cpus_used = 0
        self._mem_used = 0.0
        self._mem_checked = (-1.0, 0.0)
        self.stop_reason: str | None = None  # set from a signal handler or fail-fast
        self._drain = 0.0  # seconds the stop lets running attempts go on (set from a signal handler)
        self._hurry: str | None = None  # a later stop request, which cuts a drain short (idem)
        self._deadline: float | None = None  # when a drain that started ends
        self._terminated_at: float | None = None  # when the running attempts were told to end
        self.abandoned = 0  # attempts still running in threads when the run ended
        self.host = socket.gethostname()
        self.counts = {s: 0 for s in TaskState}

    # --- public ------------------------------------------------------------------------------------

    def request_stop(self, reason: str, drain: float = 0.0) -> None:
        """Stop launching and end the running attempts: at once or, with ``drain`` > 0, those still
        running ``drain`` seconds from now (nothing that has not started starts meanwhile). Another
        request during the drain ends it at once; the first request's reason stays the stop's reason.
        Callable from a signal handler: it only sets fields and wakes the scheduler thread."""
        if self.stop_reason is None:
            self._drain = drain
            self.stop_reason = reason  # set last: the scheduler thread reads it first
        elif self._hurry is None:
            self._hurry = reason
        self._events.put(("wake", None))

    def run(self) -> None:
        for r in self.runs.values():
            self.counts[r.state] += 1
            if r.state in FINAL_STATES:
                continue
            r.waiting = sum(1 for d in r.deps if self.runs[d].state not in DONE_STATES)
            if r.waiting == 0:
                heapq.heappush(self._ready, (-r.priority, r.id))
        while self._unfinished() and not (self.stop_reason and not self._units):
            if self.stop_reason and self._terminated_at is None:
                self._act_on_stop(self.stop_reason)
            self._settle()
            if self._terminated_at is not None and self._clock() - self._terminated_at > self.options.kill_grace + 5:
                self._abandon_running()
                break
            if not self.stop_reason:
                self._launch_ready()
            self._wait_and_handle()
            self._fire_timers()
            self._tick(self)
        self._settle()
        self._finish_unlaunched()
        self._commit()
        self._tick(self)

    # --- stopping ----------------------------------------------------------------------------------

    def _act_on_stop(self, reason: str) -> None:
        """Hold back what has not started and let the running attempts drain, or end them: at once (no
        drain, or another stop request came), or when the drain's deadline has passed."""
        now = self._clock()
        if self._deadline is None and self._drain > 0 and self._hurry is None:
            self._deadline = now + self._drain
            self.pools.hold()
            self._drain_starts()
            self._on_drain(DrainEvent("hold", reason, self._running_now(), self._drain))
            return
        if self._deadline is not None:
            if self._hurry is None and now < self._deadline:
                return
            self._drain_starts()
            what, why = ("deadline", reason) if self._hurry is None else ("hurry", self._hurry)
            self._on_drain(DrainEvent(what, why, self._running_now(), self._drain))
        self._terminated_at = now
        self.pools.terminate_running(self.options.kill_grace)

    @property
    def _draining(self) -> bool:
        """A stop with a drain: nothing starts, the running attempts go on until the deadline."""
        return self._deadline is not None and self._terminated_at is None

    def _running_now(self) -> int:
        """Attempts running now: one per submission holding a started attempt (a batch runs one at a
        time), at most one per worker (attempts without a gate count as started from the hand-over, and
        some wait ahead of a free worker)."""
        units = {id(f) for tid, f in self._running.items() if tid not in self._starting}
        return min(len(units), self.limits.max_workers)

    # --- state changes -----------------------------------------------------------------------------

    def _set(self, r: TaskRun, state: TaskState, **extra: Any) -> None:
        self.counts[r.state] -= 1
        self.counts[state] += 1
        r.state = state
        self._record(r, extra)

    def _settle(self) -> None:
        """Free the slots that failed attempts kept: after a stop was requested and acted on, if any."""
        while self._unsettled:
            self._unsettled.pop().settle()

    def _unfinished(self) -> bool:
        return any(self.counts[s] for s in TaskState if s not in FINAL_STATES)

    def _abandon_running(self) -> None:
        """Attempts that outlived the stop (python functions in threads cannot be killed)."""
        for tid in sorted(self._running):
            r = self.runs[tid]
            r.reason = f"still running when the job stopped ({self.stop_reason}); abandoned"
            final = TaskState.CANCELLED if self.stop_reason == "fail-fast" else TaskState.INTERRUPTED
            self._set(r, final, attempt=r.attempts, reason=r.reason)
        self.abandoned = len(self._running)
        self._running.clear()
        self._units.clear()

    def _finish_unlaunched(self) -> None:
        """After a stop: waiting tasks become cancelled (fail-fast) or stay pending (interrupted)."""
        for r in self.runs.values():
            if r.state is TaskState.RETRYING or (r.state is TaskState.PENDING and self.stop_reason == "fail-fast"):
                r.reason = r.reason or f"not run: the job stopped ({self.stop_reason})"
                final = TaskState.CANCELLED if self.stop_reason == "fail-fast" else TaskState.INTERRUPTED
                self._set(r, final, reason=r.reason)

    # --- launching ---------------------------------------------------------------------------------

    def _prefetchable(self, r: TaskRun) -> bool:
        return r.kind in self.limits.prefetch_kinds and r.cpus == 1 and not r.memory_mb

    def _fits(self, r: TaskRun) -> bool:
        lim = self.limits
        if r.extra.get("suspect") or self._suspects_running:
            return not self._units  # after a pool breakage: one attempt at a time, to find the culprit
        # Handing over ahead (past max_workers) only among small tasks of one prefetch kind: a mix with
        # other kinds, or tasks that reserve resources, would break max_workers and cpu limits.
        units = len(self._units)
        ahead = lim.prefetch if self._prefetchable(r) and self._unit_kinds[r.kind] == units else 0
        if units >= lim.max_workers + ahead:
            return False
        if units and self._cpus_used + r.cpus > lim.cpus + ahead:
            return False
        if lim.memory_mb is not None and units and self._mem_used + r.memory_mb > lim.memory_mb:
            return False
        return True

    def _memory_ok(self) -> bool:
        """False while memory in use is past the safety fraction (checked at most 5 times a second)."""
        probe = self.limits.memory_in_use
        if probe is None or not self._units:
            return True
        now = self._clock()
        if now - self._mem_checked[0] > 0.2:
            self._mem_checked = (now, probe())
        return self._mem_checked[1] < self.limits.memory_safety_fraction

    def _batch_size(self, r: TaskRun) -> int:
        """How many ready attempts of ``r``'s kind to hand over together: 1 until their durations are
        known, then about BATCH_SECONDS of work, never so many that a worker would be left without."""
        avg = self._avg_wall.get(r.kind)
        if avg is None or r.extra.get("suspect") or not self._prefetchable(r) or not self.pools.batches(r.kind):
            return 1
        by_time = int(BATCH_SECONDS / max(avg, 1e-6))
        by_share = len(self._ready) // (self.limits.max_workers + self.limits.prefetch) + 1
        return max(1, min(BATCH_MAX, by_time, by_share))

    def _launch_ready(self) -> None:
        deferred = []
        cap = self.limits.max_workers + (self.limits.prefetch if self.limits.prefetch_kinds else 0)
        while self._ready and len(self._units) < cap:
            item = heapq.heappop(self._ready)
            r = self.runs[item[1]]
            if not self._fits(r):
                deferred.append(item)
                continue
            if not self._memory_ok():
                deferred.append(item)
                break
            members = [r]
            size = self._batch_size(r)
            while len(members) < size and self._ready:
                nxt = self.runs[self._ready[0][1]]
                if nxt.kind != r.kind or not self._prefetchable(nxt) or nxt.extra.get("suspect"):
                    break
                heapq.heappop(self._ready)
                members.append(nxt)
            self._submit(members)
        for item in deferred:
            heapq.heappush(self._ready, item)

    def _submit(self, members: list[TaskRun]) -> None:
        first = members[0]
        launches = []
        for r in members:
            r.attempts += 1
            r.started = self._clock()
            gate = None
            if len(members) == 1:
                gate = self.pools.gate(r.kind, functools.partial(self._gate_passed, r.id, r.attempts))
            launches.append((r, self._prepare(r, gate), gate))
        if len(members) == 1:
            fn, args = launches[0][1].fn, launches[0][1].args
        else:
            fn, args = self._batch, ([(launch.fn, launch.args) for _, launch, _ in launches],)
        executor = self.pools.executor_for(first.kind)
        try:
            future = executor.submit(fn, *args)
        except BrokenProcessPool:
            self.pools.replace_broken(executor)
            executor = self.pools.executor_for(first.kind)
            future = executor.submit(fn, *args)
        batch = len(members) > 1
        unit = _Unit([r.id for r in members], first.kind, executor, cpus=1 if batch else first.cpus,
                     memory_mb=0.0 if batch else first.memory_mb, batch=batch)
        self._units[future] = unit
        self._unit_kinds[unit.kind] += 1
        self._cpus_used += unit.cpus
        self._mem_used += unit.memory_mb
        for r, launch, gate in launches:
            self._running[r.id] = future
            if r.extra.get("suspect"):
                self._suspects_running += 1
            if gate is None:
                self._started(r, launch.ctx, time.time())
            else:
                self._starting[r.id] = launch.ctx
                self._gates[r.id] = gate
        future.add_done_callback(lambda f: self._events.put(("done", f)))

    def _started(self, r: TaskRun, ctx: TaskContext, t: float) -> None:
        """Journal the attempt running since ``t`` (``time.time()``, the journal's clock)."""
        self._set(r, TaskState.RUNNING, attempt=r.attempts, work_dir=ctx.work_dir, rank=ctx.rank, host=ctx.host,
                  t=t)

    def _gate_passed(self, tid: str, attempt: int) -> None:
        """An attempt got its slot (called on the thread that gave it one): noted with the time, which its
        ``running`` record says, however late this thread journals it."""
        self._starts.append((tid, attempt, time.time()))

    # --- completions -------------------------------------------------------------------------------

    def _wait_and_handle(self) -> None:
        self._commit()
        timeout = 0.05 if self._starting else 0.5  # attempts at a gate: journal their start soon after
        wake = [self._timers[0][0]] if self._timers else []
        if self._draining:
            wake.append(self._deadline)
        if wake:
            timeout = max(0.0, min(timeout, min(wake) - self._clock()))
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            self._drain_starts()
            return
        while True:
            self._drain_starts()  # before any end: a task is journaled running before it is done
            what, value = item
            if what == "done":
                self._finish(value)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                self._drain_starts()
                return

    def _drain_starts(self) -> None:
        """Attempts that got their slot since the last look (they do not wake this thread: each would
        cost a thread switch per task, and nothing waits on them)."""
        while self._starts:
            tid, attempt, t = self._starts.popleft()
            r = self.runs[tid]
            ctx = self._starting.pop(tid, None)
            if ctx is not None and r.attempts == attempt:
                self._started(r, ctx, t)

    def _finish(self, future: Future[Any]) -> None:
        unit = self._units.get(future)
        if unit is None:
            return  # abandoned
        outcomes, not_started = self._outcomes(future, unit)
        del self._units[future]
        self._unit_kinds[unit.kind] -= 1
        self._cpus_used -= unit.cpus
        self._mem_used -= unit.memory_mb
        for tid, outcome in zip(unit.members, outcomes):
            self._done(self.runs[tid], outcome, unit.executor, not_started)

    def _outcomes(self, future: Future[Any], unit: _Unit) -> tuple[list[Outcome], bool]:
        """One outcome per member of the unit (every one fails alike when the submission failed), and
        whether the submission was cancelled before it started."""
        try:
            result = future.result()
            return (list(result) if unit.batch else [result]), False
        except BrokenProcessPool:
            key = id(unit.executor)
            if key not in self._broken:  # attempts the pool held when it broke (counted at its first casualty)
                self._broken[key] = sum(len(u.members) for u in self._units.values() if u.executor is unit.executor)
            self.pools.replace_broken(unit.executor)  # a no-op when another casualty already replaced it
            error = ("terminated by the runner" if self._terminated_at is not None
                     else "the worker process running it died (killed, or out of memory)")
            outcome = Outcome(ok=False, error=error, worker_died=True)
        except CancelledError:  # by the executor, or by a worker that held it back (see Pools.hold)
            return [Outcome(ok=False, error="cancelled before it started")] * len(unit.members), True
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable argument
            outcome = Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return [outcome] * len(unit.members), False

    def _done(self, r: TaskRun, outcome: Outcome, executor: Executor, not_started: bool = False) -> None:
        del self._running[r.id]
        never_started = self._starting.pop(r.id, None) is not None
        gate = self._gates.pop(r.id, None)
        if gate is not None and not outcome.ok:
            self._unsettled.append(gate)
        was_suspect = bool(r.extra.pop("suspect", False))
        if was_suspect:
            self._suspects_running -= 1
        if never_started and self.stop_reason:  # handed over, then held back by the stop: it did not run
            r.attempts -= 1
            return
        if (outcome.worker_died and not self.stop_reason and not was_suspect
                and self._broken.get(id(executor), 0) > 1):
            # The pool broke with several attempts in it: which one killed it is unknown, so none is
            # charged; each runs again alone, and the one that kills its worker then fails.
            r.extra["suspect"] = True
            r.extra["free_attempts"] = r.extra.get("free_attempts", 0) + 1
            self._set(r, TaskState.PENDING, attempt=r.attempts, reason=outcome.error)
            heapq.heappush(self._ready, (-r.priority, r.id))
            return
        r.outcome = outcome
        r.wall_s = outcome.wall_s or (self._clock() - r.started)
        if outcome.ok:
            avg = self._avg_wall.get(r.kind)
            self._avg_wall[r.kind] = r.wall_s if avg is None else 0.8 * avg + 0.2 * r.wall_s
            self._set(r, TaskState.SUCCEEDED, attempt=r.attempts)
            for child in r.dependents:
                c = self.runs[child]
                c.waiting -= 1
                if c.waiting == 0 and c.state is TaskState.PENDING:
                    heapq.heappush(self._ready, (-c.priority, c.id))
            return
        if self.stop_reason is not None and self._ended_by_stop(outcome, not_started):
            final = TaskState.CANCELLED if self.stop_reason == "fail-fast" else TaskState.INTERRUPTED
            r.reason = f"{outcome.error} ({self.stop_reason})"
            self._set(r, final, attempt=r.attempts, reason=r.reason)
            return
        r.reason = outcome.error or "failed"
        if outcome.budget_exceeded:  # no retry: the budget stays spent
            self._set(r, TaskState.BUDGET_EXCEEDED, attempt=r.attempts, reason=r.reason)
            self._block_dependents(r)
            if not self.options.keep_going:
                self.request_stop("fail-fast")
            return
        if self._attempts_left(r):
            delay = self.options.retry_backoff * (2 ** (self._run_attempts(r) - 1)) * random.uniform(0.5, 1.0)
            heapq.heappush(self._timers, (self._clock() + delay, r.id))
            self._set(r, TaskState.RETRYING, attempt=r.attempts, reason=r.reason, retry_in_s=round(delay, 3))
            return
        self._set(r, TaskState.FAILED, attempt=r.attempts, reason=r.reason)
        self._block_dependents(r)
        if not self.options.keep_going:
            self.request_stop("fail-fast")

    def _ended_by_stop(self, outcome: Outcome, not_started: bool) -> bool:
        """Whether a failed attempt failed because the job is stopping. While a drain lets attempts
        finish, one that fails has failed, unless it was held back, lost with its worker process, or
        terminated by the runner (say, on a worker rank that got the walltime's SIGTERM before rank 0)."""
        if not self._draining:
            return True
        return not_started or outcome.worker_died or (outcome.error or "").startswith("terminated by the runner")

    def _run_attempts(self, r: TaskRun) -> int:
        """Attempts charged in this run (not those lost to a worker another task killed)."""
        return r.attempts - r.extra.get("attempts_before", 0) - r.extra.get("free_attempts", 0)

    def _attempts_left(self, r: TaskRun) -> bool:
        return self._run_attempts(r) <= r.retries

    def _block_dependents(self, root: TaskRun) -> None:
        stack = list(root.dependents)
        while stack:
            c = self.runs[stack.pop()]
            if c.state in FINAL_STATES or c.state is TaskState.RUNNING or c.id in self._running:
                continue
            c.reason = f"upstream task {root.id!r} " + (
                "stopped: LLM budget spent" if root.state is TaskState.BUDGET_EXCEEDED else "failed")
            self._set(c, TaskState.UPSTREAM_FAILED, reason=c.reason, root=root.id)
            stack.extend(c.dependents)

    def _fire_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, tid = heapq.heappop(self._timers)
            r = self.runs[tid]
            if r.state is TaskState.RETRYING and not self.stop_reason:
                self.counts[r.state] -= 1
                r.state = TaskState.PENDING
                self.counts[r.state] += 1
                heapq.heappush(self._ready, (-r.priority, r.id))


def default_workers(memory_per_worker_mb: float | None) -> int:
    """Workers from CPUs and, when a per-worker memory is set, from available memory."""
    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_per_worker_mb:
        by_memory = int(psutil.virtual_memory().available / (memory_per_worker_mb * 1024 * 1024))
        return max(1, min(cpus, by_memory))
    return max(1, cpus)
