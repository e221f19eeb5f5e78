"""Every model call of an agent process, as AG2 middleware: retries, max_turns and the transcript.

The agent reaches its model through its rank's metering gateway (``OPENAI_BASE_URL``, its attempt's
token in ``OPENAI_API_KEY``), which journals each HTTP attempt in the ledger, intent and result, and
refuses a call once a budget is spent (402, ``budget_exceeded``): that ends the attempt as
``BudgetSpent``. ``on_llm_call`` wraps one call of the agent's loop: an HTTP attempt is retried on
408/409/429/5xx, timeouts and connection errors (the openai client's own retries are off, so each
retry is a call of its own in the ledger), after a backoff.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from cmbagent_batch.errors import AgentFailure, BudgetSpent
from cmbagent_batch.llm.endpoint import DEFAULT_URL, backoff_delay, refusal, retry_after, retryable, server_message

BUDGET_EXCEEDED = "budget_exceeded"  # the gateway's error type for a call refused for a budget
GATEWAY_TIMEOUT = "api_timeout_error"  # ... and for a call its endpoint did not answer in time


class Calls:
    """What the middleware shares across the turns of one attempt."""

    def __init__(self, request: dict[str, Any], openai: Any, key_env: str, redact: Callable[[str], str]) -> None:
        self.request, self.openai, self.key_env, self.redact = request, openai, key_env, redact
        self.model = request["model"]
        # the model's endpoint, for messages
        self.url = self.model.get("base_url") or ("its local server" if "local" in self.model else DEFAULT_URL)
        self.answered = 0  # model calls answered: max_turns counts these
        self.conversation: list[Any] = []  # the events of the last call and its answer, for the transcript

    async def call(self, call_next: Any, events: Any, context: Any) -> Any:
        request = self.request
        if self.answered >= request["max_turns"]:
            raise AgentFailure(f"the agent did not finish within max_turns={request['max_turns']} model turns")
        self.conversation = list(events)
        failures = 0
        while True:
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
        try:
            return await call_next(events, context)
        except openai.APIStatusError as exc:
            status, text = exc.status_code, server_message(exc, redact)
            kind = _error_type(exc)
            if kind == BUDGET_EXCEEDED:
                raise BudgetSpent(f"stopped before model call {self.answered + 1}: {text}") from None
            if kind == GATEWAY_TIMEOUT:  # the gateway waited the model's timeout for the endpoint
                return (lambda n: f"did not answer within {model['timeout']:g} s, {n} attempts"), None
            if not retryable(status):
                raise AgentFailure(refusal(self.url, model["model"], self.key_env, status, text)) from None
            return (lambda n: f"failed after {n} attempts; last error: {status} {text}"), retry_after(exc.response.headers)
        except openai.APITimeoutError:
            return (lambda n: f"did not answer within {model['timeout']:g} s, {n} attempts"), None
        except openai.APIConnectionError as exc:
            cause = redact(str(exc.__cause__ or exc))
            return (lambda n: f"could not be reached after {n} attempts: {cause}"), None
        except Exception as exc:  # noqa: BLE001 - an answer the client or AG2 could not read
            what = redact(f"{type(exc).__name__}: {exc}")[:500]
            raise AgentFailure(f"LLM endpoint {self.url} sent an answer that could not be read for model "
                               f"'{model['model']}': {what}") from None


def _error_type(exc: Any) -> str | None:
    """The ``type`` of an OpenAI-style error body."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("type"), str):
            return str(inner["type"])
    return None


def calls_middleware(calls: Calls) -> Any:
    """An AG2 middleware factory whose ``on_llm_call`` is ``calls.call`` (ag2 is imported only now)."""
    from ag2 import Middleware
    from ag2.middleware.base import BaseMiddleware

    class CallsMiddleware(BaseMiddleware):
        async def on_llm_call(self, call_next: Any, events: Any, context: Any) -> Any:
            return await calls.call(call_next, events, context)

    return Middleware(CallsMiddleware)
