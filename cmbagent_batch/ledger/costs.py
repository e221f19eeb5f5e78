"""From a model call to a ledger entry, appended to the rank's ledger journal as soon as the call ends.

Used by agent processes (every HTTP attempt, as it happens) and by dependency analysis (its calls, once
the analysis ends). Imports neither ag2 nor openai.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cmbagent_batch.errors import BatchError
from cmbagent_batch.ledger.entry import ANALYSIS_AGENT, make_entry
from cmbagent_batch.ledger.journal import JournalWriter, next_call_id
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.pricing import Price, call_cost


@dataclass(frozen=True)
class Priced:
    """A model as the ledger needs it: its spec key, the name sent, the unit prices and their table."""

    key: str
    model: str
    price: Price
    price_table: str

    @classmethod
    def from_request(cls, model: dict[str, Any]) -> Priced:
        return cls(model["name"], model["model"], Price(**model["price"]), model["price_table"])


@dataclass
class CallRecorder:
    """Numbers, prices and appends the calls of one process, for one task attempt or one analysis."""

    run_dir: str
    job: str
    run_id: str
    rank: int
    host: str
    source: str  # "agent" | "analysis"
    task: str | None
    attempt: int | None
    agent: str
    model: Priced
    calls: int = 0
    cost_usd: float = 0.0
    entries: list[dict[str, Any]] = field(default_factory=list)
    _writer: Any = None

    def record(self, *, started: str, latency_s: float, status: str, error: str | None = None,
               reported_model: str | None = None, prompt_tokens: int = 0, cached_prompt_tokens: int = 0,
               completion_tokens: int = 0, reasoning_tokens: int = 0) -> dict[str, Any]:
        """Append one call to the ledger journal (durably) and return its entry. Counts an endpoint reports
        inconsistently (cached above prompt, reasoning above completion) are capped, with a warning."""
        if cached_prompt_tokens > prompt_tokens or reasoning_tokens > completion_tokens:
            print(f"warning: the endpoint reported {cached_prompt_tokens} cached of {prompt_tokens} prompt tokens "
                  f"and {reasoning_tokens} reasoning of {completion_tokens} completion tokens; the ledger caps the "
                  "parts at their totals", file=sys.stderr)
            cached_prompt_tokens = min(cached_prompt_tokens, prompt_tokens)
            reasoning_tokens = min(reasoning_tokens, completion_tokens)
        self.calls += 1
        price = self.model.price
        cost = call_cost(price, prompt_tokens, cached_prompt_tokens, completion_tokens)
        entry = make_entry(
            id=next_call_id(self.run_id, self.rank), job=self.job,
            run_id=self.run_id, source=self.source, task=self.task, attempt=self.attempt, call=self.calls,
            rank=self.rank, host=self.host, pid=os.getpid(), agent=self.agent, model=self.model.key,
            requested_model=self.model.model, reported_model=reported_model, prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens, completion_tokens=completion_tokens,
            reasoning_tokens=reasoning_tokens, cost_usd=cost, price_table=self.model.price_table, price=price,
            status=status, error=error, latency_s=round(latency_s, 6), timestamp=started,
        )
        if self._writer is None:
            self._writer = JournalWriter(self.run_dir, self.rank)
        self._writer.append(entry)
        self.cost_usd += cost
        self.entries.append(entry)
        return entry

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ModelCall(Protocol):
    """What the ledger records of one model call (``plan.analysis.llm.LlmCall`` is one)."""

    @property
    def started_at(self) -> str: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def status(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def reported_model(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...


def analysis_recorder(run_dir: str, spec: JobSpec, run_id: str, host: str) -> Callable[[Sequence[ModelCall]], None]:
    """A ``record_calls`` for ``analyse``: analysis calls (``LlmCall``s) into rank 0's ledger journal."""
    made: list[CallRecorder] = []

    def record(calls: Sequence[ModelCall]) -> None:
        if not made:
            m = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
            assert m.price is not None  # the loader refuses unpriced models
            made.append(CallRecorder(run_dir=run_dir, job=spec.job.name, run_id=run_id, rank=0, host=host,
                                     source="analysis", task=None, attempt=None, agent=ANALYSIS_AGENT,
                                     model=Priced(m.name, m.model, m.price, m.price_table)))
        recorder = made[0]
        try:
            for c in calls:
                recorder.record(started=c.started_at, latency_s=c.latency_s, status=c.status, error=c.error,
                                reported_model=c.reported_model, prompt_tokens=c.prompt_tokens,
                                cached_prompt_tokens=c.cached_prompt_tokens, completion_tokens=c.completion_tokens,
                                reasoning_tokens=c.reasoning_tokens)
        finally:
            recorder.close()

    return record


def job_budget_spent(run_dir: str, spec: JobSpec) -> Callable[[], str | None]:
    """A ``budget_spent`` for ``analyse``: why the job's budget forbids a call now, or None."""

    def check() -> str | None:
        cap = spec.job.budget_usd
        if cap is None:
            return None
        from cmbagent_batch.ledger.meter import SpendMeter

        meter = SpendMeter(run_dir)
        meter.refresh()
        return budget_spent_message("job", meter.total_usd, cap) if meter.total_usd >= cap else None

    return check


def usd(value: float) -> str:
    """Dollars for messages: 4 decimals, more for amounts below a cent (a $0.00001 cap is not "$0.0000")."""
    if abs(value) >= 0.01 or round(value, 4) == value:
        return f"${value:.4f}"
    return f"${value:.8f}".rstrip("0")


def budget_spent_message(scope: str, spent: float, cap: float) -> str:
    """Why no more LLM calls start: ``scope`` is "job" or "task"."""
    key = "job.budget_usd" if scope == "job" else "budget_usd"
    return f"the {scope}'s LLM budget is spent: {usd(spent)} of {key} {usd(cap)}"


def merge_ledger(run_dir: str, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """Merge the ranks' ledger journals into RUN_DIR/ledger.jsonl; what run.json says of the ledger."""
    from cmbagent_batch.ledger.merge import merge

    try:
        result = merge(run_dir)
    except (BatchError, OSError) as exc:  # the run's results stand; the journals stay for the next merge
        warn(f"the cost ledger could not be merged: {exc}; the calls stay in {os.path.join(run_dir, 'ledger')}/ "
             "and the next run merges them")
        return None
    for problem in result.problems:
        warn(f"ledger: {problem}")
    return result.manifest() if result.entries else None
