"""The attempts rank 0 hands over: a matrix entry's tasks that differ only by their id and matrix values
get their payload from the entry's shared fields, with no task made each, and it is the payload the task
itself makes; an attempt for a worker rank carries the task's fingerprints for the worker's journal.
Tiny tasks go over in batches of the seconds of work their pools say."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.execute import launch
from cmbagent_batch.execute.launch import Launcher
from cmbagent_batch.execute.prepare import Prepared, prepare, task_runs
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.spec.config import effective_config
from cmbagent_batch.spec.loader import load_spec
from cmbagent_batch.spec.model import thaw
from cmbagent_batch.spec.tasks import Tasks
from cmbagent_batch.states import TaskState
from tests.helpers.fake_scheduler import FakePools, Job

SPEC = """\
version: 1
job: {name: launch}
execution: {backend: mpi, task_timeout: 30}
tasks:
  - id: p-{a}-{b}
    kind: python
    call: mod:run
    matrix: {a: [1, 2], b: [x, "y"]}
  - id: q-{a}
    kind: python
    call: mod:run
    args: {a: "{a}", fixed: [1, {k: v}]}
    matrix: {a: [1, 2]}
  - id: s-{n}
    kind: shell
    run: echo hello > out.txt
    outputs: [out.txt]
    env: {WHO: me}
    matrix: {n: [1, 2]}
  - id: t-{n}
    kind: shell
    run: echo {n} > out.txt
    matrix: {n: [1, 2]}
  - id: plain
    kind: shell
    run: echo hi
"""


def prepared(tmp_path: Path) -> Prepared:
    (tmp_path / "mod.py").write_text("def run(**kwargs):\n    return kwargs\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    config = effective_config(load_spec(str(spec)), {}, ())
    p = prepare(config, Cache(str(tmp_path / "cache"), lambda message: None), lambda message: None,
                run_dir=str(tmp_path / "run"))
    os.makedirs(p.run_dir)
    return p


@pytest.mark.parametrize("on_ranks", [True, False])
def test_each_attempt_carries_the_payload_and_matrix_values_its_task_makes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_ranks: bool) -> None:
    p = prepared(tmp_path)
    runs = task_runs(p).runs
    assert len(runs) == 11
    made: list[int] = []
    tasks_item = Tasks.__getitem__

    def counted(self: Tasks, i: Any) -> Any:
        made.append(i)
        return tasks_item(self, i)

    monkeypatch.setattr(Tasks, "__getitem__", counted)
    launcher = Launcher(p, on_ranks=on_ranks)
    attempts = {tid: launcher(r) for tid, r in runs.items()}
    if not on_ranks:  # (on ranks, the fingerprints make the tasks they need: a matter of their own)
        # made one by one: the tasks whose args or command vary, and the plain task (its entry's only one)
        assert sorted(p.spec.tasks.id_at(i) for i in made) == ["plain", "q-1", "q-2", "t-1", "t-2"]
    monkeypatch.undo()
    base = str(tmp_path)
    for tid, attempt in attempts.items():
        task = p.spec.task(tid)
        assert attempt.payload == launch._payload(p.spec, task, base, p.run_id, tid, {}), tid
        assert attempt.ctx.task_id == tid and attempt.ctx.matrix == thaw(task.matrix)
        assert attempt.ctx.attempt == runs[tid].attempts and attempt.priority == runs[tid].priority
        assert attempt.chdir is (task.kind == "python")  # isolation: process, the default
        if on_ranks:
            assert (attempt.ctx.rank, attempt.ctx.work_dir, attempt.env) == (-1, "", {})
            assert attempt.journal == {"run": p.run_id, **p.fps[tid].to_dict()}
        else:
            assert (attempt.ctx.rank, attempt.ctx.work_dir) == (0, p.layout.work_dir(0, tid))
            assert attempt.journal is None
            assert attempt.env == ({} if task.kind == "python" else dict(os.environ))
    assert attempts["p-2-y"].ctx.matrix == {"a": 2, "b": "y"} and attempts["p-2-y"].payload.id == "p-2-y"
    assert attempts["q-2"].payload.args == {"a": 2, "fixed": [1, {"k": "v"}]}
    assert attempts["s-2"].payload.env == {"WHO": "me"} and attempts["s-2"].payload.outputs == ("out.txt",)
    # every attempt gets containers of its own: a task that changes its arguments changes no other's
    assert attempts["p-1-x"].payload.env is not attempts["p-1-y"].payload.env
    assert attempts["q-1"].payload.args["fixed"] is not attempts["q-2"].payload.args["fixed"]


@pytest.mark.parametrize("seconds", [0.02, 0.05, 0.2])
def test_tiny_tasks_go_over_in_batches_of_the_seconds_of_work_their_pools_say(seconds: float) -> None:
    # As rank 0's pools say 0.05 s (a call to a worker rank costs more than one to a local process, 0.02 s).
    pools = FakePools()
    pools.batches = lambda kind: seconds
    wall = 0.004
    tasks = {f"s{i:03d}": {"kind": "shell", "results": [Outcome(ok=True, wall_s=wall)]} for i in range(400)}
    job = Job(tasks, workers=2, pools=pools, limits={"prefetch_kinds": frozenset({"shell"}), "prefetch": 2}).run()
    sizes = [len(b) for b in pools.batches_seen]
    assert sizes[0] == 1 and sum(sizes) == 400  # one until the duration is known
    assert abs(max(sizes) - seconds / wall) <= 1, sizes
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
