"""The answers a ``ScriptedLLM`` sends on each route, whole and streamed (pure functions, standard library only).

For ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses`` and ``/v1/messages``:
the JSON body of a whole answer, and the server-sent events of a streamed one, built from a ``Reply`` or
``Stream``; the usage each route reports (``route_tokens``) and the error body of an ``HttpError``
(``error_body``). ``SHAPES`` maps each route to its two builders; ``scripted_llm`` serves them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from tests.helpers.llm_script import (
    CHAT,
    COMPLETIONS,
    EMBEDDING_SIZE,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    HttpError,
    Reply,
    Stream,
    Tokens,
    json_copy,
    words,
)

_REASONS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _text(item: Reply | Stream) -> str:
    content = item.content
    return content if isinstance(content, str) else "" if content is None else json.dumps(content)


def _pieces(item: Reply | Stream) -> list[str]:
    return item.pieces() if isinstance(item, Stream) else words(_text(item))


def route_tokens(route: str, usage: Mapping[str, Any] | None) -> Tokens | None:
    """The usage a route reports, in the chat form."""
    if usage is None:
        return None
    tokens = Tokens.of(usage)
    if route == EMBEDDINGS:
        return Tokens(prompt_tokens=tokens.prompt_tokens)
    return replace(tokens, reasoning_tokens=0) if route == MESSAGES else tokens


def _responses_usage(t: Tokens) -> dict[str, Any]:
    return {"input_tokens": t.prompt_tokens, "input_tokens_details": {"cached_tokens": t.cached_tokens},
            "output_tokens": t.completion_tokens, "output_tokens_details": {"reasoning_tokens": t.reasoning_tokens},
            "total_tokens": t.total_tokens}


def _messages_usage(t: Tokens, output_tokens: int | None = None) -> dict[str, Any]:
    return {"input_tokens": t.prompt_tokens - t.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": t.cached_tokens,
            "output_tokens": t.completion_tokens if output_tokens is None else output_tokens}


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _finish(item: Reply | Stream) -> str:
    if isinstance(item, Reply) and item.tool_calls and item.finish_reason == "stop":
        return "tool_calls"
    return item.finish_reason


def _tool_calls(item: Reply | Stream) -> list[Mapping[str, Any]] | None:
    return item.tool_calls if isinstance(item, Reply) else None


def _completion(reply: Reply | Stream, body: Any, number: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if reply.content is None else _text(reply),
                               "refusal": reply.refusal if isinstance(reply, Reply) else None}
    if (calls := _tool_calls(reply)) is not None:
        message["tool_calls"] = [dict(c) for c in calls]
    out: dict[str, Any] = {
        "id": f"chatcmpl-scripted-{number}", "object": "chat.completion", "created": int(time.time()),
        "model": reply.model, "system_fingerprint": "fp_scripted",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply)}],
    }
    if reply.usage is not None:
        out["usage"] = json_copy(reply.usage)
    return out


def _chat_events(reply: Reply | Stream, body: Any, number: int,
                 legacy: bool = False) -> Iterator[tuple[str | None, Any]]:
    """Chat completion chunks, or with ``legacy`` text completion chunks."""
    include = _include_usage(body)
    base = {"id": f"{'cmpl' if legacy else 'chatcmpl'}-scripted-{number}",
            "object": "text_completion" if legacy else "chat.completion.chunk",
            "created": int(time.time()), "model": reply.model, "system_fingerprint": "fp_scripted"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, **({"text": delta.get("content", "")} if legacy else {"delta": delta}),
                  "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": None} if include else {})}

    if not legacy:
        yield None, chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in _pieces(reply):
        yield None, chunk({"content": piece})
    if not legacy and (calls := _tool_calls(reply)):
        yield None, chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
    yield None, chunk({}, _finish(reply))
    if include and reply.usage is not None:
        yield None, {**base, "choices": [], "usage": json_copy(reply.usage)}
    yield None, "[DONE]"


def _text_completion(reply: Reply | Stream, body: Any, number: int) -> dict[str, Any]:
    out = _completion(reply, body, number)
    out.update(id=f"cmpl-scripted-{number}", object="text_completion",
               choices=[{"text": _text(reply), "index": 0, "logprobs": None, "finish_reason": _finish(reply)}])
    return out


def _text_events(reply: Reply | Stream, body: Any, number: int) -> Iterator[tuple[str | None, Any]]:
    return _chat_events(reply, body, number, legacy=True)


def _embedding(text: Any, encoding: Any) -> list[float] | str:
    digest = hashlib.sha256(json.dumps(text).encode()).digest()
    vector = [(b - 128) / 128 for b in digest[:EMBEDDING_SIZE]]  # exact in float32, so base64 round-trips
    return base64.b64encode(struct.pack(f"<{EMBEDDING_SIZE}f", *vector)).decode() if encoding == "base64" else vector


def _embeddings(reply: Reply | Stream, body: Any, number: int) -> dict[str, Any]:
    given = body.get("input")
    single = isinstance(given, str) or (isinstance(given, list) and given and all(isinstance(i, int) for i in given))
    inputs = [given] if single or not isinstance(given, list) else given
    data = [{"object": "embedding", "index": i, "embedding": _embedding(text, body.get("encoding_format"))}
            for i, text in enumerate(inputs)]
    out: dict[str, Any] = {"object": "list", "data": data, "model": reply.model}
    tokens = route_tokens(EMBEDDINGS, reply.usage)
    if tokens is not None:
        out["usage"] = {"prompt_tokens": tokens.prompt_tokens, "total_tokens": tokens.prompt_tokens}
    return out


def _response(reply: Reply | Stream, body: Any, number: int, done: bool = True) -> dict[str, Any]:
    tokens = route_tokens(RESPONSES, reply.usage)
    message = {"type": "message", "id": f"msg_scripted_{number}", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": _text(reply), "annotations": []}]}
    incomplete = done and reply.finish_reason == "length"
    return {"id": f"resp_scripted_{number}", "object": "response", "created_at": int(time.time()),
            "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "model": reply.model, "output": [message] if done else [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {},
            "instructions": None, "temperature": 1.0, "top_p": 1.0,
            "usage": _responses_usage(tokens) if done and tokens is not None else None}


def _response_events(reply: Reply | Stream, body: Any, number: int) -> Iterator[tuple[str | None, Any]]:
    item_id, text = f"msg_scripted_{number}", _text(reply)
    part = {"type": "output_text", "text": text, "annotations": []}
    done = _response(reply, body, number)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(reply, body, number, done=False)},
        {"type": "response.in_progress", "response": _response(reply, body, number, done=False)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**done["output"][0], "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **where, "delta": p, "logprobs": []} for p in _pieces(reply)),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
        {"type": f"response.{done['status']}", "response": done},
    ]
    for sequence, event in enumerate(events):
        yield event["type"], {**event, "sequence_number": sequence}


def _message(reply: Reply | Stream, body: Any, number: int, done: bool = True) -> dict[str, Any]:
    tokens = route_tokens(MESSAGES, reply.usage)
    out: dict[str, Any] = {
        "id": f"msg_scripted_{number}", "type": "message", "role": "assistant", "model": reply.model,
        "content": [{"type": "text", "text": _text(reply)}] if done else [],
        "stop_reason": _STOP_REASONS.get(reply.finish_reason, reply.finish_reason) if done else None,
        "stop_sequence": None}
    if tokens is not None:  # a stream's message_start reports the input, and a first output token
        out["usage"] = _messages_usage(tokens, None if done else min(1, tokens.completion_tokens))
    return out


def _message_events(reply: Reply | Stream, body: Any, number: int) -> Iterator[tuple[str | None, Any]]:
    yield "message_start", {"type": "message_start", "message": _message(reply, body, number, done=False)}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "ping", {"type": "ping"}
    for piece in _pieces(reply):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": piece}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    tokens = route_tokens(MESSAGES, reply.usage)
    delta: dict[str, Any] = {"type": "message_delta", "delta": {
        "stop_reason": _STOP_REASONS.get(reply.finish_reason, reply.finish_reason), "stop_sequence": None}}
    if tokens is not None:
        delta["usage"] = {"output_tokens": tokens.completion_tokens}
    yield "message_delta", delta
    yield "message_stop", {"type": "message_stop"}


Body = Callable[[Reply | Stream, Any, int], dict[str, Any]]
Events = Callable[[Reply | Stream, Any, int], Iterator[tuple[str | None, Any]]]
SHAPES: dict[str, tuple[Body, Events | None]] = {
    CHAT: (_completion, _chat_events), COMPLETIONS: (_text_completion, _text_events),
    EMBEDDINGS: (_embeddings, None), RESPONSES: (_response, _response_events), MESSAGES: (_message, _message_events),
}


def error_body(err: HttpError, route: str = CHAT) -> dict[str, Any]:
    """The body of an error answer: OpenAI-style, or Anthropic-style on ``/v1/messages``."""
    default_type, default_code = _REASONS.get(err.status, ("server_error", None))
    message = err.message or {
        400: "Bad request.",
        401: "Incorrect API key provided.",
        403: "You are not allowed to use this model.",
        404: "The model does not exist or you do not have access to it.",
        429: "Rate limit reached. Please try again later.",
    }.get(err.status, "The server had an error while processing your request.")
    if route == MESSAGES:
        return {"type": "error", "error": {"type": err.type or _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                           "message": message}}
    return {"error": {"message": message, "type": err.type or default_type,
                      "param": err.param, "code": err.code if err.code is not None else default_code}}
