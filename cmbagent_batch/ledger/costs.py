"""From a model call to a ledger entry, appended to the rank's ledger journal as soon as the call ends,
after its intent, appended before it was sent (``intents.py``).

Used by agent processes and by dependency analysis, for every HTTP attempt as it happens. Imports
neither ag2 nor openai.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cmbagent_batch.errors import BatchError
from cmbagent_batch.ledger.entry import ANALYSIS_AGENT, make_entry
from cmbagent_batch.ledger.intents import UNKNOWN, describe, endpoint_host, estimate_tokens, make_intent
from cmbagent_batch.ledger.journal import IntentWriter, JournalWriter, next_call_id
from cmbagent_batch.ledger.money import usd
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.pricing import Price, builtin_table, call_cost


@dataclass(frozen=True)
class Priced:
    """A model as the ledger needs it: its spec key, the name sent, the unit prices and their table."""

    key: str
    model: str
    price: Price
    price_table: str

    @property
    def price_table_date(self) -> str | None:
        """The date of the price table: the shipped table's; None for a price set in the spec."""
        table = builtin_table()
        return (table.date or None) if self.price_table == table.id else None


@dataclass(frozen=True)
class Journals:
    """A rank's two ledger journals, open for appends: its entries and its intents."""

    entries: JournalWriter
    intents: IntentWriter

    @classmethod
    def open(cls, run_dir: str, rank: int, sync_interval: float = 0.0) -> Journals:
        return cls(JournalWriter(run_dir, rank, sync_interval=sync_interval), IntentWriter(run_dir, rank, sync_interval))

    def sync(self) -> None:
        self.intents.sync()
        self.entries.sync()

    def close(self) -> None:
        self.intents.close()
        self.entries.close()


@dataclass
class CallRecorder:
    """Numbers, prices and appends the calls of one process, for one task attempt or one analysis."""

    run_dir: str
    job: str
    run_id: str
    rank: int
    host: str
    source: str  # "agent" | "analysis" | "task"
    task: str | None
    attempt: int | None
    agent: str | None
    model: Priced
    calls: int = 0
    cost_usd: float = 0.0
    entries: list[dict[str, Any]] = field(default_factory=list)
    journals: Journals | None = None  # writers shared with other recorders (the gateway's), left open by close
    _writer: Any = None
    _intents: Any = None

    def __post_init__(self) -> None:
        if self.journals is not None:
            self._writer, self._intents = self.journals.entries, self.journals.intents

    def intend(self, *, started: str, url: str | None, prompt_chars: int, model: Priced | None = None) -> dict[str, Any]:
        """Append the intent of the next call (durably), before it is sent, and return it: the call's
        ``record`` gets it back, so that its entry has the intent's id and timestamp. ``model``: the
        call's, when it is not the recorder's."""
        m = model or self.model
        self.calls += 1
        intent = make_intent(
            id=next_call_id(self.run_id, self.rank), job=self.job, run_id=self.run_id, source=self.source,
            task=self.task, attempt=self.attempt, call=self.calls, rank=self.rank, host=self.host, pid=os.getpid(),
            agent=self.agent, model=m.key, requested_model=m.model, endpoint=endpoint_host(url),
            prompt_chars=prompt_chars, prompt_tokens_estimate=estimate_tokens(prompt_chars), timestamp=started,
        )
        if self._intents is None:
            self._intents = IntentWriter(self.run_dir, self.rank)
        self._intents.append(intent)
        return intent

    def record(self, *, started: str, latency_s: float, status: str, error: str | None = None,
               reported_model: str | None = None, prompt_tokens: int = 0, cached_prompt_tokens: int = 0,
               completion_tokens: int = 0, reasoning_tokens: int = 0,
               intent: dict[str, Any] | None = None, model: Priced | None = None) -> dict[str, Any]:
        """Append one call to the ledger journal (durably) and return its entry: the result of ``intent``
        (its id, number and timestamp), or of a call that had none. Counts an endpoint reports
        inconsistently (cached above prompt, reasoning above completion) are capped, with a warning."""
        if cached_prompt_tokens > prompt_tokens or reasoning_tokens > completion_tokens:
            print(f"warning: the endpoint reported {cached_prompt_tokens} cached of {prompt_tokens} prompt tokens "
                  f"and {reasoning_tokens} reasoning of {completion_tokens} completion tokens; the ledger caps the "
                  "parts at their totals", file=sys.stderr)
            cached_prompt_tokens = min(cached_prompt_tokens, prompt_tokens)
            reasoning_tokens = min(reasoning_tokens, completion_tokens)
        if intent is None:
            self.calls += 1
            call_id, number = next_call_id(self.run_id, self.rank), self.calls
        else:
            call_id, number, started = intent["id"], intent["call"], intent["timestamp"]
        m = model or self.model
        price = m.price
        cost = call_cost(price, prompt_tokens, cached_prompt_tokens, completion_tokens)
        entry = make_entry(
            id=call_id, job=self.job,
            run_id=self.run_id, source=self.source, task=self.task, attempt=self.attempt, call=number,
            rank=self.rank, host=self.host, pid=os.getpid(), agent=self.agent, model=m.key,
            requested_model=m.model, reported_model=reported_model, prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens, completion_tokens=completion_tokens,
            reasoning_tokens=reasoning_tokens, cost_usd=cost, price_table=m.price_table, price=price,
            price_table_date=m.price_table_date, status=status, error=error, latency_s=round(latency_s, 6),
            timestamp=started,
        )
        if self._writer is None:
            self._writer = JournalWriter(self.run_dir, self.rank)
        self._writer.append(entry)
        self.cost_usd += cost
        if self.journals is None:  # a recorder of one attempt or analysis; the gateway's live long
            self.entries.append(entry)
        return entry

    def close(self) -> None:
        if self.journals is not None:
            return
        for name in ("_intents", "_writer"):
            writer = getattr(self, name)
            if writer is not None:
                setattr(self, name, None)
                writer.close()


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


