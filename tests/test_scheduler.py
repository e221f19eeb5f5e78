"""The scheduler as pure logic: fake pools, fake attempts, a fake clock; no processes, no files.

Two kinds of fake executor, both in ``FakePools`` (tests/helpers/fake_scheduler.py):

* tasks not in ``hold`` run synchronously inside ``submit`` (the future is done when it is returned);
* tasks in ``hold`` get a future that the test completes by hand, from the scheduler's ``tick`` callback,
  which runs on the scheduler thread after every loop iteration, so everything stays single-threaded and
  deterministic.
"""

from __future__ import annotations

from typing import Any

import pytest

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.states import OutcomeReason, StopReason, TaskState
from tests.helpers.fake_scheduler import OK, FakeClock, FakePools, Job, fail

# --- order -----------------------------------------------------------------------------------------


def test_ready_tasks_start_by_longest_remaining_path_then_by_id() -> None:
    job = Job({
        "x": {"priority": 1},
        "y": {"priority": 5},
        "z": {"priority": 4, "deps": ["y"]},
        "b": {"priority": 3},
        "a": {"priority": 3},
    }, workers=1).run()
    # z becomes ready after y and still beats the tasks that were ready from the start
    assert job.launches() == ["y", "z", "a", "b", "x"]
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
    job.check_counts()


def test_two_schedulers_of_the_same_job_launch_in_the_same_order() -> None:
    tasks = {f"t{i:02d}": {"priority": float(i % 3)} for i in range(12)}
    tasks["t05"]["deps"] = ["t01", "t02"]
    first = Job(tasks, workers=2).run().launches()
    second = Job(tasks, workers=2).run().launches()
    assert first == second
    # t05 (priority 2) waits for t01 (priority 1), then goes ahead of the other priority-1 tasks
    assert first == ["t02", "t08", "t11", "t01", "t05", "t04", "t07", "t10", "t00", "t03", "t06", "t09"]


def test_a_task_waits_for_every_dependency() -> None:
    def tick(job: Job, sched: Scheduler) -> None:
        if job.pools.held and job.runs["a"].state is TaskState.SUCCEEDED:
            job.pools.release("b")

    job = Job({"a": {"priority": 3}, "b": {"priority": 2}, "c": {"deps": ["a", "b"]}},
              pools=FakePools(hold={"b"}), tick=tick).run()
    assert job.index("a", TaskState.SUCCEEDED) < job.index("b", TaskState.SUCCEEDED)
    # c was not launched in the iteration after a succeeded while b still ran
    assert job.index("b", TaskState.SUCCEEDED) < job.index("c", TaskState.RUNNING)
    assert job.states()["c"] is TaskState.SUCCEEDED


def test_no_barrier_between_levels() -> None:
    """A long level-0 task does not hold back a level-1 task whose own dependency is done."""
    seen: dict[str, TaskState] = {}

    def tick(job: Job, sched: Scheduler) -> None:
        if not any(tid == "long" for tid, _ in job.pools.held):
            return
        if job.runs["after-short"].state is TaskState.SUCCEEDED or job.ticks > 6:  # > 6: a barrier; end it
            seen["long when after-short finished"] = job.runs["long"].state
            job.pools.release("long")

    job = Job({
        "long": {"priority": 3},
        "after-long": {"priority": 2, "deps": ["long"]},
        "short": {"priority": 2},
        "after-short": {"priority": 1, "deps": ["short"]},
    }, workers=2, pools=FakePools(hold={"long"}), tick=tick).run()
    assert seen == {"long when after-short finished": TaskState.RUNNING}
    done = [tid for tid, state, _ in job.records if state is TaskState.SUCCEEDED]
    assert done == ["short", "after-short", "long", "after-long"]


# --- limits ----------------------------------------------------------------------------------------


def release_oldest(job: Job, sched: Scheduler) -> None:
    if job.pools.held:
        job.pools.release(job.pools.held[0][0])


# The limit tests use the synchronous executor: an attempt counts as running from its launch until the
# scheduler has handled its end, which is exactly what the limits constrain.


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_never_more_than_max_workers_at_once(workers: int) -> None:
    job = Job({f"t{i}": {} for i in range(7)}, workers=workers).run()
    assert job.peak_running == workers
    assert len(job.launches()) == 7 and set(job.states().values()) == {TaskState.SUCCEEDED}


def test_max_workers_with_attempts_that_end_later() -> None:
    tasks = {f"t{i}": {} for i in range(4)}
    job = Job(tasks, workers=2, pools=FakePools(hold=tasks), tick=release_oldest).run()
    assert job.pools.peak_live == 2
    assert set(job.states().values()) == {TaskState.SUCCEEDED}


