"""What a job's LLM calls may cost, before anything runs (``plan --estimate``). Pure functions.

An estimate, not a quote: the assumptions are part of the result and printed with it. Token counts are
guessed from text lengths; an agent's number of turns is between one and its ``max_turns``; the context
grows by each turn's reply (and, with code execution, the code's output); a failed attempt is retried up
to the task's retries with the same cost. The LLM dependency analysis is one of three things
(``Analysis``), and the text says that one only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from cmbagent_batch.ledger.intents import CHARS_PER_TOKEN, estimate_tokens  # one rule, here and in the ledger
from cmbagent_batch.ledger.money import usd
from cmbagent_batch.spec.model import JobSpec, TaskSpec
from cmbagent_batch.spec.pricing import call_cost
from cmbagent_batch.spec.tasks import of_kind

SYSTEM_TOKENS = 150  # the agent's system prompt around the instructions
REPLY_TOKENS = 400  # completion tokens of one turn
TOOL_OUTPUT_TOKENS = 600  # what one code execution adds to the context
ANALYSIS_REPLY_TOKENS_PER_TASK = 15

ASSUMPTIONS = (
    f"tokens = characters / {CHARS_PER_TOKEN:g}; an agent's system prompt adds {SYSTEM_TOKENS} tokens",
    f"each turn replies {REPLY_TOKENS} completion tokens; each code execution adds {TOOL_OUTPUT_TOKENS} tokens "
    "of output to the context",
    "low: one turn per agent task, no retry; high: max_turns turns, every attempt of the task's retries "
    "used; the context grows turn by turn",
    "no prompt caching (cached prompt tokens cost less: the real cost can only be lower on that count)",
)
ANALYSIS_ASSUMPTION = (f"dependency analysis not cached: one call, a reply of {ANALYSIS_REPLY_TOKENS_PER_TASK} "
                       "tokens per task")


class Analysis(Enum):
    """What the LLM dependency analysis adds to a job's LLM calls."""

    NOT_USED = "not used"
    """``analysis.sources`` has no ``llm``: no call."""
    CACHED = "cached"
    """Its answer for this spec is in the analysis cache: no call."""
    ONE_CALL = "one call"
    """Not cached: one call, estimated from the prompt it would send."""


ANALYSIS_NO_CALL = {  # the line under the agent tasks' estimate when the analysis makes no call
    Analysis.NOT_USED: "dependency analysis: not by LLM (analysis.sources has no llm), no call",
    Analysis.CACHED: "dependency analysis: cached, no call",
}
NO_LLM_CALL = {  # the whole estimate of a job with no agent task, by what its analysis is
    Analysis.NOT_USED: "no LLM calls: this job has no agent task and no LLM dependency analysis",
    Analysis.CACHED: "no LLM calls: this job has no agent task, and its LLM dependency analysis is cached",
}


@dataclass(frozen=True)
class Line:
    """The estimate of one agent task, or of the dependency analysis (task None)."""

    task: str | None
    model: str
    calls_low: int
    calls_high: int
    low_usd: float
    high_usd: float


def tokens(text: str) -> int:
    return estimate_tokens(len(text))


def agent_line(spec: JobSpec, task: TaskSpec) -> Line:
    model = spec.llm.models[task.model or ""]
    assert model.price is not None
    base = SYSTEM_TOKENS + tokens(task.instructions or "") + tokens(" ".join(task.inputs + task.outputs))
    growth = REPLY_TOKENS + (TOOL_OUTPUT_TOKENS if task.code_execution else 0)
    low = call_cost(model.price, base, 0, REPLY_TOKENS)
    turns = max(task.max_turns, 1)
    one_attempt = sum(call_cost(model.price, base + k * growth, 0, REPLY_TOKENS) for k in range(turns))
    attempts = 1 + (spec.execution.retries if task.retries is None else task.retries)
    high = one_attempt * attempts
    if task.budget_usd is not None:
        high = min(high, task.budget_usd)
    return Line(task.id, model.name, 1, turns * attempts, low, high)