@runtime_checkable
class ModelIntent(Protocol):
    """A model call about to be sent (``plan.analysis.llm.LlmIntent`` is one)."""

    @property
    def started_at(self) -> str: ...
    @property
    def base_url(self) -> str | None: ...
    @property
    def prompt_chars(self) -> int: ...


def analysis_recorder(run_dir: str, spec: JobSpec, run_id: str,
                      host: str) -> Callable[[Sequence[ModelCall | ModelIntent]], None]:
    """A ``record_calls`` for ``analyse``: analysis calls (``LlmCall``s) into rank 0's ledger journal, each
    after its intent (an ``LlmIntent``, given before the call is sent)."""
    made: list[CallRecorder] = []
    sent: dict[str, dict[str, Any]] = {}  # intents waiting for their call, by the time it was sent

    def record(calls: Sequence[ModelCall | ModelIntent]) -> None:
        if not made:
            m = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
            assert m.price is not None  # the loader refuses unpriced models
            made.append(CallRecorder(run_dir=run_dir, job=spec.job.name, run_id=run_id, rank=0, host=host,
                                     source="analysis", task=None, attempt=None, agent=ANALYSIS_AGENT,
                                     model=Priced(m.name, m.model, m.price, m.price_table)))
        recorder = made[0]
        try:
            for c in calls:
                if isinstance(c, ModelIntent):
                    sent[c.started_at] = recorder.intend(started=c.started_at, url=c.base_url,
                                                         prompt_chars=c.prompt_chars)
                    continue
                recorder.record(started=c.started_at, latency_s=c.latency_s, status=c.status, error=c.error,
                                reported_model=c.reported_model, prompt_tokens=c.prompt_tokens,
                                cached_prompt_tokens=c.cached_prompt_tokens, completion_tokens=c.completion_tokens,
                                reasoning_tokens=c.reasoning_tokens, intent=sent.pop(c.started_at, None))
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
    for intent in result.unresolved:
        warn(f"ledger: a call was sent and no result recorded ({UNKNOWN}): {describe(intent)}")
    return result.manifest() if result.entries else None
