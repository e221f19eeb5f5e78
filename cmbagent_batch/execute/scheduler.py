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
worker (``Limits.prefetch_kinds``), and where a round trip to a worker costs more than a task (a process
pool, MPI ranks), ready attempts of tasks whose observed duration is short go over in batches of about the
seconds of work the pools say (``Pools.batches``), which a worker runs one after the other. What is handed
over is ``queued`` until the pool reports that it really started (its gate gave it a slot, a worker
process or rank began it; on a deque this thread drains whenever it wakes, before any end): it is
journaled ``running`` then, with that time, while fewer than ``max_workers`` are (a worker may start its
next attempt before this thread has the last one's end: that start waits for it). A batch reports its
start once: its first attempt is the running one until the batch ends, and the others are journaled
running, with their own start time, as their ends come in. So ``running`` never counts more attempts than
the workers run.
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

# Outcomes of attempts of a batch that a stop kept from starting (its worker held them back).
_HELD_BACK = frozenset({OutcomeReason.NOT_STARTED, OutcomeReason.CANCELLED})


class Scheduler:
    """Runs the tasks of ``runs`` to their end on ``pools``; ``prepare`` makes each attempt, ``record``
    journals each state change. Every field is this (the scheduler) thread's, but for ``request_stop``."""

    def __init__(self, runs: dict[str, TaskRun], pools: Pools, limits: Limits, options: Options,
                 prepare: Callable[[TaskRun], Attempt],
                 record: Callable[[TaskRun, dict[str, Any]], None],
                 tick: Callable[[Scheduler], None] = lambda s: None, clock: Clock = time.monotonic,
                 commit: Callable[[], None] = lambda: None,
                 on_drain: Callable[[DrainEvent], None] = lambda event: None,
                 skipped: int = 0,
                 write_through: Callable[[], None] | None = None,
                 ) -> None:
        """``skipped``: tasks of the job that are not in ``runs`` (up to date, or not selected): counted
        only. ``write_through``: write out the recorded changes and return once they are written (else
        ``commit`` does): before the tasks that ends freed start, so a runner killed as one starts has
        journaled the ends it depends on."""
        self.runs = runs
        self.pools = pools
        self.limits = limits
        self.options = options
        self._prepare = prepare  # the attempt to hand over next for a task
        self._record = record  # journal a state change (the caller adds what it knows)
        self._commit = commit  # make the recorded changes durable-ish (written out) before waiting
        self._write_through = write_through or commit
        self._freed = False  # ends made tasks ready since the last launch
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
        self._running: dict[str, Future[Any]] = {}  # task -> the submission holding its attempt (queued or running)
        self._starting: dict[str, TaskContext] = {}  # queued: handed over, not counted as running yet
        self._reported: dict[str, float] = {}  # of those, started (when), waiting for room among max_workers
        self._gates: dict[str, Gate] = {}  # gate of each submission, under its first task
        self._unsettled: list[Gate] = []  # gates of failed attempts, whose slots wait for a possible stop
        self.abandoned = 0  # attempts still running in threads when the run ended
        self.disk_full: str | None = None  # what could not be written when the file system filled up
        self.host = socket.gethostname()
        self.counts = {s: 0 for s in TaskState}
        self.counts[TaskState.SKIPPED] = skipped
        self.finished = False  # set before the last tick

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
                if self._freed:  # the ends just recorded are written before the dependents they free start
                    self._freed = False
                    self._write_through()
                self.admission.launch_ready(self._submit)
            self._wait_and_handle()
            self._fire_timers()
            self._tick(self)
        self._settle()
        self._finish_unlaunched()
        self._commit()
        self.finished = True
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
            self._on_drain(self.stop.event(action, self.counts[TaskState.RUNNING]))
            if action is StopAction.HOLD:
                return
        self.pools.terminate_running(self.options.kill_grace)

    def _abandon_running(self) -> None:
        """Attempts that outlived the stop (python functions in threads cannot be killed); those that had
        not started end not run, uncharged."""
        reason = self._stop_value()
        self._drain_starts()
        for tid in sorted(self._running):
            r = self.runs[tid]
            if tid in self._reported:
                self._started(r, self._starting.pop(tid), self._reported.pop(tid))
            if r.state is TaskState.QUEUED:
                self._held_back(r)
                continue
            r.reason = f"still running when the job stopped ({reason}); abandoned"
            r.outcome = None  # this attempt has none: an earlier attempt's must not be journaled as its
            self._set(r, self.stop.final_state, attempt=r.attempts, reason=r.reason)
            self.abandoned += 1
        self._running.clear()
        self._starting.clear()
        self._reported.clear()
        self._gates.clear()
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
        self._move(r, state)
        self._record(r, extra)

    def _move(self, r: TaskRun, state: TaskState) -> None:
        """A change that is not journaled (to queued; a retry back to pending): the counts follow it."""
        self.counts[r.state] -= 1
        self.counts[state] += 1
        r.state = state

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
        for r in members:
            r.attempts += 1
            r.started = self._clock()
            attempts.append(self._prepare(r))
        # A submission reports its start once: its attempt's, or its batch's first attempt's.
        gate = self.pools.gate(first.kind, functools.partial(self._gate_passed, first.id, first.attempts))
        executor = self.pools.executor_for(first.kind)
        future = self.pools.submit(executor, attempts, gate)
        batch = len(members) > 1
        unit = Unit([r.id for r in members], first.kind, executor, cpus=1 if batch else first.cpus,
                    memory_mb=0.0 if batch else first.memory_mb, batch=batch, placement=first.placement)
        self._units[future] = unit
        self.admission.admitted(unit)
        for r, attempt in zip(members, attempts):
            self._running[r.id] = future
            self._starting[r.id] = attempt.ctx
            self._move(r, TaskState.QUEUED)
        if gate is None:  # it counts as started when handed over
            self._gate_passed(first.id, first.attempts)
            self._drain_starts()
        else:
            self._gates[first.id] = gate
        future.add_done_callback(self._events.put)

    def _started(self, r: TaskRun, ctx: TaskContext, t: float) -> None:
        """Journal the attempt running since ``t`` (``time.time()``, the journal's clock)."""
        if r.placement is None:
            self._set(r, TaskState.RUNNING, attempt=r.attempts, work_dir=ctx.work_dir, rank=ctx.rank, host=ctx.host,
                      t=t)
        else:
            self._set(r, TaskState.RUNNING, attempt=r.attempts, work_dir=ctx.work_dir, rank=ctx.rank, host=ctx.host,
                      t=t, placement=r.placement.record(), launch=r.launch)

    def _gate_passed(self, tid: str, attempt: int) -> None:
        """An attempt started (called on the thread that saw it: a slot was given, a worker began it):
        noted with the time, which its ``running`` record says, however late this thread journals it."""
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
        """Attempts that started since the last look (they do not wake this thread: each would cost a
        thread switch per task, and nothing waits on them)."""
        while self._starts:
            tid, attempt, t = self._starts.popleft()
            future = self._running.get(tid)
            if future is None or self.runs[tid].attempts != attempt or tid not in self._starting:
                continue  # a start reported late, for an attempt already handled
            self._units[future].started = True
            self._reported[tid] = t
        self._count_starts()

    def _count_starts(self) -> None:
        """Journal the reported starts as running, the earliest first, while fewer than ``max_workers``
        run. A worker may start its next attempt before this thread has its last one's end (a thread's
        slot is free once the task's code is done, before it publishes; a worker rank answers after it
        journals): that start waits here for the end, so no worker counts twice. Its record keeps the
        time it started."""
        room = self.limits.max_workers - self.counts[TaskState.RUNNING]
        while room > 0 and self._reported:
            tid = next(iter(self._reported))
            self._started(self.runs[tid], self._starting.pop(tid), self._reported.pop(tid))
            room -= 1

    def _finish(self, future: Future[Any]) -> None:
        unit = self._units.get(future)
        if unit is None:
            return  # abandoned
        outcomes, not_started = outcomes_of(future, unit)
        del self._units[future]
        self.admission.released(unit)
        for tid, outcome in zip(unit.members, outcomes):
            self._done(self.runs[tid], outcome, not_started, unit.started)
        self._count_starts()  # ends make room

    def _done(self, r: TaskRun, outcome: Outcome, not_started: bool, unit_started: bool) -> None:
        del self._running[r.id]
        queued = self._starting.pop(r.id, None)  # not counted as running yet
        gate = self._gates.pop(r.id, None)
        if gate is not None and not outcome.ok:
            self._unsettled.append(gate)
        stop = self.stop.reason
        if queued is not None:
            started = self._reported.pop(r.id, None)
            if started is not None:  # it started, and waited for room among the running
                self._started(r, queued, started)
            elif unit_started and not not_started and outcome.reason not in _HELD_BACK:
                # later in a batch that started: it ran, and its start is known now
                self._started(r, queued, time.time() - outcome.wall_s)
            elif stop:  # handed over, then held back by the stop: it did not run
                self._held_back(r)
                return
        r.outcome = outcome
        r.wall_s = outcome.wall_s or (self._clock() - r.started)
        if outcome.reason is OutcomeReason.DISK_FULL:  # not the task's fault: the run stops
            self.stop_on_full_disk(f"task {r.id}: {outcome.error}")
            stop = self.stop.reason
        if outcome.ok:
            self.admission.observed(r)
            self._set(r, TaskState.SUCCEEDED, attempt=r.attempts)
            r.outcome = None  # journaled: 10^6 successes keep no outcome each
            r.placement = None
            for child in r.dependents:
                c = self.runs[child]
                c.waiting -= 1
                if c.waiting == 0 and c.state is TaskState.PENDING:
                    self.admission.push(c)
                    self._freed = True
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

    def _held_back(self, r: TaskRun) -> None:
        """A stop kept a handed-over attempt from starting: it is not charged, and the task ends as the stop
        says (cancelled by fail-fast, else interrupted: a rerun runs it)."""
        r.attempts -= 1
        r.reason = f"not run: the job stopped ({self._stop_value()})"
        self._set(r, self.stop.final_state, reason=r.reason)

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
                self._move(r, TaskState.PENDING)
                self.admission.push(r)

