"""What a ``ScriptedLLM`` script is made of, and what the server records (standard library only).

The script items (``Reply``, ``Stream``, ``HttpError``, ``Delay``, ``Raw``), the records tests read back
(``RecordedRequest``, ``Served``, ``Tokens``) and the routes and defaults they use. ``scripted_llm``
re-exports every public name here and documents how they behave; tests import them from there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"
DEFAULT_USAGE: Mapping[str, Any] = {
    "prompt_tokens": 120,
    "completion_tokens": 30,
    "total_tokens": 150,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
JSON_SCHEMA_UNSUPPORTED = (
    "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
)
EMBEDDING_SIZE = 8
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
RESPONSES, MESSAGES = "/v1/responses", "/v1/messages"
ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)


def _default_usage() -> dict[str, Any]:
    return json_copy(DEFAULT_USAGE)


def json_copy(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a usage object, as plain JSON."""
    copied: dict[str, Any] = json.loads(json.dumps(usage))
    return copied


def words(text: str) -> list[str]:
    """``text`` cut before each word; every piece keeps the whitespace after it, so the pieces join to ``text``."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


@dataclass(frozen=True)
class Reply:
    """A successful answer (streamed at once when the request asks for a stream)."""

    content: str | Mapping[str, Any] | list[Any] | None
    model: str = DEFAULT_MODEL
    usage: Mapping[str, Any] | None = field(default_factory=_default_usage)
    finish_reason: str = "stop"
    tool_calls: list[Mapping[str, Any]] | None = None  # OpenAI-shaped tool calls, for agent tests
    refusal: str | None = None


@dataclass(frozen=True)
class Stream:
    """A slowly streamed answer: ``pause_s`` between events; a plain answer to a non-stream request.

    ``chunks`` is how ``content`` is cut: None for one piece per word, a number of near-equal pieces, or
    the pieces themselves (which must join to ``content``).
    """

    content: str
    pause_s: float = 0.0
    chunks: int | Sequence[str] | None = None
    usage: Mapping[str, Any] | None = field(default_factory=_default_usage)
    model: str = DEFAULT_MODEL
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if isinstance(self.chunks, int) and self.chunks < 1:
            raise ValueError(f"Stream chunks must be at least 1, not {self.chunks}")
        if not isinstance(self.chunks, (int, type(None))) and "".join(self.chunks) != self.content:
            raise ValueError("Stream chunks must join to the content")

    def pieces(self) -> list[str]:
        """The content pieces, in order."""
        if self.chunks is None:
            return words(self.content)
        if isinstance(self.chunks, int):
            size = -(-len(self.content) // self.chunks) or 1
            return [self.content[i:i + size] for i in range(0, len(self.content), size)]
        return [c for c in self.chunks if c]


@dataclass(frozen=True)
class HttpError:
    """An HTTP error with an OpenAI-style ``{"error": {...}}`` body."""

    status: int
    message: str = ""  # default: a message typical of the status
    retry_after: float | str | None = None  # sent as the Retry-After header
    type: str | None = None
    code: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class Delay:
    """Sleep ``seconds`` (interrupted when the server stops), then answer ``then``."""

    seconds: float
    then: Item = field(default_factory=lambda: Reply("late"))


@dataclass(frozen=True)
class Raw:
    """A 200 answer whose body is ``body`` as given (e.g. not JSON, or JSON of the wrong shape)."""

    body: str


Item = Reply | Stream | HttpError | Delay | Raw
Script = Iterable[Item] | Callable[[Any], Item]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # every header as received, names lower-cased
    body: Any  # parsed JSON; None for GET or an unparsable body (raw text kept in ``raw``)
    raw: str = ""

    @property
    def authorization(self) -> str | None:
        """The Authorization header as received (e.g. ``"Bearer k"``), or None."""
        return self.headers.get("authorization")

    @property
    def api_key(self) -> str | None:
        """The key the client sent: the Bearer token, else the ``x-api-key`` header (Anthropic)."""
        auth = self.authorization
        if auth is not None and auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return self.headers.get("x-api-key", auth)


@dataclass(frozen=True)
class Tokens:
    """Token counts in the chat-completions form (cached within prompt, reasoning within completion)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.prompt_tokens + other.prompt_tokens, self.cached_tokens + other.cached_tokens,
                      self.completion_tokens + other.completion_tokens,
                      self.reasoning_tokens + other.reasoning_tokens)

    @classmethod
    def of(cls, usage: Mapping[str, Any]) -> Tokens:
        """From a chat-completions ``usage`` object."""
        def count(key: str, detail: str | None = None) -> int:
            value = usage.get(key)
            if detail is not None:
                value = value.get(detail) if isinstance(value, Mapping) else None
            return int(value or 0)
        return cls(count("prompt_tokens"), count("prompt_tokens_details", "cached_tokens"),
                   count("completion_tokens"), count("completion_tokens_details", "reasoning_tokens"))


@dataclass(frozen=True)
class Served:
    """One answered POST, as the endpoint served it."""

    number: int  # 1-based position of the request in ``ScriptedLLM.requests``
    route: str  # the request path, one of ROUTES (or an unknown path that got a 404)
    status: int
    model: str | None  # the model the answer reported; None for an error or a Raw body
    usage: Tokens | None  # what the route reports (or would bill, for a stream without usage); None on error
    stream: bool
    complete: bool  # every byte of the answer was sent (False: the client went away or the server stopped)
    authorization: str | None  # the Authorization header of the request
