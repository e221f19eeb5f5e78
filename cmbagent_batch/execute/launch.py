"""What each attempt carries: the task as plain data (``Payload``, with an agent's request), where it runs
and the input files it links; built on the scheduler thread for every launch, so kept cheap (a task's
payload is built once)."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

from cmbagent_batch.attempt import Attempt, Payload, TaskContext
from cmbagent_batch.execute.prepare import Prepared, input_links
from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.llm.local_model import LocalModel
from cmbagent_batch.spec.model import Isolation, JobSpec, TaskSpec, thaw


class Launcher:
    """The scheduler's ``prepare``: the ``Attempt`` to hand over next for a task. ``on_ranks``: the attempt
    goes to an MPI worker rank, which sets its place (rank, host, work directory and environment) and
    journals its end with what ``Attempt.journal`` says (the run and the task's fingerprints)."""

    def __init__(self, p: Prepared, on_ranks: bool) -> None:
        self._p = p
        self._spec = p.spec
        self._ex = p.spec.execution
        self._on_ranks = on_ranks
        self._base = os.path.dirname(os.path.abspath(p.spec.path))
        self._layout = p.layout
        p.layout.record()  # before the first task: the run directory keeps its layout from now on
        self._host = socket.gethostname()
        # python workers inherit the environment; under MPI a worker rank uses its own (its rank, node)
        self._env = dict(os.environ)
        self._no_env: dict[str, str] = {}

    def __call__(self, r: TaskRun) -> Attempt:
        p, ex, t = self._p, self._ex, self._p.spec.task(r.id)  # made when needed: none is kept per task
        local = not self._on_ranks
        # Under MPI the worker that gets the attempt sets its place (rank -1: not known on rank 0).
        sharding = self._layout.sharding
        if local:
            ctx = TaskContext(task_id=r.id, run_dir=p.run_dir, work_dir=self._layout.work_dir(0, r.id), rank=0,
                              attempt=r.attempts, host=self._host, matrix=thaw(t.matrix) if t.matrix else {},
                              sharding=sharding)
        else:
            ctx = TaskContext(task_id=r.id, run_dir=p.run_dir, work_dir="", rank=-1, attempt=r.attempts, host="",
                              matrix=thaw(t.matrix) if t.matrix else {}, sharding=sharding)
        links, missing = input_links(p, r.id)
        payload = _payload(self._spec, t, self._base, p.run_id)
        env = self._env if t.kind != "python" and local else self._no_env
        journal = None if local else {"run": p.run_id, **p.fps[r.id].to_dict()}
        return Attempt(payload, ctx, links, env, chdir=ex.isolation is Isolation.PROCESS and t.kind == "python",
                       keep=ex.keep, kill_grace=ex.kill_grace, missing=missing, priority=r.priority, journal=journal)


def _payload(spec: JobSpec, task: TaskSpec, base: str, run_id: str) -> Payload:
    return Payload(id=task.id, kind=task.kind, run=task.run, call=task.call, args=thaw(task.args),
                   env=dict(task.env), outputs=task.outputs, timeout=task.timeout or spec.execution.task_timeout,
                   python_path=(base,), agent=_agent_request(spec, task, run_id) if task.kind == "agent" else None)


def _agent_request(spec: JobSpec, task: TaskSpec, run_id: str) -> dict[str, Any]:
    """What the agent process needs to know (``tasks/agent/launch.py`` adds the attempt's place, and the URL of a
    local model's server); no secret."""
    m = spec.llm.models[task.model or ""]
    assert m.price is not None  # the loader prices every model
    model = {"name": m.name, "model": m.model, "base_url": m.base_url, "api_key_env": m.api_key_env,
             "timeout": m.timeout, "max_retries": m.max_retries, "price": dataclasses.asdict(m.price),
             "price_table": m.price_table}
    if m.provider == "local":
        model["local"] = dataclasses.asdict(LocalModel.from_spec(m, spec.path))  # the agent side keys on it
    return {
        "job": spec.job.name, "run_id": run_id, "agent": task.agent, "instructions": task.instructions,
        "inputs": list(task.inputs), "max_turns": task.max_turns, "code_execution": task.code_execution,
        "model": model, "budget": {"job_usd": spec.job.budget_usd, "task_usd": task.budget_usd},
    }
