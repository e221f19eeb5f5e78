"""Every model call of an agent process, as AG2 middleware: budgets, retries, the ledger, the transcript.

``on_llm_call`` wraps one call of the agent's loop. Before each HTTP attempt the job's and the task's
spending is read from the ledger files (``BudgetSpent`` when a cap is reached); the attempt is retried
on 408/409/429/5xx, timeouts and connection errors (the openai client's own retries are off, so that none
goes unrecorded); every attempt is announced in the ledger (its intent, with the prompt's size) before it
is sent and, whatever happened to it, appended to the rank's ledger journal as it ends. A SIGTERM while a
call waits for its answer records that call too (tokens unknown); after a SIGKILL only its intent is left, which
the ledger shows as possibly billed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from cmbagent_batch.errors import AgentFailure, BudgetSpent
from cmbagent_batch.ledger.costs import CallRecorder
from cmbagent_batch.llm.endpoint import backoff_delay, refusal, retry_after, retryable, server_message, utc_now
from cmbagent_batch.tasks.agent.launch import budget_problem, spent

DEFAULT_URL = "https://api.openai.com/v1"


class Calls:
    """What the middleware shares across the turns of one attempt."""

    def __init__(self, request: dict[str, Any], recorder: CallRecorder, openai: Any, key: str, key_env: str,
                 redact: Callable[[str], str]) -> None:
        self.request, self.recorder, self.openai = request, recorder, openai
        self.key, self.key_env, self.redact = key, key_env, redact
        self.model = request["model"]
        self.url = self.model.get("base_url") or DEFAULT_URL
        self.answered = 0  # model calls answered: max_turns counts these
        self.in_flight: tuple[dict[str, Any], float] | None = None  # (intent, t0) while a call waits for its answer
        self.conversation: list[Any] = []  # the events of the last call and its answer, for the transcript

    def interrupted(self) -> None:
        """Record the call waiting for its answer, if any (from a SIGTERM handler)."""
        flight, self.in_flight = self.in_flight, None
        if flight is not None:
            intent, t0 = flight
            self.recorder.record(started=intent["timestamp"], latency_s=time.perf_counter() - t0, status="error",
                                 error="interrupted while waiting for the endpoint (task timed out or the run "
                                       "stopped); tokens unknown", intent=intent)

    async def call(self, call_next: Any, events: Any, context: Any) -> Any:
        request, recorder = self.request, self.recorder
        if self.answered >= request["max_turns"]:
            raise AgentFailure(f"the agent did not finish within max_turns={request['max_turns']} model turns")
        self.conversation = list(events)
        failures = 0
        while True:
            job_spent, task_spent = spent(request["run_dir"], request["task"])
            if (why := budget_problem(request, job_spent, task_spent)) is not None:
                raise BudgetSpent(f"stopped before model call {recorder.calls + 1}: {why}")
            outcome = await self._attempt(call_next, events, context)
            if not isinstance(outcome, tuple):
                self.answered += 1
                self.conversation.append(outcome)
                return outcome
            last, wait_for = outcome
            failures += 1
            if failures > self.model["max_retries"]:
                raise AgentFailure(f"LLM endpoint {self.url} {last(failures)} (model '{self.model['model']}')")
            await asyncio.sleep(backoff_delay(failures, wait_for, random.random()))

    async def _attempt(self, call_next: Any, events: Any, context: Any) -> Any:
        """One HTTP attempt: the response, or (what went wrong as a function of the attempts made, the
        wait the server asked for) when it may be retried. Raises AgentFailure when it may not."""
        openai, redact, model = self.openai, self.redact, self.model
        intent = self.recorder.intend(started=utc_now(), url=self.url, prompt_chars=prompt_chars(events, context))
        t0 = time.perf_counter()
        self.in_flight = (intent, t0)
        try:
            response = await call_next(events, context)
        except openai.APIStatusError as exc:
            self.in_flight = None
            status, text = exc.status_code, server_message(exc, redact)
            self._error(intent, t0, f"{status}: {text}")
            if not retryable(status):
                raise AgentFailure(refusal(self.url, model["model"], self.key_env, status, text)) from None
            return (lambda n: f"failed after {n} attempts; last error: {status} {text}"), retry_after(exc.response.headers)
        except openai.APITimeoutError:
            self.in_flight = None
            self._error(intent, t0, f"timed out after {model['timeout']:g} s")
            return (lambda n: f"did not answer within {model['timeout']:g} s, {n} attempts"), None
        except openai.APIConnectionError as exc:
            self.in_flight = None
            cause = redact(str(exc.__cause__ or exc))
            self._error(intent, t0, f"connection error: {cause}")
            return (lambda n: f"could not be reached after {n} attempts: {cause}"), None
        except Exception as exc:  # noqa: BLE001 - an answer the client or AG2 could not read still costs
            self.in_flight = None
            what = redact(f"{type(exc).__name__}: {exc}")[:500]
            self._error(intent, t0, f"unreadable answer: {what}")
            raise AgentFailure(f"LLM endpoint {self.url} sent an answer that could not be read for model "
                               f"'{model['model']}': {what}") from None
        self.in_flight = None
        self._ok(intent, t0, response)
        return response

    def _error(self, intent: dict[str, Any], t0: float, error: str) -> None:
        self.recorder.record(started=intent["timestamp"], latency_s=time.perf_counter() - t0, status="error",
                             error=error, intent=intent)

    def _ok(self, intent: dict[str, Any], t0: float, response: Any) -> None:
        usage = response.usage
        if not usage:
            print(f"warning: the endpoint reported no token usage for model call {intent['call']}; "
                  "it is in the ledger with 0 tokens and $0", file=sys.stderr)
        self.recorder.record(started=intent["timestamp"], latency_s=time.perf_counter() - t0, status="ok",
                             intent=intent, reported_model=response.model, prompt_tokens=int(usage.prompt_tokens or 0),
                             cached_prompt_tokens=int(usage.cache_read_input_tokens or 0),
                             completion_tokens=int(usage.completion_tokens or 0),
                             reasoning_tokens=int(usage.thinking_tokens or 0))


def prompt_chars(events: Any, context: Any) -> int:
    """Characters of what a model call sends: the system prompt and each event's text, tool calls and tool
    results (the request's size without the JSON around it and the tool schemas; counted, not serialised)."""
    total = sum(len(str(p)) for p in getattr(context, "prompt", None) or ())
    for event in events:
        for part in getattr(event, "parts", None) or ():
            total += len(str(getattr(part, "content", None) or getattr(part, "text", None) or ""))
        content = getattr(event, "content", None)
        if isinstance(content, str):
            total += len(content)
        calls = getattr(event, "tool_calls", None)
        for call in getattr(calls, "calls", calls) or ():
            total += len(str(getattr(call, "name", ""))) + len(str(getattr(call, "arguments", "")))
        for result in getattr(event, "results", None) or ():
            total += len(str(getattr(result, "result", result)))
    return total


def ledger_middleware(calls: Calls) -> Any:
    """An AG2 middleware factory whose ``on_llm_call`` is ``calls.call`` (ag2 is imported only now)."""
    from ag2 import Middleware
    from ag2.middleware.base import BaseMiddleware

    class LedgerMiddleware(BaseMiddleware):
        async def on_llm_call(self, call_next: Any, events: Any, context: Any) -> Any:
            return await calls.call(call_next, events, context)

    return Middleware(LedgerMiddleware)
