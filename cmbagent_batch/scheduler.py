"""The dependency-driven scheduler: one thread owns every task's state.

A task is launched as soon as all its dependencies are done and a worker and its resources are free;
there is no barrier between levels. Among ready tasks the one with the longest remaining critical path
(bottom level) goes first, ties by id. Attempts run on ``concurrent.futures`` executors; their completion
callbacks only put the future on a queue, which this thread drains.
"""

from __future__ import annotations

import heapq
import os
import queue
import random
import socket
import time
import traceback
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cmbagent_batch.states import DONE_STATES, FINAL_STATES, TaskState
from cmbagent_batch.tasks.base import Outcome, Payload, TaskContext

Clock = Callable[[], float]


class Pools(Protocol):
    """Where attempts run; the scheduler does not know if these are threads, processes or MPI ranks."""

    def executor_for(self, kind: str) -> Executor: ...

    def replace_broken(self, executor: Executor) -> None: ...

    def terminate_running(self, grace: float) -> None: ...


@dataclass
class Limits:
    max_workers: int
    cpus: int  # CPU cores that task reservations may add up to
    memory_mb: float | None  # memory that task reservations may add up to (None: no reservation limit)
    memory_safety_fraction: float = 0.8
    memory_in_use: Callable[[], float] | None = None  # fraction of memory in use now (psutil)
    # Kinds whose attempts may be queued ahead in their executor (up to 2x max_workers in flight), so a
    # process pool never idles between tiny tasks waiting for this thread's next submission.
    prefetch_kinds: frozenset[str] = frozenset()


@dataclass
class Options:
    keep_going: bool = False
    retries: int = 0
    retry_backoff: float = 1.0  # seconds before the 2nd attempt; doubles each time, with jitter
    kill_grace: float = 5.0


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