def test_cpu_reservations_never_add_up_past_the_limit() -> None:
    cpus = {"a": 3, "b": 2, "c": 2, "d": 1, "e": 1, "f": 3, "g": 4}
    tasks = {tid: {"cpus": n, "priority": 10 - i} for i, (tid, n) in enumerate(cpus.items())}
    job = Job(tasks, workers=10, cpus=4).run()
    assert job.peak_cpus == 4
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
    # a smaller task that fits goes ahead of a bigger one that does not: a (3) then d (1), not b (2)
    assert job.launches()[:2] == ["a", "d"]


def test_prefetched_attempts_keep_cpu_reservations_within_the_limit() -> None:
    tasks = {f"p{i}": {"kind": "python", "cpus": 2} for i in range(4)}
    job = Job(tasks, workers=2, cpus=2, limits={"prefetch_kinds": frozenset({"python"}), "prefetch": 2}).run()
    assert job.peak_cpus == 2
    assert set(job.states().values()) == {TaskState.SUCCEEDED}


def test_prefetch_never_starts_a_task_beside_one_of_another_kind_past_max_workers() -> None:
    job = Job({"a-shell": {"kind": "shell", "priority": 2}, "b-python": {"kind": "python"}}, workers=1,
              limits={"prefetch_kinds": frozenset({"python"}), "prefetch": 2}).run()
    assert job.peak_running == 1
    assert job.launches() == ["a-shell", "b-python"]


def test_a_task_bigger_than_the_cpu_limit_runs_alone() -> None:
    job = Job({"big": {"cpus": 16, "priority": 2}, "small": {"cpus": 1}}, workers=4, cpus=4).run()
    assert job.peak_running == 1
    assert job.launches() == ["big", "small"]


def test_memory_reservations_never_add_up_past_the_limit() -> None:
    job = Job({f"t{i}": {"memory_mb": 600.0} for i in range(5)}, workers=5, memory_mb=1300.0).run()
    assert job.peak_running == 2 and job.peak_memory == 1200.0
    assert set(job.states().values()) == {TaskState.SUCCEEDED}


@pytest.mark.slow
def test_memory_in_use_above_the_safety_fraction_holds_launches_until_it_drops() -> None:
    memory = {"fraction": 0.95, "probes": 0}

    def in_use() -> float:
        memory["probes"] += 1
        return memory["fraction"]

    def tick(job: Job, sched: Scheduler) -> None:
        if job.pools.submitted == ["a"] and memory["fraction"] > 0.8 and memory["probes"] >= 2:
            memory["fraction"] = 0.5  # held for two checks; now memory is freed
        elif memory["fraction"] < 0.8:
            release_oldest(job, sched)

    job = Job({"a": {"priority": 2}, "b": {}, "c": {}}, workers=3, memory_in_use=in_use,
              pools=FakePools(hold={"a", "b", "c"}), tick=tick).run()
    assert memory["probes"] >= 2
    assert job.launches() == ["a", "b", "c"]
    assert job.pools.peak_live >= 2  # once memory dropped, b and c ran beside a
    assert set(job.states().values()) == {TaskState.SUCCEEDED}


# --- retries and failures --------------------------------------------------------------------------


def test_retries_with_doubling_backoff_then_success() -> None:
    job = Job({"t": {"retries": 2, "results": [fail(), fail("exit code 2"), OK]}}, retry_backoff=1.0).run()
    assert [(s, e.get("attempt")) for s, e in job.of("t")] == [
        (TaskState.RUNNING, 1), (TaskState.RETRYING, 1),
        (TaskState.RUNNING, 2), (TaskState.RETRYING, 2),
        (TaskState.RUNNING, 3), (TaskState.SUCCEEDED, 3),
    ]
    retrying = [e for s, e in job.of("t") if s is TaskState.RETRYING]
    assert [e["reason"] for e in retrying] == ["exit code 1", "exit code 2"]
    # 1 s doubling, with jitter of up to half: [0.5, 1] then [1, 2]
    assert 0.5 <= retrying[0]["retry_in_s"] <= 1.0
    assert 1.0 <= retrying[1]["retry_in_s"] <= 2.0
    assert job.runs["t"].attempts == 3
    job.check_counts()


def test_retries_count_from_this_run_when_resuming() -> None:
    job = Job({"t": {"retries": 1, "attempts_before": 2, "results": [fail()]}}, retry_backoff=1.0).run()
    assert [(s, e.get("attempt")) for s, e in job.of("t")] == [
        (TaskState.RUNNING, 3), (TaskState.RETRYING, 3), (TaskState.RUNNING, 4), (TaskState.FAILED, 4),
    ]
    first_delay = job.of("t")[1][1]["retry_in_s"]
    assert 0.5 <= first_delay <= 1.0  # the backoff starts again too


