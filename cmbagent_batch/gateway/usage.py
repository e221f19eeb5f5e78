"""What a model call used, read from its answer, whole or streamed, for each API the gateway forwards.

Pure: no I/O. ``Api.of(path)`` names the API of a request path; ``usage_of`` reads a whole answer;
``StreamUsage`` reads a streamed one event by event. A chat or text completion streamed without
``stream_options.include_usage`` carries no usage at all, so the gateway asks for it (``ask_usage``)
and drops the extra chunk before the client sees it (``StreamUsage.extra``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Api(enum.Enum):
    CHAT = "/chat/completions"
    COMPLETIONS = "/completions"
    EMBEDDINGS = "/embeddings"
    RESPONSES = "/responses"
    MESSAGES = "/messages"  # Anthropic's Messages API

    @classmethod
    def of(cls, path: str) -> Api | None:
        """The API of a request path under the gateway's ``/v1``; None for any other path."""
        if not path.startswith("/v1/"):
            return None
        tail = path[3:].rstrip("/")
        return next((api for api in cls if api.value == tail), None)


@dataclass(frozen=True, slots=True)
class Tokens:
    """A call's usage, in the ledger's terms."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _details(usage: dict[str, Any], name: str, key: str) -> int:
    details = usage.get(name)
    return _int(details.get(key)) if isinstance(details, dict) else 0


def tokens_of(api: Api, usage: Any) -> Tokens | None:
    """The ledger's tokens of an API's ``usage`` object; None when there is none."""
    if not isinstance(usage, dict):
        return None
    if api is Api.RESPONSES:
        return Tokens(_int(usage.get("input_tokens")), _details(usage, "input_tokens_details", "cached_tokens"),
                      _int(usage.get("output_tokens")), _details(usage, "output_tokens_details", "reasoning_tokens"))
    if api is Api.MESSAGES:  # input_tokens leaves out what the cache gave and what was written to it
        cached = _int(usage.get("cache_read_input_tokens"))
        prompt = _int(usage.get("input_tokens")) + cached + _int(usage.get("cache_creation_input_tokens"))
        return Tokens(prompt, cached, _int(usage.get("output_tokens")))
    return Tokens(_int(usage.get("prompt_tokens")), _details(usage, "prompt_tokens_details", "cached_tokens"),
                  _int(usage.get("completion_tokens")),
                  _details(usage, "completion_tokens_details", "reasoning_tokens"))


def usage_of(api: Api, answer: Any) -> tuple[Tokens | None, str | None]:
    """The usage and the reported model of a whole (not streamed) answer."""
    if not isinstance(answer, dict):
        return None, None
    model = answer.get("model")
    return tokens_of(api, answer.get("usage")), model if isinstance(model, str) else None


def for_local(body: dict[str, Any]) -> bool:
    """A request for a local model's llama.cpp server, which answers ``response_format`` of type
    ``json_schema`` with a 500 but takes the same schema as ``{"type": "json_object", "schema": ...}`` (and
    constrains the reply to it); True when ``body`` was changed (in place)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return False
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    body["response_format"] = {"type": "json_object", **({"schema": schema} if isinstance(schema, dict) else {})}
    return True


def ask_usage(api: Api, body: dict[str, Any]) -> bool:
    """Make a streamed chat or text completion report its usage; True when the client did not ask for it
    (its usage chunk is then dropped). ``body`` is changed in place."""
    if api not in (Api.CHAT, Api.COMPLETIONS) or not body.get("stream"):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


class StreamUsage:
    """The usage of a streamed answer, read from its events (``feed`` each event's JSON data)."""

    def __init__(self, api: Api, asked: bool) -> None:
        self.api = api
        self.asked = asked  # the gateway asked for the usage chunk: the client did not
        self.tokens: Tokens | None = None
        self.model: str | None = None
        self.done = False  # the answer's end was seen ([DONE], response.completed, message_stop)
        self._messages = Tokens()

    def feed(self, event: Any) -> bool:
        """Read one event's data; return whether it goes on to the client (False: a usage chunk it did not
        ask for)."""
        if not isinstance(event, dict):
            return True
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        if self.api is Api.RESPONSES:
            return self._response(event)
        if self.api is Api.MESSAGES:
            return self._message(event)
        usage = tokens_of(self.api, event.get("usage"))
        if usage is None:
            return True
        self.tokens = usage
        return not (self.asked and not event.get("choices"))

    def end(self) -> None:
        """The ``[DONE]`` line of a chat or text completion."""
        self.done = True

    def _response(self, event: dict[str, Any]) -> bool:
        response = event.get("response")
        if isinstance(response, dict):
            if isinstance(response.get("model"), str):
                self.model = response["model"]
            if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                self.tokens = tokens_of(self.api, response.get("usage")) or self.tokens
                self.done = True
        return True

    def _message(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self._messages = tokens_of(self.api, message.get("usage")) or Tokens()
            self.tokens = self._messages
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            start, usage = self._messages, event["usage"]
            self.tokens = Tokens(start.prompt, start.cached, _int(usage.get("output_tokens")), 0)
        elif kind == "message_stop":
            self.done = True
        return True


_PROMPT_KEYS = ("messages", "input", "prompt", "system", "instructions")


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of what a request sends the model: the text in its messages, input, prompt, system and
    instructions (the request's size without the JSON around it), for the size of a possibly billed call."""
    return sum(_text_len(body.get(key)) for key in _PROMPT_KEYS)


def _text_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_len(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k not in ("role", "type", "name", "id"))
    return 0