class Scheduler:
    def __init__(self, runs: dict[str, TaskRun], pools: Pools, limits: Limits, options: Options,
                 prepare: Callable[[TaskRun], Launch], record: Callable[[TaskRun, dict[str, Any]], None],
                 tick: Callable[["Scheduler"], None] = lambda s: None, clock: Clock = time.monotonic) -> None:
        self.runs = runs
        self.pools = pools
        self.limits = limits
        self.options = options
        self._prepare = prepare
        self._record = record  # journal a state change (the caller adds what it knows)
        self._tick = tick
        self._clock = clock
        # SimpleQueue: put() is safe from a signal handler (request_stop), Queue's lock is not re-entrant.
        self._events: queue.SimpleQueue[tuple[str, Future[Outcome] | None]] = queue.SimpleQueue()
        self._ready: list[tuple[float, str]] = []
        self._timers: list[tuple[float, str]] = []
        self._running: dict[str, Future[Outcome]] = {}
        self._executors: dict[str, Executor] = {}  # which executor runs each running attempt
        self._others_running = 0  # running attempts that may not be prefetched
        self._suspects_running = 0  # attempts rerun alone after a worker process died
        self._broken: dict[int, int] = {}  # broken executor -> attempts it held when it broke
        self._cpus_used = 0
        self._mem_used = 0.0
        self._mem_checked = (-1.0, 0.0)
        self.stop_reason: str | None = None  # set from a signal handler or fail-fast
        self.abandoned = 0  # attempts still running in threads when the run ended
        self.host = socket.gethostname()
        self.counts = {s: 0 for s in TaskState}

    # --- public ------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop launching and end running attempts (callable from a signal handler)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._events.put(("", None))  # wake the loop

    def run(self) -> None:
        for r in self.runs.values():
            self.counts[r.state] += 1
            if r.state in FINAL_STATES:
                continue
            r.waiting = sum(1 for d in r.deps if self.runs[d].state not in DONE_STATES)
            if r.waiting == 0:
                heapq.heappush(self._ready, (-r.priority, r.id))
        stopped_at: float | None = None
        while self._unfinished() and not (self.stop_reason and not self._running):
            if self.stop_reason and stopped_at is None:
                stopped_at = self._clock()
                self.pools.terminate_running(self.options.kill_grace)
            if stopped_at is not None and self._clock() - stopped_at > self.options.kill_grace + 5:
                self._abandon_running()
                break
            if not self.stop_reason:
                self._launch_ready()
            self._wait_and_handle()
            self._fire_timers()
            self._tick(self)
        self._finish_unlaunched()
        self._tick(self)

    # --- state changes -----------------------------------------------------------------------------

    def _set(self, r: TaskRun, state: TaskState, **extra: Any) -> None:
        self.counts[r.state] -= 1
        self.counts[state] += 1
        r.state = state
        self._record(r, extra)

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
        self._executors.clear()

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
            return not self._running  # after a pool breakage: one attempt at a time, to find the culprit
        # Queueing ahead (2x max_workers in flight) only among small tasks of a prefetch kind: a mix
        # with other kinds, or tasks that reserve resources, would break max_workers and cpu limits.
        depth = 2 if self._prefetchable(r) and self._others_running == 0 else 1
        if len(self._running) >= lim.max_workers * depth:
            return False
        if self._running and self._cpus_used + r.cpus > lim.cpus * depth:
            return False
        if lim.memory_mb is not None and self._running and self._mem_used + r.memory_mb > lim.memory_mb:
            return False
        return True

    def _memory_ok(self) -> bool:
        """False while memory in use is past the safety fraction (checked at most 5 times a second)."""
        probe = self.limits.memory_in_use
        if probe is None or not self._running:
            return True
        now = self._clock()
        if now - self._mem_checked[0] > 0.2:
            self._mem_checked = (now, probe())
        return self._mem_checked[1] < self.limits.memory_safety_fraction

    def _launch_ready(self) -> None:
        deferred = []
        cap = self.limits.max_workers * (2 if self.limits.prefetch_kinds else 1)
        while self._ready and len(self._running) < cap:
            item = heapq.heappop(self._ready)
            r = self.runs[item[1]]
            if not self._fits(r):
                deferred.append(item)
                continue
            if not self._memory_ok():
                deferred.append(item)
                break
            self._launch(r)
        for item in deferred:
            heapq.heappush(self._ready, item)

    def _launch(self, r: TaskRun) -> None:
        r.attempts += 1
        r.started = self._clock()
        launch = self._prepare(r)
        executor = self.pools.executor_for(r.kind)
        try:
            future = executor.submit(launch.fn, *launch.args)
        except BrokenProcessPool:
            self.pools.replace_broken(executor)
            executor = self.pools.executor_for(r.kind)
            future = executor.submit(launch.fn, *launch.args)
        self._running[r.id] = future
        self._executors[r.id] = executor
        if not self._prefetchable(r):
            self._others_running += 1
        if r.extra.get("suspect"):
            self._suspects_running += 1
        self._cpus_used += r.cpus
        self._mem_used += r.memory_mb
        self._set(r, TaskState.RUNNING, attempt=r.attempts, work_dir=launch.ctx.work_dir, rank=launch.ctx.rank,
                  host=launch.ctx.host)
        tid = r.id
        future.add_done_callback(lambda f: self._events.put((tid, f)))

    # --- completions -------------------------------------------------------------------------------

    def _wait_and_handle(self) -> None:
        timeout = 0.5
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - self._clock()))
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            tid, future = item
            if future is not None and self._running.get(tid) is future:
                self._done(self.runs[tid], future)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def _outcome(self, future: Future[Outcome], executor: Executor) -> Outcome:
        try:
            return future.result()
        except BrokenProcessPool:
            self.pools.replace_broken(executor)  # a no-op when another casualty already replaced it
            if self.stop_reason:
                return Outcome(ok=False, error="terminated by the runner", worker_died=True)
            return Outcome(ok=False, error="the worker process running it died (killed, or out of memory)",
                           worker_died=True)
        except CancelledError:
            return Outcome(ok=False, error="cancelled before it started")
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable argument
            return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())

    def _done(self, r: TaskRun, future: Future[Outcome]) -> None:
        del self._running[r.id]
        executor = self._executors.pop(r.id)
        self._cpus_used -= r.cpus
        self._mem_used -= r.memory_mb
        if not self._prefetchable(r):
            self._others_running -= 1
        was_suspect = bool(r.extra.pop("suspect", False))
        if was_suspect:
            self._suspects_running -= 1
        outcome = self._outcome(future, executor)
        if outcome.worker_died and not self.stop_reason and not was_suspect and self._shared_breakage(executor):
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
            self._set(r, TaskState.SUCCEEDED, attempt=r.attempts)
            for child in r.dependents:
                c = self.runs[child]
                c.waiting -= 1
                if c.waiting == 0 and c.state is TaskState.PENDING:
                    heapq.heappush(self._ready, (-c.priority, c.id))
            return
        if self.stop_reason is not None:
            final = TaskState.CANCELLED if self.stop_reason == "fail-fast" else TaskState.INTERRUPTED
            r.reason = f"{outcome.error} ({self.stop_reason})"
            self._set(r, final, attempt=r.attempts, reason=r.reason)
            return
        r.reason = outcome.error or "failed"
        if self._attempts_left(r):
            delay = self.options.retry_backoff * (2 ** (self._run_attempts(r) - 1)) * random.uniform(0.5, 1.0)
            heapq.heappush(self._timers, (self._clock() + delay, r.id))
            self._set(r, TaskState.RETRYING, attempt=r.attempts, reason=r.reason, retry_in_s=round(delay, 3))
            return
        self._set(r, TaskState.FAILED, attempt=r.attempts, reason=r.reason)
        self._block_dependents(r)
        if not self.options.keep_going:
            self.request_stop("fail-fast")

    def _shared_breakage(self, executor: Executor) -> bool:
        """Whether the pool that broke held other attempts too (counted once, at its first casualty)."""
        key = id(executor)
        if key not in self._broken:
            self._broken[key] = 1 + sum(1 for ex in self._executors.values() if ex is executor)
        return self._broken[key] > 1

    def _run_attempts(self, r: TaskRun) -> int:
        """Attempts charged in this run (not those lost to a worker another task killed)."""
        return r.attempts - r.extra.get("attempts_before", 0) - r.extra.get("free_attempts", 0)

    def _attempts_left(self, r: TaskRun) -> bool:
        return self._run_attempts(r) <= r.retries

    def _block_dependents(self, root: TaskRun) -> None:
        stack = list(root.dependents)
        while stack:
            c = self.runs[stack.pop()]
            if c.state in FINAL_STATES or c.state is TaskState.RUNNING:
                continue
            c.reason = f"upstream task {root.id!r} failed"
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
