"""What each attempt carries: the task as plain data (``Payload``, with an agent's request), where it runs
and the input files it links; built on the scheduler thread for every launch, so kept cheap: nothing is
kept per task, and the tasks of a matrix entry that differ only by their id and matrix values get their
payload from the entry's shared fields, without a ``TaskSpec`` each."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

from cmbagent_batch.attempt import Attempt, Payload, TaskContext
from cmbagent_batch.execute.prepare import Prepared, input_links
from cmbagent_batch.execute.runs import TaskRun
from cmbagent_batch.llm.endpoint import DEFAULT_KEY_ENV, DEFAULT_URL
from cmbagent_batch.llm.local_model import LocalModel
from cmbagent_batch.place.launch import Where, launch_env
from cmbagent_batch.spec.model import Isolation, JobSpec, TaskSpec, thaw
from cmbagent_batch.spec.tasks import Entry, Tasks

# The TaskSpec fields a shell or python task's payload is made of (besides its id).
_PAYLOAD_FIELDS = ("kind", "run", "call", "args", "env", "outputs", "timeout", "models", "budget_usd")


class Launcher:
    """The scheduler's ``prepare``: the ``Attempt`` to hand over next for a task. ``on_ranks``: the attempt
    goes to an MPI worker rank, which sets its place (rank, host, work directory and environment) and
    journals its end with what ``Attempt.journal`` says (the run and the task's fingerprints)."""

    def __init__(self, p: Prepared, on_ranks: bool, where: Where | None = None) -> None:
        self._p = p
        self._where = where  # where placed tasks are launched (the job books its inventory)
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
        self._in_processes = self._ex.isolation is Isolation.PROCESS  # python tasks run in their work directory
        self._tasks = p.spec.tasks if isinstance(p.spec.tasks, Tasks) else None
        self._shared: dict[int, bool] = {}  # by a matrix entry's start: its tasks' payloads differ by id alone
        self._routes: dict[str, dict[str, Any]] = {}  # by llm.models key: made once, not for every launch

    def __call__(self, r: TaskRun) -> Attempt:
        p, ex = self._p, self._ex
        made, matrix = self._task(r.id)
        payload = _payload(self._spec, made, self._base, p.run_id, r.id, self._routes)
        python = made.kind == "python"
        if self._on_ranks:  # the worker that gets it sets its place (rank -1: not known on rank 0)
            # A placed attempt's host, on rank 0, is the node it was placed on: a worker there gets it.
            ctx = TaskContext(r.id, p.run_dir, "", -1, r.attempts, r.placement.hosts[0] if r.placement else "",
                              matrix, self._layout.sharding)
            env = self._no_env
            r.fp_record = p.fps.record(r.id)  # the Recorder's too, when the task's end comes
            journal: dict[str, Any] | None = {"run": p.run_id, **r.fp_record}
        else:
            ctx = TaskContext(r.id, p.run_dir, self._layout.work_dir(0, r.id), 0, r.attempts, self._host, matrix,
                              self._layout.sharding)
            env = self._no_env if python else self._env
            journal = None
        if r.placement is not None and self._where is not None:
            launch = launch_env(r.placement, r.shape, self._where, task_id=r.id, attempt=r.attempts)
            r.launch = launch["CMBAGENT_LAUNCH"]
            ctx = dataclasses.replace(ctx, launch=tuple(launch.items()))
        links, missing = input_links(p, r.id)
        return Attempt(payload, ctx, links, env, chdir=self._in_processes and python, keep=ex.keep,
                       kill_grace=ex.kill_grace, missing=missing, priority=r.priority, journal=journal)

    def _task(self, tid: str) -> tuple[TaskSpec, dict[str, Any]]:
        """What the task's payload is made from (the task, or its matrix entry's shared fields) and its
        matrix values."""
        position = self._spec.position(tid)
        tasks = self._tasks
        if tasks is not None:
            entry = tasks.entry_at(position)
            if entry.grid is not None and entry.template is not None and self._shares_payload(entry):
                return entry.template, thaw(entry.values(position - entry.start))
        t = self._spec.tasks[position]
        return t, thaw(t.matrix) if t.matrix else {}

    def _shares_payload(self, entry: Entry) -> bool:
        shared = self._shared.get(entry.start)
        if shared is None:
            assert entry.template is not None
            shared = self._shared[entry.start] = entry.template.kind in ("shell", "python") and not any(
                entry.varies(name) for name in _PAYLOAD_FIELDS)
        return shared


def _payload(spec: JobSpec, task: TaskSpec, base: str, run_id: str, task_id: str,
             routes: dict[str, dict[str, Any]]) -> Payload:
    agent = task.kind == "agent"
    calls = (task.model,) if agent and task.model else task.models
    return Payload(id=task_id, kind=task.kind, run=task.run, call=task.call, args=thaw(task.args),
                   env=dict(task.env), outputs=task.outputs, timeout=task.timeout or spec.execution.task_timeout,
                   python_path=(base,), agent=_agent_request(spec, task, run_id) if agent else None,
                   models=_grant(spec, task, run_id, calls, routes) if calls else None)


def _grant(spec: JobSpec, task: TaskSpec, run_id: str, keys: tuple[str, ...],
           routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a grant of the rank's gateway needs besides the attempt's place (``tasks/metered.py``)."""
    return {"job": spec.job.name, "run_id": run_id, "source": "agent" if task.kind == "agent" else "task",
            "agent": task.agent, "routes": [routes.get(key) or routes.setdefault(key, route(spec, key)) for key in keys], "job_usd": spec.job.budget_usd,
            "task_usd": task.budget_usd}


def route(spec: JobSpec, key: str) -> dict[str, Any]:
    """A model of llm.models as a gateway route (``gateway.grants.Route``); a local one with what its
    server needs, in "local"."""
    m = spec.llm.models[key]
    assert m.price is not None  # the loader prices every model
    local = m.provider == "local"
    out: dict[str, Any] = {"key": m.name, "model": m.model, "base_url": m.base_url or DEFAULT_URL,
                           "api_key_env": None if local else m.api_key_env or DEFAULT_KEY_ENV,
                           "price": dataclasses.asdict(m.price), "price_table": m.price_table, "timeout": m.timeout,
                           "provider": m.provider}
    if local:
        out["local"] = dataclasses.asdict(LocalModel.from_spec(m, spec.path))
    return out


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
