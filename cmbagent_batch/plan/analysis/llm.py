"""LLM-inferred dependency edges: ask a chat model which dependencies the other sources missed.

The prompt and the checking of replies are pure functions in ``llm_reply``; this module is the I/O around
them: the ``openai`` client (imported only when analysis runs), our own retry loop so that every HTTP
attempt is announced as an ``LlmIntent`` before it is sent and recorded as an ``LlmCall`` when it ends
(failed attempts cost money too), the fall back from ``json_schema``
to ``json_object`` replies, and bounded fix rounds. A local model (``provider: local``, llama.cpp's server,
which answers ``json_schema`` with a 500) is asked for ``json_object`` with the schema attached, which its
grammar sampling enforces. It never falls back silently to a guessed graph: a
reply that stays unusable is an ``AnalysisError`` listing what was wrong.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.errors import BatchError, LlmAnalysisError
from cmbagent_batch.llm.endpoint import (
    DEFAULT_KEY_ENV,
    LOCAL_KEY,
    backoff_delay,
    redactor,
    refusal,
    retry_after,
    retryable,
    server_message,
    utc_now,
)
from cmbagent_batch.plan.analysis.llm_reply import (
    PROMPT_VERSION,
    build_messages,
    check_reply,
    fix_messages,
    reply_schema,
)
from cmbagent_batch.plan.dag import Edge
from cmbagent_batch.spec.model import ModelSpec, TaskSpec

__all__ = ["PROMPT_VERSION", "LlmAnalysis", "LlmCall", "LlmIntent", "backoff_delay", "infer_edges"]


@dataclass(frozen=True)
class LlmCall:
    """One HTTP attempt, successful or not."""

    requested_model: str
    reported_model: str | None  # what the endpoint says answered, e.g. a dated variant
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency_s: float
    status: str  # "ok" | "error"
    error: str | None
    started_at: str  # ISO-8601 UTC


@dataclass(frozen=True)
class LlmIntent:
    """One HTTP attempt about to be sent: the ledger writes it down first, so that a process killed while
    it waits for the answer leaves a trace. Its ``LlmCall`` has the same ``started_at``."""

    requested_model: str
    base_url: str
    prompt_chars: int  # characters of the messages and the response format sent
    started_at: str  # ISO-8601 UTC


@dataclass(frozen=True)
class LlmAnalysis:
    """The edges the model added, and what it took to get them."""

    edges: tuple[Edge, ...]  # source "llm", sorted by (src, dst)
    calls: tuple[LlmCall, ...]
    mode: str  # "json_schema" | "json_object"
    notes: tuple[str, ...]


def infer_edges(tasks: Sequence[TaskSpec], known: Sequence[tuple[str, str]], model: ModelSpec, *,
                ask_about: Collection[str] | None = None, max_fix_rounds: int = 2,
                sleep: Callable[[float], None] = time.sleep,
                on_call: Callable[[LlmCall | LlmIntent], None] | None = None,
                base_url: Callable[[], str] | None = None) -> LlmAnalysis:
    """Ask ``model`` for the dependencies between ``tasks`` that ``known`` (src, dst) pairs lack.
    ``on_call`` is told of every HTTP attempt right before it is sent (an ``LlmIntent``) and as soon as it
    ends (an ``LlmCall``), for the cost ledger. ``base_url``, when
    given, is called right before the first request for the endpoint's URL (a local model's server starts
    then); a BatchError from it fails the analysis.

    With ``ask_about``, only edges touching at least one of those task ids are asked for and accepted.
    Raises LlmAnalysisError (an AnalysisError carrying the calls made, failed ones included) when the key is
    missing, the endpoint fails, or the replies stay unusable after ``max_fix_rounds`` fix rounds.
    """
    if max_fix_rounds < 0:
        raise ValueError("infer_edges: max_fix_rounds must be >= 0")
    ids = [t.id for t in tasks]
    id_set = set(ids)
    if len(id_set) != len(ids):
        raise ValueError("infer_edges: task ids are not unique")
    known_set = set(known)
    if stray := sorted({x for pair in known_set for x in pair} - id_set):
        raise ValueError(f"infer_edges: known edges name unknown tasks {stray}")
    ask = None if ask_about is None else frozenset(ask_about)
    if ask is not None and (stray := sorted(ask - id_set)):
        raise ValueError(f"infer_edges: ask_about names unknown tasks {stray}")
    if len(ids) < 2 or (ask is not None and not ask):
        return LlmAnalysis((), (), "json_schema", ("no pair of tasks to ask about; the model was not called",))

    key_env = model.api_key_env or DEFAULT_KEY_ENV
    key = LOCAL_KEY if model.provider == "local" else os.environ.get(key_env, "")
    if not key:
        raise LlmAnalysisError(f"LLM analysis with model '{model.name}' needs an API key in ${key_env}, "
                               "which is not set")

    try:
        import openai  # only when analysis really runs: `validate` and `plan` must work without it
    except ImportError:
        raise LlmAnalysisError(
            "LLM dependency analysis needs the 'openai' package, which is not installed: "
            "pip install 'cmbagent-batch[agents]'", []
        ) from None

    url = model.base_url
    if base_url is not None:
        try:
            url = base_url()
        except BatchError as exc:
            raise LlmAnalysisError(f"LLM dependency analysis with model '{model.name}' not started: {exc}") from None
    with openai.OpenAI(base_url=url, api_key=key, timeout=model.timeout, max_retries=0) as client:
        endpoint = _Endpoint(openai, client, model, key, key_env, sleep, reply_schema(id_set), on_call)
        first = build_messages(tasks, known_set, ask)
        messages = first
        round_ = 0
        while True:
            content = endpoint.complete(messages)
            check = check_reply(content, id_set, known_set, ask)
            if check.ok:
                notes = list(endpoint.notes)
                if round_:
                    notes.append(f"the model needed {round_} fix round(s)")
                notes.extend(check.notes)
                return LlmAnalysis(check.edges, tuple(endpoint.calls), endpoint.mode, tuple(notes))
            if round_ == max_fix_rounds:
                break
            round_ += 1
            messages = fix_messages(first, content, check.problems)
    raise LlmAnalysisError(
        f"LLM dependency analysis with model '{model.name}' got no usable reply after "
        f"{max_fix_rounds + 1} tries ({max_fix_rounds} fix rounds); the last reply had these problems:\n"
        + "\n".join(f"- {endpoint.redact(p)}" for p in check.problems), endpoint.calls)


class _Endpoint:
    """One model behind one client: sends requests, retries, records every attempt."""

    def __init__(self, openai: Any, client: Any, model: ModelSpec, key: str, key_env: str,
                 sleep: Callable[[float], None], schema: dict[str, Any],
                 on_call: Callable[[LlmCall | LlmIntent], None] | None = None) -> None:
        self.openai = openai
        self.on_call = on_call
        self.client = client
        self.model = model
        self.key = key
        self.key_env = key_env
        self.sleep = sleep
        self.schema = schema
        self.url = str(client.base_url).rstrip("/")
        self.local = model.provider == "local"
        self.mode = "json_object" if self.local else "json_schema"
        self.answered = False  # a structured request has succeeded: a later 400 is not about the format
        self.calls: list[LlmCall] = []
        self.notes: list[str] = []

        self.redact = redactor(key)

    def _format(self) -> dict[str, Any]:
        if self.mode == "json_object":
            return {"type": "json_object", "schema": self.schema} if self.local else {"type": "json_object"}
        return {"type": "json_schema",
                "json_schema": {"name": "task_dependencies", "strict": True, "schema": self.schema}}

    def _announce(self, started: str, messages: list[dict[str, str]]) -> None:
        """Tell the ledger of an attempt about to be sent (before it is sent)."""
        if self.on_call is not None:
            size = sum(len(str(m.get("content") or "")) for m in messages) + len(json.dumps(self._format()))
            self.on_call(LlmIntent(self.model.model, self.url, size, started))

    def _record(self, started: str, t0: float, response: Any = None, error: str | None = None) -> None:
        usage = getattr(response, "usage", None)

        def count(*path: str) -> int:
            value: Any = usage
            for name in path:
                value = getattr(value, name, None)
            return int(value or 0)

        call = LlmCall(
            requested_model=self.model.model,
            reported_model=getattr(response, "model", None),
            prompt_tokens=count("prompt_tokens"),
            cached_prompt_tokens=count("prompt_tokens_details", "cached_tokens"),
            completion_tokens=count("completion_tokens"),
            reasoning_tokens=count("completion_tokens_details", "reasoning_tokens"),
            latency_s=time.perf_counter() - t0,
            status="error" if error is not None else "ok",
            error=None if error is None else self.redact(error),
            started_at=started,
        )
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)

    def complete(self, messages: list[dict[str, str]]) -> str | None:
        """The content of one reply, after as many attempts as the model's retry budget allows."""
        openai = self.openai
        failures = 0
        last: tuple[str, str]  # what went wrong, details: for the message when retries run out
        while True:
            started = utc_now()
            self._announce(started, messages)
            t0 = time.perf_counter()
            wait_for: float | None = None
            fatal: str | None = None  # a status that no retry will change
            try:
                response = self.client.chat.completions.create(
                    model=self.model.model, messages=messages, temperature=0, response_format=self._format())
            except openai.APIStatusError as exc:
                status, text = exc.status_code, server_message(exc, self.redact)
                self._record(started, t0, error=f"{status}: {text}")
                if status == 400 and self.mode == "json_schema" and not self.answered:
                    self.mode = "json_object"
                    self.notes.append(f"the endpoint rejected response_format json_schema (400: {text}); "
                                      "asked for json_object instead")
                    continue
                if not retryable(status):
                    fatal = refusal(self.url, self.model.model, self.key_env, status, text)
                last = ("failed", f"; last error: {status} {text}")
                wait_for = retry_after(exc.response.headers)
            except openai.APITimeoutError:
                self._record(started, t0, error=f"timed out after {self.model.timeout:g} s")
                last = (f"did not answer within {self.model.timeout:g} s", "")
            except openai.APIConnectionError as exc:
                cause = self.redact(str(exc.__cause__ or exc))
                self._record(started, t0, error=f"connection error: {cause}")
                last = ("could not be reached", f": {cause}")
            except Exception as exc:  # noqa: BLE001 - an answer the client could not read still costs
                what = self.redact(f"{type(exc).__name__}: {exc}")[:500]
                self._record(started, t0, error=f"unreadable answer: {what}")
                fatal = f"LLM endpoint {self.url} sent an answer that could not be read for model " \
                        f"'{self.model.model}': {what}"
            else:
                self._record(started, t0, response=response)
                self.answered = True
                choices = getattr(response, "choices", None) or []
                return choices[0].message.content if choices else None
            # raised here, outside the except blocks, so no openai exception (whose text may echo the key)
            # is chained to ours as __context__
            if fatal is not None:
                raise LlmAnalysisError(fatal, self.calls)
            failures += 1
            if failures > self.model.max_retries:
                what, detail = last
                raise LlmAnalysisError(f"LLM endpoint {self.url} {what} for model '{self.model.model}' "
                                       f"after {failures} attempts{detail}", self.calls)
            self.sleep(backoff_delay(failures, wait_for, random.random()))
