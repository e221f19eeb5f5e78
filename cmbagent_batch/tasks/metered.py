"""The attempts of tasks that call models, run with a grant of their rank's gateway open around them.

Before such an attempt starts, in its rank's runner: the budgets are checked (a spent one: the attempt
does not start), a local model's server is started if a route needs one, and a grant is opened on the
rank's gateway (``gateway.client``) under a new token. The attempt's environment gets:

- ``OPENAI_BASE_URL`` and ``OPENAI_API_BASE``: the gateway, ``http://127.0.0.1:PORT/v1``;
- ``OPENAI_API_KEY``: the attempt's token, never a real key;
- ``CMBAGENT_MODEL``: the name of its first model, as the endpoint knows it;
- ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_API_KEY``: the same, for Anthropic's clients;
- 127.0.0.1 added to ``NO_PROXY``, so that a proxy set for the internet does not carry its calls.

When it ends, the grant is closed (its token is refused from then on) and the outcome gets what its
calls came to; a failure after a call refused for a budget says so, and is not retried.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cmbagent_batch.attempt import Attempt, Outcome, TaskContext
from cmbagent_batch.errors import BatchError

if TYPE_CHECKING:  # imported when an attempt calls a model: worker processes of other tasks never load them
    from cmbagent_batch.gateway.grants import Route, Spent

GATEWAY_LOGS = "gateway"  # RUN_DIR/gateway/rank-NNNN.log: what each rank's gateway said


class Opened(NamedTuple):
    """An attempt ready to run with its grant open (``token``), or the outcome of one that cannot start."""

    attempt: Attempt | None
    token: str | None = None
    outcome: Outcome | None = None


def run_metered(attempts: Sequence[Attempt], run: Callable[[Sequence[Attempt]], list[Outcome]]) -> list[Outcome]:
    """``run(attempts)``, the grants of those that call models opened before and closed after."""
    if not any(a.payload.models for a in attempts):
        return run(attempts)
    opened: list[Opened] = []
    closed: set[int] = set()
    try:
        opened += [open_grant(a) for a in attempts]
        ready = [o.attempt for o in opened if o.attempt is not None and o.outcome is None]
        ran = iter(run(ready) if ready else ())
        outcomes = []
        for i, o in enumerate(opened):
            outcomes.append(o.outcome if o.outcome is not None else close_grant(o, next(ran)))
            closed.add(i)
        return outcomes
    finally:
        for i, o in enumerate(opened):
            if o.token is not None and i not in closed:
                _close(o.token)


def open_grant(attempt: Attempt) -> Opened:
    from cmbagent_batch.gateway.client import gateway
    from cmbagent_batch.gateway.grants import Grant, new_token
    from cmbagent_batch.ledger.meter import budget_problem, spent
    from cmbagent_batch.llm.local_model import bypass_proxy

    models, ctx = attempt.payload.models, attempt.ctx
    if not models:
        return Opened(attempt)
    capped = models["job_usd"] is not None or models["task_usd"] is not None  # else no ledger file is read
    why = budget_problem(models["job_usd"], models["task_usd"], *spent(ctx.run_dir, ctx.task_id)) if capped else None
    if why is not None:
        return Opened(None, outcome=Outcome(ok=False, error=f"not started: {why}", budget_exceeded=True))
    try:
        routes = tuple(_route(r, ctx) for r in models["routes"])
        grant = Grant(task=ctx.task_id, attempt=ctx.attempt, rank=ctx.rank, host=ctx.host, run_dir=ctx.run_dir,
                      job=models["job"], run_id=models["run_id"], source=models["source"], agent=models["agent"],
                      routes=routes, job_usd=models["job_usd"], task_usd=models["task_usd"])
        door = gateway(os.path.join(ctx.run_dir, GATEWAY_LOGS, f"rank-{ctx.rank:04d}.log"))
        token = new_token()
        door.open(token, grant)
    except (BatchError, OSError) as exc:
        return Opened(None, outcome=Outcome(ok=False, error=f"not started: {exc}"))
    env = {"OPENAI_BASE_URL": door.url, "OPENAI_API_BASE": door.url, "OPENAI_API_KEY": token,
           "CMBAGENT_MODEL": routes[0].model, "ANTHROPIC_BASE_URL": door.url.removesuffix("/v1"),
           "ANTHROPIC_API_KEY": token, **bypass_proxy(attempt.env or os.environ)}
    ctx = dataclasses.replace(ctx, launch=(*ctx.launch, *env.items()))
    return Opened(dataclasses.replace(attempt, ctx=ctx), token)


def close_grant(opened: Opened, outcome: Outcome) -> Outcome:
    """The attempt's outcome with what its calls came to, its grant closed."""
    assert opened.token is not None and opened.attempt is not None
    used = _close(opened.token)
    if used is None:  # its gateway died: the ledger has what its calls came to, the attempt does not know
        return dataclasses.replace(outcome, tokens=None, cost_usd=None)
    outcome = dataclasses.replace(outcome, tokens=used.tokens, cost_usd=used.cost_usd)
    refused = used.budget or (used.refused[0] if used.refused else None)
    if outcome.ok or refused is None or refused in (outcome.error or ""):
        return outcome
    error = f"{outcome.error}; a model call was refused: {refused}" if outcome.error else refused
    return dataclasses.replace(outcome, error=error, budget_exceeded=used.budget is not None)


def _close(token: str) -> Spent | None:
    from cmbagent_batch.gateway.client import running

    door = running()
    if door is None:
        return None  # a gateway that died took its grants with it
    try:
        return door.close(token)
    except BatchError:
        return None


def _route(route: dict[str, Any], ctx: TaskContext) -> Route:
    """A route of the payload, a local model's server started for it in this process if it needs one."""
    from cmbagent_batch.gateway.grants import Route
    from cmbagent_batch.llm.local_model import LocalModel, endpoint
    from cmbagent_batch.rundir.layout import server_logs

    fields = {k: v for k, v in route.items() if k != "local"}
    if "local" in route:
        fields["base_url"] = endpoint(LocalModel(**route["local"]), server_logs(ctx.run_dir), ctx.rank)
    return Route(**fields)
