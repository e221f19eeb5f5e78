"""Run one attempt of an agent task: an LLM agent in a process of its own, supervised like a shell task.

AG2 and the code an agent runs change process-wide state (event loops, the working directory, imported
modules), so each attempt is a fresh ``python -m cmbagent_batch.tasks.agent.main`` process in its own
process group: a timeout or a stop kills it with everything it started. This side imports neither ag2 nor
openai. It writes what the agent process needs to ``logs/agent-request.json`` (never an API key: the
process gets its attempt's token for the rank's metering gateway, which enforces the budgets; the
runner opened that grant, and started a local model's server for it: ``tasks.metered``), and turns what
the process wrote to ``logs/agent-result.json`` into the attempt's outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cmbagent_batch.attempt import Outcome, Payload, TaskContext
from cmbagent_batch.llm.local_model import LocalModel, speed
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.shell import ShellLaunch

REQUEST = "agent-request.json"
RESULT = "agent-result.json"
EXIT_BUDGET = 3  # the agent process stopped because a budget was spent

def prepare(payload: Payload, ctx: TaskContext, base_env: Mapping[str, str], seen: int) -> ShellLaunch | Outcome:
    """Write the request and get the agent process ready to start."""
    assert payload.agent is not None
    request = dict(payload.agent, task=ctx.task_id, attempt=ctx.attempt, rank=ctx.rank, host=ctx.host,
                   run_dir=ctx.run_dir, work_dir=ctx.work_dir, outputs=list(payload.outputs))
    if (missing := _cannot_run(request)) is not None:
        return Outcome(ok=False, error=missing)
    _clear_outputs(ctx.work_dir, payload.outputs)
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
    argv = [sys.executable, "-m", "cmbagent_batch.tasks.agent.main", path]
    return ShellLaunch.prepare(payload, ctx, base_env, seen, argv=argv)


def _cannot_run(request: Mapping[str, Any]) -> str | None:
    """Why the agent process could not do its work here, found before it starts (and spends)."""
    missing = [m for m in ("ag2", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"agent tasks need AG2 and openai ({', '.join(missing)} not installed): "
                "pip install 'cmbagent-batch[agents]'")
    if request["code_execution"]:
        from cmbagent_batch.tasks.agent.sandbox import UNAVAILABLE, landlock_status

        abi, why = landlock_status()
        if abi == 0:
            return UNAVAILABLE.format(reason=why)
    return None


def _clear_outputs(work_dir: str, outputs: Sequence[str]) -> None:
    """Remove what an earlier attempt left at the declared outputs' paths (in the work directory and in
    ``codebase/``), so that only this attempt's files can be published."""
    for base in (work_dir, os.path.join(work_dir, "codebase")):
        for pattern in outputs:
            for path in glob.glob(os.path.join(base, pattern)):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


def finish(outcome: Outcome, ctx: TaskContext, model: Mapping[str, Any]) -> Outcome:
    """The outcome of the agent process, with the reason it gave in its result file. ``model``: the
    request's model."""
    try:
        with open(os.path.join(ctx.logs_dir, RESULT), encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = None
    if outcome.ok:
        if result is None or result.get("status") != "ok":
            return dataclasses.replace(outcome, ok=False, error="the agent process ended without a result")
        return outcome
    if result is None or outcome.timed_out or outcome.reason is OutcomeReason.TERMINATED_BY_RUNNER:
        stderr = os.path.join(ctx.logs_dir, "stderr.log")
        slow = _slow_local_model(model) if outcome.timed_out else ""
        return dataclasses.replace(outcome, error=f"{outcome.error} (agent process; see {stderr}){slow}")
    message = str(result.get("message") or outcome.error)
    return dataclasses.replace(outcome, error=message, traceback=result.get("traceback"),
                               budget_exceeded=outcome.exit_code == EXIT_BUDGET)


def _slow_local_model(model: Mapping[str, Any]) -> str:
    """What to say when an attempt on a local model timed out: such a model runs on this CPU, slowly."""
    if "local" not in model:
        return ""
    rate = speed(LocalModel(**model["local"]))
    measured = f" (its last reply came at {rate:.0f} tokens/s)" if rate is not None else ""
    return (f"; local model '{model['name']}' runs on this machine's CPU{measured}: raise the task's timeout "
            "or lower its max_turns")
