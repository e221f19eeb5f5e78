"""The gateway's books: each open grant's calls, as intents and results in its rank's ledger journals.

One ``Metered`` per open grant. Before a call is forwarded its intent is appended (``intend``), with the
request's size; when its answer has come, whole, the result (``answered``), with the tokens the endpoint
reported and their price. A call whose answer was cut (the client went away, the endpoint did not answer
in time, the attempt ended, the gateway was killed) keeps its intent alone: the ledger shows it as
``unknown: possibly billed``, with the request's size.

The writes are the ledger's own (``CallRecorder``: one ``write`` a line, share-locked against a merge),
on journals the gateway keeps open (``Books``): an intent is in the file before its call goes out, and a
result before its answer does, so a SIGKILL of the gateway loses neither. Their fsyncs are grouped: a
thread makes them every ``SYNC_S``, for every call written meanwhile (an fsync per line cost a call
2.5 ms at the median on this project's test machine, and 37 ms at the 99th percentile). ``Budgets`` says
whether a grant's job or task cap is reached, from the ledger files as they are now (``ledger.meter``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from cmbagent_batch.gateway.grants import Grant, Route, Spent
from cmbagent_batch.gateway.usage import Tokens
from cmbagent_batch.ledger.costs import CallRecorder, Journals, Priced
from cmbagent_batch.ledger.meter import budget_problem, spent
from cmbagent_batch.spec.pricing import Price

_REFUSALS_KEPT = 5  # refusals an attempt's end names
SYNC_S = 0.05  # how often the journals written to are fsynced


def priced(route: Route) -> Priced:
    return Priced(route.key, route.model, Price(**route.price), route.price_table)


class Metered:
    """One open grant: the calls of one attempt through the gateway."""

    def __init__(self, grant: Grant, journals: Journals) -> None:
        self.grant = grant
        self._lock = threading.Lock()
        first = grant.routes[0]
        self._recorder = CallRecorder(run_dir=grant.run_dir, job=grant.job, run_id=grant.run_id, rank=grant.rank,
                                      host=grant.host, source=grant.source, task=grant.task, attempt=grant.attempt,
                                      agent=grant.agent, model=priced(first), journals=journals)
        self._priced = {r.key: priced(r) for r in grant.routes}
        self._in_flight = 0
        self._tokens = 0
        self._cost = 0.0
        self._budget: str | None = None
        self._refused: list[str] = []
        self._cut = 0

    def intend(self, route: Route, started: str, prompt_chars: int) -> dict[str, Any]:
        """Append the intent of a call about to be forwarded."""
        with self._lock:
            intent = self._recorder.intend(started=started, url=route.base_url, prompt_chars=prompt_chars,
                                           model=self._priced[route.key])
            self._in_flight += 1
            return intent

    def answered(self, route: Route, intent: dict[str, Any], t0: float, status: str, error: str | None,
                 reported_model: str | None, tokens: Tokens | None) -> dict[str, Any]:
        """Append a call's result; ``tokens`` None: the endpoint reported none (0 counted)."""
        t = tokens or Tokens()
        with self._lock:
            try:
                entry = self._recorder.record(
                    started=intent["timestamp"], latency_s=time.perf_counter() - t0, status=status, error=error,
                    reported_model=reported_model, prompt_tokens=t.prompt, cached_prompt_tokens=t.cached,
                    completion_tokens=t.completion, reasoning_tokens=t.reasoning, intent=intent,
                    model=self._priced[route.key])
            finally:
                self._in_flight -= 1
            self._tokens += t.total
            self._cost += entry["cost_usd"]
            return entry

    def cut(self) -> None:
        """A call whose answer never came whole: its intent stays, unresolved (possibly billed)."""
        with self._lock:
            self._cut += 1
            self._in_flight -= 1

    def refused(self, why: str, budget: bool = False) -> None:
        with self._lock:
            if budget:
                self._budget = self._budget or why
            elif len(self._refused) < _REFUSALS_KEPT:
                self._refused.append(why)

    def close(self) -> Spent:
        """The grant ends (its token is refused from now on): what its calls came to. Calls still being
        answered go on being metered."""
        with self._lock:
            return Spent(calls=self._recorder.calls, tokens=self._tokens, cost_usd=self._cost, budget=self._budget,
                         refused=tuple(self._refused), cut=self._cut + self._in_flight)

class Books:
    """The ledger journals of the ranks whose attempts a gateway serves (one rank's, but for tests), kept
    open, and the thread that fsyncs them every ``SYNC_S``."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], Journals] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="ledger-sync", daemon=True)
        self._thread.start()

    def of(self, grant: Grant) -> Journals:
        key = (grant.run_dir, grant.rank)
        with self._lock:
            journals = self._open.get(key)
            if journals is None:
                journals = self._open[key] = Journals.open(grant.run_dir, grant.rank, sync_interval=3600.0)
            return journals

    def close(self) -> None:
        """Fsync and close every journal (the gateway is stopping)."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            for journals in self._open.values():
                journals.close()
            self._open.clear()

    def _sync_loop(self) -> None:
        while not self._stop.wait(SYNC_S):
            with self._lock:
                open_now = list(self._open.values())
            for journals in open_now:
                try:
                    journals.sync()
                except OSError as exc:  # the next write says it to the call that makes it
                    print(f"cmbagent-batch gateway: cannot fsync the ledger journals: {exc}", file=sys.stderr)


class Budgets:
    """Whether a grant may call now: its job's and its task's caps against what the ledger files say."""

    def problem(self, grant: Grant) -> str | None:
        if grant.job_usd is None and grant.task_usd is None:
            return None
        job_spent, task_spent = spent(grant.run_dir, grant.task)
        return budget_problem(grant.job_usd, grant.task_usd, job_spent, task_spent)
