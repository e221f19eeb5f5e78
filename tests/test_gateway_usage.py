"""What the gateway reads of a call's answer (``gateway.usage``), for each API, whole and streamed; and the
requests it changes on the way: the usage a stream is asked for, a local model's structured replies."""

from __future__ import annotations

from typing import Any

import pytest

from cmbagent_batch.gateway.grants import Grant, Route, Spent, new_token
from cmbagent_batch.gateway.usage import (
    Api,
    StreamUsage,
    Tokens,
    ask_usage,
    for_local,
    prompt_chars,
    tokens_of,
    usage_of,
)

CHAT_USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
              "prompt_tokens_details": {"cached_tokens": 40}, "completion_tokens_details": {"reasoning_tokens": 5}}


@pytest.mark.parametrize("path, api", [("/v1/chat/completions", Api.CHAT), ("/v1/completions", Api.COMPLETIONS),
                                       ("/v1/embeddings", Api.EMBEDDINGS), ("/v1/responses", Api.RESPONSES),
                                       ("/v1/messages", Api.MESSAGES), ("/v1/chat/completions/", Api.CHAT),
                                       ("/v1/models", None), ("/chat/completions", None), ("/v1/files", None)])
def test_the_api_of_a_path(path: str, api: Api | None) -> None:
    assert Api.of(path) is api


def test_tokens_of_each_api() -> None:
    assert tokens_of(Api.CHAT, CHAT_USAGE) == Tokens(100, 40, 20, 5)
    assert tokens_of(Api.EMBEDDINGS, {"prompt_tokens": 8, "total_tokens": 8}) == Tokens(8, 0, 0, 0)
    assert tokens_of(Api.RESPONSES, {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 10},
                                     "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3}}) == \
        Tokens(50, 10, 7, 3)
    # Anthropic counts what the cache gave, and what was written to it, apart from input_tokens
    assert tokens_of(Api.MESSAGES, {"input_tokens": 30, "cache_read_input_tokens": 20,
                                    "cache_creation_input_tokens": 5, "output_tokens": 9}) == Tokens(55, 20, 9, 0)
    assert tokens_of(Api.CHAT, None) is None
    assert tokens_of(Api.CHAT, {"prompt_tokens": -3, "completion_tokens": "7", "total_tokens": True}) == Tokens()


def test_a_whole_answer_s_usage_and_model() -> None:
    assert usage_of(Api.CHAT, {"model": "gpt-x", "usage": CHAT_USAGE}) == (Tokens(100, 40, 20, 5), "gpt-x")
    assert usage_of(Api.CHAT, {"model": "gpt-x"}) == (None, "gpt-x")
    assert usage_of(Api.CHAT, ["not", "an", "answer"]) == (None, None)


def test_a_stream_is_asked_for_its_usage_only_when_the_client_did_not_ask() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"something": 1}}
    assert ask_usage(Api.CHAT, body) is True
    assert body["stream_options"] == {"something": 1, "include_usage": True}
    asked: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_usage(Api.COMPLETIONS, asked) is False and asked["stream_options"] == {"include_usage": True}
    assert ask_usage(Api.CHAT, {"stream": False}) is False
    assert ask_usage(Api.RESPONSES, {"stream": True}) is False  # Responses always ends with its usage


def test_the_usage_chunk_the_client_did_not_ask_for_is_dropped() -> None:
    usage = StreamUsage(Api.CHAT, asked=True)
    assert usage.feed({"model": "m1", "choices": [{"delta": {"content": "hi"}}], "usage": None}) is True
    assert usage.feed({"model": "m1", "choices": [], "usage": CHAT_USAGE}) is False
    usage.end()
    assert (usage.tokens, usage.model, usage.done) == (Tokens(100, 40, 20, 5), "m1", True)
    kept = StreamUsage(Api.CHAT, asked=False)
    assert kept.feed({"choices": [], "usage": CHAT_USAGE}) is True  # the client asked: it gets it


def test_a_streamed_response_and_message_give_their_usage() -> None:
    response = StreamUsage(Api.RESPONSES, asked=False)
    response.feed({"type": "response.output_text.delta", "delta": "x"})
    assert not response.done
    response.feed({"type": "response.completed",
                   "response": {"model": "r1", "usage": {"input_tokens": 4, "output_tokens": 2}}})
    assert (response.tokens, response.model, response.done) == (Tokens(4, 0, 2, 0), "r1", True)
    message = StreamUsage(Api.MESSAGES, asked=False)
    message.feed({"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 12,
                                                                                      "output_tokens": 1}}})
    message.feed({"type": "message_delta", "usage": {"output_tokens": 30}})
    assert not message.done
    message.feed({"type": "message_stop"})
    assert (message.tokens, message.model, message.done) == (Tokens(12, 0, 30, 0), "claude-x", True)


def test_a_local_model_is_asked_for_a_json_object_with_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body: dict[str, Any] = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert for_local(body) is True and body["response_format"] == {"type": "json_object", "schema": schema}
    assert for_local({"response_format": {"type": "text"}}) is False


def test_the_size_of_a_prompt_is_its_text() -> None:
    assert prompt_chars({"messages": [{"role": "system", "content": "abc"},
                                      {"role": "user", "content": [{"type": "text", "text": "de"}]}]}) == 5
    assert prompt_chars({"input": ["one", "two"], "model": "m", "temperature": 0.5}) == 6
    assert prompt_chars({"prompt": "xyz", "system": "s"}) == 4


def test_grants_cross_the_pipe_as_they_are() -> None:
    route = Route("mini", "gpt-4o-mini", "http://127.0.0.1:9/v1", "KEY", {"prompt_per_1m": 1.0}, "spec", 5.0)
    grant = Grant("t", 2, 1, "h", "/run", "job", "run-1", "task", None, (route,), job_usd=1.0)
    assert Grant.from_json(grant.to_json()) == grant
    assert grant.route("mini") is route and grant.route("gpt-4o-mini") is route and grant.route("other") is None
    assert Spent.from_json(Spent(calls=2, refused=("x",)).to_json()) == Spent(calls=2, refused=("x",))
    token = new_token()
    assert token.startswith("cbk-") and len(token) > 30 and token != new_token()