def test_exhausted_retries_fail_the_task_and_block_its_descendants_naming_the_root() -> None:
    job = Job({
        "root": {"retries": 1, "results": [fail("exit code 3")], "priority": 4},
        "child": {"deps": ["root"], "priority": 3},
        "other": {"priority": 1},
        "join": {"deps": ["child", "other"], "priority": 2},
        "grandchild": {"deps": ["join"]},
    }, keep_going=True).run()
    assert job.states() == {
        "root": TaskState.FAILED, "child": TaskState.UPSTREAM_FAILED, "other": TaskState.SUCCEEDED,
        "join": TaskState.UPSTREAM_FAILED, "grandchild": TaskState.UPSTREAM_FAILED,
    }
    assert job.of("root")[-1] == (TaskState.FAILED, {"attempt": 2, "reason": "exit code 3"})
    for tid in ("child", "join", "grandchild"):
        assert job.of(tid) == [(TaskState.UPSTREAM_FAILED, {"reason": "upstream task 'root' failed", "root": "root"})]
        assert job.runs[tid].reason == "upstream task 'root' failed"
    job.check_counts()


def test_an_exception_from_the_future_fails_the_attempt_with_its_type_and_message() -> None:
    job = Job({"t": {"results": [TypeError("cannot pickle '_thread.lock' object")]}}).run()
    assert job.runs["t"].state is TaskState.FAILED
    assert job.runs["t"].reason == "TypeError: cannot pickle '_thread.lock' object"
    assert job.runs["t"].outcome is not None and "TypeError" in (job.runs["t"].outcome.traceback or "")


def fail_fast_job(keep_going: bool) -> Job:
    def tick(job: Job, sched: Scheduler) -> None:
        if keep_going and job.runs["bad"].state is TaskState.FAILED and job.pools.held:
            job.pools.release("slow")

    return Job({
        "bad": {"priority": 4, "results": [fail("exit code 3")]},
        "after-bad": {"priority": 3, "deps": ["bad"]},
        "slow": {"priority": 3},
        "later": {"priority": 1},
    }, workers=2, keep_going=keep_going, tick=tick,
        pools=FakePools(hold={"slow"}, on_terminate=FakePools.terminate_held)).run()


def test_keep_going_finishes_the_independent_branches() -> None:
    job = fail_fast_job(keep_going=True)
    assert job.states() == {"bad": TaskState.FAILED, "after-bad": TaskState.UPSTREAM_FAILED,
                            "slow": TaskState.SUCCEEDED, "later": TaskState.SUCCEEDED}
    assert job.pools.terminated == []
    assert job.sched.stop_reason is None


def test_fail_fast_stops_launching_and_cancels_what_runs() -> None:
    job = fail_fast_job(keep_going=False)
    assert job.states() == {"bad": TaskState.FAILED, "after-bad": TaskState.UPSTREAM_FAILED,
                            "slow": TaskState.CANCELLED, "later": TaskState.CANCELLED}
    assert job.sched.stop_reason == "fail-fast"
    assert job.pools.terminated == [0.0]
    assert job.runs["slow"].reason == "terminated by the runner (fail-fast)"
    assert job.runs["later"].reason == "not run: the job stopped (fail-fast)"
    assert job.of("later") == [(TaskState.CANCELLED, {"reason": "not run: the job stopped (fail-fast)"})]
    assert "later" not in job.pools.submitted
    job.check_counts()


# --- stopping --------------------------------------------------------------------------------------


def test_request_stop_terminates_what_runs_and_leaves_the_rest_pending() -> None:
    def tick(job: Job, sched: Scheduler) -> None:
        if job.runs["flaky"].state is TaskState.RETRYING and sched.stop_reason is None:
            sched.request_stop(StopReason.SIGTERM)

    job = Job({
        "running": {"priority": 3},
        "after": {"priority": 2, "deps": ["running"]},
        "flaky": {"priority": 3, "retries": 2, "results": [fail()]},
        "waiting": {"priority": 1},
    }, workers=2, retry_backoff=1000.0, kill_grace=2.5, tick=tick,
        pools=FakePools(hold={"running"}, on_terminate=FakePools.terminate_held)).run()
    assert job.pools.terminated == [2.5]
    assert job.states() == {"running": TaskState.INTERRUPTED, "after": TaskState.PENDING,
                            "flaky": TaskState.INTERRUPTED, "waiting": TaskState.PENDING}
    assert job.runs["running"].reason == "terminated by the runner (SIGTERM)"
    assert job.runs["flaky"].reason == "exit code 1"  # the failure that put it in backoff
    assert job.of("after") == [] and job.of("waiting") == []
    assert job.sched.stop_reason == "SIGTERM" and job.sched.abandoned == 0
    job.check_counts()


