"""The dependency-driven scheduler: one thread owns every task's state.

A task is launched as soon as all its dependencies are done and a worker and its resources are free;
there is no barrier between levels. Among ready tasks the one with the longest remaining critical path
(bottom level) goes first, ties by id (``admission.Admission``). Attempts run on ``concurrent.futures``
executors, handed over by the pools (``runs.Pools``); their completion callbacks only put the future on
a queue, which this thread drains.

A stop (a signal, fail-fast) stops launching and ends the running attempts at once. A stop with a
drain (Slurm's warning before the walltime) stops launching and holds back what was handed over but has
not started, and lets the running attempts go on until the drain's deadline, when it ends those left
(``stop.StopControl``).

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
import queue
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cmbagent_batch.attempt import Attempt, Gate, Outcome, TaskContext
from cmbagent_batch.execute.admission import Admission, Clock, Unit
from cmbagent_batch.execute.outcomes import outcomes_of
from cmbagent_batch.execute.runs import DrainEvent, Limits, Options, Pools, TaskRun
from cmbagent_batch.execute.stop import StopAction, StopControl
from cmbagent_batch.states import DONE_STATES, FINAL_STATES, OutcomeReason, StopReason, TaskState


class Scheduler:
    """Runs the tasks of ``runs`` to their end on ``pools``; ``prepare`` makes each attempt, ``record``
    journals each state change. Every field is this (the scheduler) thread's, but for ``request_stop``."""

    def __init__(self, runs: dict[str, TaskRun], pools: Pools, limits: Limits, options: Options,
                 prepare: Callable[[TaskRun], Attempt],
                 record: Callable[[TaskRun, dict[str, Any]], None],
                 tick: Callable[[Scheduler], None] = lambda s: None, clock: Clock = time.monotonic,
                 commit: Callable[[], None] = lambda: None,
                 on_drain: Callable[[DrainEvent], None] = lambda event: None,
                 ) -> None:
        self.runs = runs
        self.pools = pools
        self.limits = limits
        self.options = options
        self._prepare = prepare  # the attempt to hand over next for a task
        self._record = record  # journal a state change (the caller adds what it knows)
        self._commit = commit  # make the recorded changes durable-ish (written out) before waiting
        self._tick = tick
        self._clock = clock
        self._on_drain = on_drain
        self.admission = Admission(runs, limits, pools.batches, clock)
        self.stop = StopControl()
        # SimpleQueue: put() is safe from a signal handler (request_stop), Queue's lock is not re-entrant.
        # A finished submission's future, or None: wake up (a stop was requested).
        self._events: queue.SimpleQueue[Future[Any] | None] = queue.SimpleQueue()
        self._starts: deque[tuple[str, int, float]] = deque()  # (task, attempt, time.time()), by pool threads
        self._timers: list[tuple[float, str]] = []
        self._units: dict[Future[Any], Unit] = {}  # submitted and not yet handled
        self._running: dict[str, Future[Any]] = {}  # task -> the submission holding its attempt
        self._starting: dict[str, TaskContext] = {}  # submitted behind a gate, not started yet
        self._gates: dict[str, Gate] = {}  # gate of each running attempt that has one
        self._unsettled: list[Gate] = []  # gates of failed attempts, whose slots wait for a possible stop
        self.abandoned = 0  # attempts still running in threads when the run ended
        self.disk_full: str | None = None  # what could not be written when the file system filled up
        self.host = socket.gethostname()
        self.counts = {s: 0 for s in TaskState}

    # --- public ------------------------------------------------------------------------------------

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the run stopped launching (a signal, fail-fast), if it did."""
        return self.stop.reason

    def request_stop(self, reason: StopReason, drain: float = 0.0) -> None:
        """Stop launching and end the running attempts: at once or, with ``drain`` > 0, those still
        running ``drain`` seconds from now (nothing that has not started starts meanwhile). Another
        request during the drain ends it at once; the first request's reason stays the stop's reason.
        Callable from a signal handler: it only sets fields and wakes the scheduler thread."""
        self.stop.request(reason, drain)
        self._events.put(None)

    def stop_on_full_disk(self, what: str) -> None:
        """The run directory's file system is full (or the quota used up): ``what`` could not be written.
        Stops the run (nothing new starts, the running attempts are ended); callable from any thread."""
        self.disk_full = self.disk_full or what
        self.request_stop(StopReason.DISK_FULL)

    def run(self) -> None:
        for r in self.runs.values():
            self.counts[r.state] += 1
            if r.state in FINAL_STATES:
                continue
            r.waiting = sum(1 for d in r.deps if self.runs[d].state not in DONE_STATES)
            if r.waiting == 0:
                self.admission.push(r)
        stop = self.stop
        while self._unfinished() and not (stop.reason and not self._units):
            if stop.reason and stop.terminated_at is None:
                self._act_on_stop()
            self._settle()
            if stop.terminated_at is not None and self._clock() - stop.terminated_at > self.options.kill_grace + 5:
                self._abandon_running()
                break
            if not stop.reason:
                self.admission.launch_ready(self._submit)
            self._wait_and_handle()
            self._fire_timers()
            self._tick(self)
        self._settle()
        self._finish_unlaunched()
        self._commit()
        self._tick(self)

    # --- stopping ----------------------------------------------------------------------------------

    def _act_on_stop(self) -> None:
        action = self.stop.next_action(self._clock())
        if action is StopAction.WAIT:
            return
        if action is not StopAction.TERMINATE:
            if action is StopAction.HOLD:
                self.pools.hold()
            self._drain_starts()
            self._on_drain(self.stop.event(action, self._running_now()))
            if action is StopAction.HOLD:
                return
        self.pools.terminate_running(self.options.kill_grace)

    def _running_now(self) -> int:
        """Attempts running now: one per submission holding a started attempt (a batch runs one at a
        time), at most one per worker (attempts without a gate count as started from the hand-over, and
        some wait ahead of a free worker)."""
        units = {id(f) for tid, f in self._running.items() if tid not in self._starting}
        return min(len(units), self.limits.max_workers)

    def _abandon_running(self) -> None:
        """Attempts that outlived the stop (python functions in threads cannot be killed)."""
        reason = self._stop_value()
        for tid in sorted(self._running):
            r = self.runs[tid]
            r.reason = f"still running when the job stopped ({reason}); abandoned"
            self._set(r, self.stop.final_state, attempt=r.attempts, reason=r.reason)
        self.abandoned = len(self._running)
        self._running.clear()
        self._units.clear()
        self.admission.units = 0

    def _finish_unlaunched(self) -> None:
        """After a stop: waiting tasks become cancelled (fail-fast) or stay pending (interrupted)."""
        fail_fast = self.stop.fail_fast
        for r in self.runs.values():
            if r.state is TaskState.RETRYING or (r.state is TaskState.PENDING and fail_fast):
                r.reason = r.reason or f"not run: the job stopped ({self._stop_value()})"
                self._set(r, self.stop.final_state, reason=r.reason)

    def _stop_value(self) -> str:
        """The stop's reason as people read it (called only once a stop was requested)."""
        assert self.stop.reason is not None
        return self.stop.reason.value

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

    # --- launching ---------------------------------------------------------------------------------

    def _submit(self, members: list[TaskRun]) -> None:
        first = members[0]
        attempts = []
        gate = None
        for r in members:
            r.attempts += 1
            r.started = self._clock()
            if len(members) == 1:
                gate = self.pools.gate(r.kind, functools.partial(self._gate_passed, r.id, r.attempts))
            attempts.append(self._prepare(r))
        executor = self.pools.executor_for(first.kind)
        future = self.pools.submit(executor, attempts, gate)
        batch = len(members) > 1
        unit = Unit([r.id for r in members], first.kind, executor, cpus=1 if batch else first.cpus,
                    memory_mb=0.0 if batch else first.memory_mb, batch=batch)
        self._units[future] = unit
        self.admission.admitted(unit)
        for r, attempt in zip(members, attempts):
            self._running[r.id] = future
            if gate is None:
                self._started(r, attempt.ctx, time.time())
            else:
                self._starting[r.id] = attempt.ctx
                self._gates[r.id] = gate
        future.add_done_callback(self._events.put)

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
        if self.stop.draining and self.stop.deadline is not None:
            wake.append(self.stop.deadline)
        if wake:
            timeout = max(0.0, min(timeout, min(wake) - self._clock()))
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            self._drain_starts()
            return
        while True:
            self._drain_starts()  # before any end: a task is journaled running before it is done
            if item is not None:
                self._finish(item)
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
        outcomes, not_started = outcomes_of(future, unit)
        del self._units[future]
        self.admission.released(unit)
        for tid, outcome in zip(unit.members, outcomes):
            self._done(self.runs[tid], outcome, not_started)

    def _done(self, r: TaskRun, outcome: Outcome, not_started: bool = False) -> None:
        del self._running[r.id]
        never_started = self._starting.pop(r.id, None) is not None
        gate = self._gates.pop(r.id, None)
        if gate is not None and not outcome.ok:
            self._unsettled.append(gate)
        stop = self.stop.reason
        if never_started and stop:  # handed over, then held back by the stop: it did not run
            r.attempts -= 1
            return
        r.outcome = outcome
        r.wall_s = outcome.wall_s or (self._clock() - r.started)
        if outcome.reason is OutcomeReason.DISK_FULL:  # not the task's fault: the run stops
            self.stop_on_full_disk(f"task {r.id}: {outcome.error}")
            stop = self.stop.reason
        if outcome.ok:
            self.admission.observed(r)
            self._set(r, TaskState.SUCCEEDED, attempt=r.attempts)
            for child in r.dependents:
                c = self.runs[child]
                c.waiting -= 1
                if c.waiting == 0 and c.state is TaskState.PENDING:
                    self.admission.push(c)
            return
        if stop is not None and self.stop.ended_by_stop(outcome, not_started):
            r.reason = f"{outcome.error} ({stop.value})"
            self._set(r, self.stop.final_state, attempt=r.attempts, reason=r.reason)
            return
        r.reason = outcome.error or "failed"
        if outcome.budget_exceeded:  # no retry: the budget stays spent
            self._set(r, TaskState.BUDGET_EXCEEDED, attempt=r.attempts, reason=r.reason)
            self._block_dependents(r)
            if not self.options.keep_going:
                self.request_stop(StopReason.FAIL_FAST)
            return
        if r.run_attempts <= r.retries:
            delay = self.options.retry_backoff * (2 ** (r.run_attempts - 1)) * random.uniform(0.5, 1.0)
            heapq.heappush(self._timers, (self._clock() + delay, r.id))
            self._set(r, TaskState.RETRYING, attempt=r.attempts, reason=r.reason, retry_in_s=round(delay, 3))
            return
        self._set(r, TaskState.FAILED, attempt=r.attempts, reason=r.reason)
        self._block_dependents(r)
        if not self.options.keep_going:
            self.request_stop(StopReason.FAIL_FAST)

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
            if r.state is TaskState.RETRYING and not self.stop.reason:
                self.counts[r.state] -= 1
                r.state = TaskState.PENDING
                self.counts[r.state] += 1
                self.admission.push(r)