def analysis_line(spec: JobSpec, prompt_chars: int) -> Line:
    model = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
    assert model.price is not None
    cost = call_cost(model.price, estimate_tokens(prompt_chars), 0,
                     ANALYSIS_REPLY_TOKENS_PER_TASK * len(spec.tasks))
    return Line(None, model.name, 1, 1, cost, cost)


def estimate(spec: JobSpec, analysis: Analysis, analysis_prompt_chars: int = 0) -> dict[str, Any]:
    """The estimate as plain data; ``analysis_prompt_chars`` is the prompt's length for ``Analysis.ONE_CALL``."""
    lines = [agent_line(spec, t) for t in of_kind(spec.tasks, "agent")]
    if analysis is Analysis.ONE_CALL:
        lines.insert(0, analysis_line(spec, analysis_prompt_chars))
    low = sum(x.low_usd for x in lines)
    high = sum(x.high_usd for x in lines)
    budget = spec.job.budget_usd
    prices = {}
    for name in sorted({x.model for x in lines}):
        m = spec.llm.models[name]
        assert m.price is not None
        prices[name] = {"model": m.model, "price_table": m.price_table, "prompt_per_1m": m.price.prompt_per_1m,
                        "cached_prompt_per_1m": m.price.cached_prompt_per_1m,
                        "completion_per_1m": m.price.completion_per_1m}
    return {
        "low_usd": low,
        "high_usd": min(high, budget) if budget is not None else high,
        "unbounded_high_usd": high,
        "budget_usd": budget,
        "analysis": analysis.value,
        "analysis_cached": analysis is not Analysis.ONE_CALL,  # as it always meant: the analysis makes no call
        "lines": [x.__dict__ for x in lines],
        "prices": prices,
        "assumptions": [*ASSUMPTIONS, ANALYSIS_ASSUMPTION] if analysis is Analysis.ONE_CALL else list(ASSUMPTIONS),
    }


def render(est: dict[str, Any]) -> str:
    """The estimate as text for ``plan --estimate``: with no LLM call, one line saying why."""
    out = ["Cost estimate (USD, before running):"]
    analysis = Analysis(est["analysis"])
    if not est["lines"]:
        return "\n".join([*out, f"  {NO_LLM_CALL[analysis]}"]) + "\n"
    width = max([len(x["task"] or "(dependency analysis)") for x in est["lines"]] + [4])
    out.append(f"  {'task':<{width}}  {'model':<12} {'calls':>9}  {'low':>10}  {'high':>10}")
    for x in est["lines"]:
        name = x["task"] or "(dependency analysis)"
        calls = f"{x['calls_low']}-{x['calls_high']}" if x["calls_low"] != x["calls_high"] else str(x["calls_low"])
        out.append(f"  {name:<{width}}  {x['model']:<12} {calls:>9}  {usd(x['low_usd']):>10}  "
                   f"{usd(x['high_usd']):>10}")
    out.append(f"  total: {usd(est['low_usd'])} to {usd(est['unbounded_high_usd'])}")
    budget = est["budget_usd"]
    if budget is not None:
        verdict = ("the high estimate exceeds it: tasks may end budget_exceeded"
                   if est["unbounded_high_usd"] > budget else "within it")
        out.append(f"  job.budget_usd: {usd(budget)} ({verdict})")
    if analysis in ANALYSIS_NO_CALL:
        out.append(f"  {ANALYSIS_NO_CALL[analysis]}")
    out.append("Prices used (USD per 1M tokens):")
    for name, p in est["prices"].items():
        cached = "prompt price" if p["cached_prompt_per_1m"] is None else f"{p['cached_prompt_per_1m']:g}"
        out.append(f"  {name} ({p['model']}, {p['price_table']}): prompt {p['prompt_per_1m']:g}, "
                   f"cached {cached}, completion {p['completion_per_1m']:g}")
    out.append("Assumptions:")
    out.extend(f"  - {a}" for a in est["assumptions"])
    return "\n".join(out) + "\n"
