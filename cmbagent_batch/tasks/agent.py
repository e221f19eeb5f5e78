"""Run one attempt of an agent task: an LLM agent in a process of its own, supervised like a shell task.

AG2 and the code an agent runs change process-wide state (event loops, the working directory, imported
modules), so each attempt is a fresh ``python -m cmbagent_batch.tasks.agent_main`` process in its own
process group: a timeout or a stop kills it with everything it started. This side imports neither ag2 nor
openai. It writes what the agent process needs to ``logs/agent-request.json`` (never an API key: the
process inherits the environment variable that holds it), refuses to start when an LLM budget is already
spent, and turns what the process wrote to ``logs/agent-result.json`` into the attempt's outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from cmbagent_batch.tasks.base import Outcome, Payload, TaskContext
from cmbagent_batch.tasks.shell import ShellLaunch

REQUEST = "agent-request.json"
RESULT = "agent-result.json"
EXIT_BUDGET = 3  # the agent process stopped because a budget was spent

_meters: dict[str, Any] = {}
_meters_lock = threading.Lock()


def budget_problem(request: Mapping[str, Any], job_spent: float, task_spent: float) -> str | None:
    """Why no more LLM calls may start for this task, or None. Pure: the spending is measured elsewhere."""
    budget = request["budget"]
    job_cap, task_cap = budget.get("job_usd"), budget.get("task_usd")
    if job_cap is not None and job_spent >= job_cap:
        return f"the job's LLM budget is spent: ${job_spent:.4f} of job.budget_usd ${job_cap:.4f}"
    if task_cap is not None and task_spent >= task_cap:
        return f"the task's LLM budget is spent: ${task_spent:.4f} of budget_usd ${task_cap:.4f}"
    return None


def spent(run_dir: str, task_id: str) -> tuple[float, float]:
    """USD spent so far by the whole job and by this task (all runs), from the ledger files of ``run_dir``."""
    from cmbagent_batch.ledger.meter import SpendMeter

    with _meters_lock:
        meter = _meters.get(run_dir)
        if meter is None:
            meter = _meters[run_dir] = SpendMeter(run_dir)
        meter.refresh()
        return meter.total_usd, meter.task_usd(task_id)


def prepare(payload: Payload, ctx: TaskContext, base_env: Mapping[str, str], seen: int) -> ShellLaunch | Outcome:
    """Write the request, check the budgets, and get the agent process ready to start."""
    assert payload.agent is not None
    request = dict(payload.agent, task=ctx.task_id, attempt=ctx.attempt, rank=ctx.rank, host=ctx.host,
                   run_dir=ctx.run_dir, work_dir=ctx.work_dir, outputs=list(payload.outputs))
    job_spent, task_spent = spent(ctx.run_dir, ctx.task_id)
    if (why := budget_problem(request, job_spent, task_spent)) is not None:
        return Outcome(ok=False, error=f"not started: {why}", budget_exceeded=True)
    path = os.path.join(ctx.logs_dir, REQUEST)
    try:
        os.makedirs(ctx.logs_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(request, fh, indent=1)
        os.unlink(os.path.join(ctx.logs_dir, RESULT))
    except FileNotFoundError:
        pass
    except OSError as exc:
        return Outcome(ok=False, error=f"cannot write {path}: {exc.strerror or exc}")
    argv = [sys.executable, "-m", "cmbagent_batch.tasks.agent_main", path]
    return ShellLaunch.prepare(payload, ctx, base_env, seen, argv=argv)


def finish(outcome: Outcome, ctx: TaskContext) -> Outcome:
    """The outcome of the agent process, with the reason it gave in its result file."""
    try:
        with open(os.path.join(ctx.logs_dir, RESULT), encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = None
    if outcome.ok:
        if result is None or result.get("status") != "ok":
            return dataclasses.replace(outcome, ok=False, error="the agent process ended without a result")
        return outcome
    if result is None or outcome.timed_out or outcome.error == "terminated by the runner":
        stderr = os.path.join(ctx.logs_dir, "stderr.log")
        return dataclasses.replace(outcome, error=f"{outcome.error} (agent process; see {stderr})")
    message = str(result.get("message") or outcome.error)
    return dataclasses.replace(outcome, error=message, traceback=result.get("traceback"),
                               budget_exceeded=outcome.exit_code == EXIT_BUDGET)