def test_attempts_that_outlive_the_stop_are_abandoned() -> None:
    """Python functions in threads cannot be killed: the run ends without them after the grace."""

    def tick(job: Job, sched: Scheduler) -> None:
        if job.pools.held and sched.stop_reason is None:
            sched.request_stop(StopReason.SIGINT)

    job = Job({"stuck": {}}, pools=FakePools(hold={"stuck"}), kill_grace=1.0, clock=FakeClock(step=3.0),
              tick=tick).run()
    assert job.states() == {"stuck": TaskState.INTERRUPTED}
    assert job.runs["stuck"].reason == "still running when the job stopped (SIGINT); abandoned"
    assert job.sched.abandoned == 1
    assert job.pools.terminated == [1.0]


def test_an_abandoned_attempt_keeps_no_outcome_of_the_attempt_before_it() -> None:
    """The recorder journals an ending attempt's measures from the task's outcome: an attempt abandoned
    at a stop has none, and must not be journaled with its failed predecessor's error and exit code."""

    def tick(job: Job, sched: Scheduler) -> None:
        if job.pools.held and job.runs["stuck"].attempts == 1:
            job.pools.release("stuck", Outcome(ok=False, error="exit code 3", exit_code=3))
        elif job.pools.held and sched.stop_reason is None:
            sched.request_stop(StopReason.SIGINT)

    job = Job({"stuck": {"retries": 1}}, pools=FakePools(hold={"stuck"}), retry_backoff=0.0, kill_grace=1.0,
              clock=FakeClock(step=3.0), tick=tick).run()
    r = job.runs["stuck"]
    assert (r.state, r.attempts) == (TaskState.INTERRUPTED, 2)
    assert r.reason == "still running when the job stopped (SIGINT); abandoned"
    assert r.outcome is None


# --- dead worker processes -------------------------------------------------------------------------

SEGV = Outcome(ok=False, error="worker died: SIGSEGV", exit_code=-11, worker_died=True,
               reason=OutcomeReason.WORKER_DIED)


def test_a_task_whose_worker_died_is_retried_per_retries() -> None:
    job = Job({"t": {"kind": "python", "retries": 1, "results": [SEGV, OK]}}).run()
    assert job.runs["t"].state is TaskState.SUCCEEDED and job.runs["t"].attempts == 2
    assert (TaskState.RETRYING, {"attempt": 1, "reason": "worker died: SIGSEGV", "retry_in_s": 0.0}) in job.of("t")


def test_a_task_whose_worker_always_dies_fails_with_that_reason_and_the_job_goes_on() -> None:
    job = Job({"dies": {"kind": "python", "priority": 2, "results": [SEGV]},
               "fine": {"kind": "python"}}, workers=1, keep_going=True).run()
    assert job.states() == {"dies": TaskState.FAILED, "fine": TaskState.SUCCEEDED}
    assert job.runs["dies"].reason == "worker died: SIGSEGV"


# --- batches of tiny tasks -------------------------------------------------------------------------

TINY = Outcome(ok=True, wall_s=0.0001)


def batch_job(tasks: dict[str, dict[str, Any]], **kwargs: Any) -> Job:
    pools = FakePools()
    pools.batch_kinds = {"python"}
    return Job(tasks, workers=2, pools=pools,
               limits={"prefetch_kinds": frozenset({"python"}), "prefetch": 2}, **kwargs)


def test_tiny_tasks_go_over_in_batches_once_their_duration_is_known() -> None:
    job = batch_job({f"p{i:03d}": {"kind": "python", "results": [TINY]} for i in range(200)}).run()
    sizes = [len(b) for b in job.pools.batches_seen]
    assert sizes[:4] == [1, 1, 1, 1]  # durations unknown: one attempt per submission
    assert max(sizes) > 1 and sum(sizes) == 200
    assert max(sizes) <= 200 // 4 + 1  # never so many that a worker is left without
    assert all([state for state, _ in job.of(tid)] == [TaskState.RUNNING, TaskState.SUCCEEDED] for tid in job.runs)
    assert [tid for batch in job.pools.batches_seen for tid in batch] == sorted(job.runs)  # priority order (by id)
    job.check_counts()


def test_tasks_that_take_long_or_reserve_resources_are_not_batched() -> None:
    slow = Outcome(ok=True, wall_s=1.0)
    tasks = {f"s{i:02d}": {"kind": "python", "results": [slow]} for i in range(20)}
    tasks.update({f"r{i:02d}": {"kind": "python", "results": [TINY], "memory_mb": 10.0} for i in range(20)})
    job = batch_job(tasks).run()
    assert [len(b) for b in job.pools.batches_seen] == [1] * 40
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
