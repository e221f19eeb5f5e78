"""The scheduler over fakes: pools whose executors run an attempt inside ``submit`` (or hold it for the test
to complete by hand), a clock that moves each time it is read, and a ``Job`` that scripts attempt results
and records every state change. No processes, no files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any

from cmbagent_batch.attempt import Attempt, Gate, Outcome, Payload, TaskContext
from cmbagent_batch.execute.runs import Limits, Options, TaskRun
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.spec.model import Resources
from cmbagent_batch.states import OutcomeReason, TaskState

OK = Outcome(ok=True)


def fail(error: str = "exit code 1") -> Outcome:
    return Outcome(ok=False, error=error, exit_code=1)


class FakeClock:
    """Monotonic time that moves ``step`` seconds each time it is read (backoffs pass at once)."""

    def __init__(self, step: float = 1.0) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class FakeExecutor(Executor):
    def __init__(self, pools: FakePools, name: str) -> None:
        self.pools = pools
        self.name = name

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        tids = [a.ctx.task_id for a in args[0]]  # FakePools.submit: (attempts, batch)
        tid = tids[0]
        pools = self.pools
        pools.batches_seen.append(tids)
        for t in tids:
            pools.submitted.append(t)
            pools.executor_of[t] = self
            pools.live[t] = pools.cpus_of(t)
        pools.peak_live = max(pools.peak_live, len(pools.live))
        pools.peak_cpus = max(pools.peak_cpus, sum(pools.live.values()))
        future: Future[Any] = Future()
        future.add_done_callback(lambda f: [pools.live.pop(t, None) for t in tids])
        if tid in pools.hold:
            future.set_running_or_notify_cancel()
            pools.held.append((tid, future))
            return future
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler like a real executor does
            future.set_exception(exc)
        return future


class FakePools:
    """The Pools protocol over fake executors; records what the scheduler asked of it."""

    def __init__(self, hold: Iterable[str] = (), on_terminate: Callable[[FakePools], None] | None = None) -> None:
        self.hold = set(hold)
        self.held: list[tuple[str, Future[Any]]] = []
        self.executor = FakeExecutor(self, "pool-1")
        self.terminated: list[float] = []
        self.on_terminate = on_terminate
        self.submitted: list[str] = []
        self.executor_of: dict[str, FakeExecutor] = {}
        self.live: dict[str, int] = {}  # submitted and not done: task -> cpus
        self.peak_live = 0
        self.peak_cpus = 0
        self.cpus_of: Callable[[str], int] = lambda tid: 1
        self.batch_kinds: set[str] = set()  # kinds whose tiny attempts go over in batches
        self.batches_seen: list[list[str]] = []  # the tasks of each submission
        self.attempt: Callable[[str, int], Outcome] = lambda tid, attempt: OK  # what an attempt returns (Job's)

    def executor_for(self, kind: str) -> Executor:
        return self.executor

    def gate(self, kind: str, on_start: Callable[[], None]) -> None:
        return None  # attempts start when submitted

    def submit(self, executor: Executor, attempts: list[Attempt], gate: Gate | None) -> Future[Any]:
        return executor.submit(self._run, list(attempts), len(attempts) > 1)

    def _run(self, attempts: list[Attempt], batch: bool) -> Outcome | list[Outcome]:
        outcomes = [self.attempt(a.ctx.task_id, a.ctx.attempt) for a in attempts]
        return outcomes if batch else outcomes[0]

    def batches(self, kind: str) -> float:
        return 0.02 if kind in self.batch_kinds else 0.0  # seconds of work a batch holds, as local processes'

    def terminate_running(self, grace: float) -> None:
        self.terminated.append(grace)
        if self.on_terminate is not None:
            self.on_terminate(self)

    def release(self, tid: str, result: Outcome | BaseException = OK) -> None:
        for i, (held_tid, future) in enumerate(self.held):
            if held_tid == tid:
                del self.held[i]
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
                return
        raise AssertionError(f"{tid} is not held")

    def terminate_held(self) -> None:
        """What LocalPools does to running shell tasks: each attempt ends 'terminated by the runner'."""
        while self.held:
            self.release(self.held[0][0], Outcome.because(OutcomeReason.TERMINATED_BY_RUNNER, exit_code=1))


class Job:
    """Tasks, scripted attempt results, a recording ``record`` callback and a scheduler over them."""

    def __init__(self, tasks: dict[str, dict[str, Any]], *, workers: int = 4, cpus: int = 64,
                 memory_mb: float | None = None, keep_going: bool = False, retry_backoff: float = 0.0,
                 kill_grace: float = 0.0, pools: FakePools | None = None, clock: FakeClock | None = None,
                 memory_in_use: Callable[[], float] | None = None, limits: dict[str, Any] | None = None,
                 tick: Callable[[Job, Scheduler], None] | None = None) -> None:
        dependents: dict[str, list[str]] = {tid: [] for tid in tasks}
        for tid, t in tasks.items():
            for d in t.get("deps", ()):
                dependents[d].append(tid)
        self.runs = {
            tid: TaskRun(id=tid, kind=t.get("kind", "shell"), priority=t.get("priority", 1.0),
                         retries=t.get("retries", 0), shape=t.get("shape") or Resources(
                             cpus_per_rank=t.get("cpus", 1), memory_mb=t.get("memory_mb")),
                         deps=tuple(t.get("deps", ())), dependents=tuple(sorted(dependents[tid])),
                         attempts=t.get("attempts_before", 0), attempts_before=t.get("attempts_before", 0))
            for tid, t in tasks.items()
        }
        # results[tid]: one entry per attempt (the last one repeats); OK by default
        self.results: dict[str, list[Outcome | BaseException]] = {tid: list(t.get("results", [OK]))
                                                                  for tid, t in tasks.items()}
        self.records: list[tuple[str, TaskState, dict[str, Any]]] = []
        self.running: set[str] = set()  # what the scheduler has launched and not yet seen end
        self.peak_running = 0
        self.peak_cpus = 0
        self.peak_memory = 0.0
        self.pools = pools or FakePools()
        self.pools.cpus_of = lambda tid: self.runs[tid].cpus
        self.pools.attempt = self.attempt
        self.ticks = 0
        self._tick = tick
        self.sched = Scheduler(
            self.runs, self.pools,
            Limits(max_workers=workers, cpus=cpus, memory_mb=memory_mb, memory_in_use=memory_in_use,
                   **(limits or {})),
            Options(keep_going=keep_going, retry_backoff=retry_backoff, kill_grace=kill_grace),
            self.prepare, self.record, tick=self.tick, clock=clock or FakeClock(),
        )

    def prepare(self, r: TaskRun) -> Attempt:
        ctx = TaskContext(task_id=r.id, run_dir="/run", work_dir=f"/run/ranks/rank-0000/tasks/{r.id}", rank=0,
                          attempt=r.attempts, host="node-a")
        return Attempt(Payload(id=r.id, kind=r.kind), ctx, links=(), env={}, chdir=False, keep=(),
                       priority=r.priority)

    def attempt(self, tid: str, attempt: int) -> Outcome:
        script = self.results[tid]
        result = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def record(self, r: TaskRun, extra: dict[str, Any]) -> None:
        self.records.append((r.id, r.state, dict(extra)))
        if r.state is TaskState.RUNNING:
            self.running.add(r.id)
        else:
            self.running.discard(r.id)
        self.peak_running = max(self.peak_running, len(self.running))
        self.peak_cpus = max(self.peak_cpus, sum(self.runs[t].cpus for t in self.running))
        self.peak_memory = max(self.peak_memory, sum(self.runs[t].memory_mb for t in self.running))

    def tick(self, sched: Scheduler) -> None:
        self.ticks += 1
        assert self.ticks < 40, "the scheduler did not finish"
        if self._tick is not None:
            self._tick(self, sched)

    def run(self) -> Job:
        self.sched.run()
        return self

    # --- what happened ---

    def launches(self) -> list[str]:
        return [tid for tid, state, _ in self.records if state is TaskState.RUNNING]

    def of(self, tid: str) -> list[tuple[TaskState, dict[str, Any]]]:
        return [(state, extra) for t, state, extra in self.records if t == tid]

    def states(self) -> dict[str, TaskState]:
        return {tid: r.state for tid, r in self.runs.items()}

    def index(self, tid: str, state: TaskState) -> int:
        return [(t, s) for t, s, _ in self.records].index((tid, state))

    def check_counts(self) -> None:
        expected = Counter(r.state for r in self.runs.values())
        assert {s: n for s, n in self.sched.counts.items() if n} == dict(expected)

