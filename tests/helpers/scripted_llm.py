"""A scripted OpenAI-compatible HTTP server for tests (standard library only).

Tests drive the real ``openai`` client over real HTTP against it::

    with ScriptedLLM([Reply({"edges": []}), HttpError(429, retry_after=2), Reply("hello")]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k")
        ...
        assert len(srv.requests) == 3

Script items, consumed one per ``POST /v1/chat/completions`` in order (or produced by a callable that
takes the parsed request body and returns an item):

- ``Reply(content)``: a completion; ``content`` is a string, or a dict/list that is JSON-encoded.
  ``usage`` and the reported ``model`` are given by the script (defaults below).
- ``HttpError(status)``: an OpenAI-style error body, optional ``Retry-After`` header.
- ``Delay(seconds, then)``: sleep before answering ``then``, to trigger client timeouts.
- ``Raw(body)``: a 200 with that body as it is (not JSON, or JSON of the wrong shape).

``ScriptedLLM(..., json_schema=False)`` models an endpoint without structured outputs: every request whose
``response_format.type`` is ``"json_schema"`` gets a 400 (``JSON_SCHEMA_UNSUPPORTED``) and consumes no item.

When the script runs out (or a callable raises), the server answers 500 with a message saying so and
records it in ``srv.failures``, so a test that sent more requests than it scripted fails visibly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
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
_REASONS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


@dataclass(frozen=True)
class Reply:
    """A successful chat completion."""

    content: str | Mapping[str, Any] | list[Any] | None
    model: str = DEFAULT_MODEL
    usage: Mapping[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    finish_reason: str = "stop"
    tool_calls: list[Mapping[str, Any]] | None = None  # OpenAI-shaped tool calls, for agent tests
    refusal: str | None = None


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


Item = Reply | HttpError | Delay | Raw
Script = Iterable[Item] | Callable[[Any], Item]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # every header as received, names lower-cased
    body: Any  # parsed JSON; None for GET or an unparsable body (raw text kept in ``raw``)
    raw: str = ""


class ScriptedLLM:
    """The server; start with ``with ScriptedLLM(script) as srv`` (or ``start()`` / ``stop()``)."""

    def __init__(self, script: Script = (), *, json_schema: bool = True,
                 models: Iterable[str] = ("gpt-4o-mini",)) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        if callable(script):
            self._next: Callable[[Any], Item] = script
            self._queue: list[Item] | None = None
        else:
            self._queue = list(script)
            self._next = self._pop
        self.json_schema = json_schema
        self.models = tuple(models)
        self._requests: list[RecordedRequest] = []
        self._failures: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._port: int | None = None  # kept after stop() so tests can still name the URL
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ScriptedLLM:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        server.daemon_threads = True  # a client that keeps a connection open must not block stop()
        self._server = server
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="scripted-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> ScriptedLLM:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- what tests look at --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ScriptedLLM was never started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def completions(self) -> list[Any]:
        """The parsed bodies of the chat-completion requests so far."""
        return [r.body for r in self.requests if r.path.rstrip("/").endswith("/chat/completions")]

    @property
    def failures(self) -> list[str]:
        """Script problems met while serving (script exhausted, callable raised)."""
        with self._lock:
            return list(self._failures)

    @property
    def remaining(self) -> int | None:
        """Items not yet consumed; None for a callable script."""
        with self._lock:
            return None if self._queue is None else len(self._queue)

    # -- serving (handler threads) -------------------------------------------------------------------
    def _pop(self, body: Any) -> Item:
        with self._lock:
            if not self._queue:
                raise LookupError("script exhausted")
            return self._queue.pop(0)

    def _record(self, request: RecordedRequest) -> int:
        with self._lock:
            self._requests.append(request)
            return len(self._requests)

    def _fail(self, message: str) -> HttpError:
        with self._lock:
            self._failures.append(message)
        return HttpError(500, f"scripted LLM: {message}", type="server_error")

    def _answer(self, body: Any, number: int) -> Item:
        fmt = body.get("response_format") if isinstance(body, dict) else None
        if not self.json_schema and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return HttpError(400, JSON_SCHEMA_UNSUPPORTED, param="response_format")
        try:
            item = self._next(body)
        except LookupError:
            return self._fail(f"no reply scripted for request #{number}")
        except Exception as exc:  # noqa: BLE001 - a test's callable may raise anything: report it as a 500, keep serving
            return self._fail(f"script callable raised {type(exc).__name__}: {exc}")
        if not isinstance(item, (Reply, HttpError, Delay, Raw)):
            return self._fail(f"script item #{number} is not a Reply, HttpError or Delay: {item!r}")
        return item

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _completion(reply: Reply, body: Any, number: int) -> dict[str, Any]:
    content = reply.content
    if content is not None and not isinstance(content, str):
        content = json.dumps(content)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": reply.refusal}
    if reply.tool_calls is not None:
        message["tool_calls"] = [dict(c) for c in reply.tool_calls]
    finish = "tool_calls" if reply.tool_calls and reply.finish_reason == "stop" else reply.finish_reason
    out: dict[str, Any] = {
        "id": f"chatcmpl-scripted-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "system_fingerprint": "fp_scripted",
    }
    if reply.usage is not None:
        out["usage"] = json.loads(json.dumps(reply.usage))
    return out


def _error_body(err: HttpError) -> dict[str, Any]:
    default_type, default_code = _REASONS.get(err.status, ("server_error", None))
    message = err.message or {
        400: "Bad request.",
        401: "Incorrect API key provided.",
        403: "You are not allowed to use this model.",
        404: "The model does not exist or you do not have access to it.",
        429: "Rate limit reached. Please try again later.",
    }.get(err.status, "The server had an error while processing your request.")
    return {"error": {"message": message, "type": err.type or default_type,
                      "param": err.param, "code": err.code if err.code is not None else default_code}}


def _handler_class(owner: ScriptedLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        timeout = 10  # an idle kept-alive connection closes eventually

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            owner._record(RecordedRequest("GET", self.path, self._headers(), None))
            if self.path.rstrip("/") == "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in owner.models]
                self._send(200, {"object": "list", "data": data})
            else:
                self._send(404, _error_body(HttpError(404, f"no route GET {self.path}")))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            number = owner._record(RecordedRequest("POST", self.path, self._headers(), body, raw))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error_body(HttpError(404, f"no route POST {self.path}")))
                return
            if not isinstance(body, dict):
                self._send(400, _error_body(HttpError(400, "We could not parse the JSON body of your request.")))
                return
            if body.get("stream"):
                self._send(400, _error_body(HttpError(400, "scripted LLM does not stream", param="stream")))
                return
            item = owner._answer(body, number)
            while isinstance(item, Delay):
                owner._wait(item.seconds)
                item = item.then
            if isinstance(item, HttpError):
                headers = {} if item.retry_after is None else {"Retry-After": str(item.retry_after)}
                self._send(item.status, _error_body(item), headers)
            elif isinstance(item, Raw):
                self._send(200, item.body, raw=True)
            else:
                self._send(200, _completion(item, body, number))

        def _headers(self) -> dict[str, str]:
            return {k.lower(): v for k, v in self.headers.items()}

        def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None,
                  raw: bool = False) -> None:
            data = payload.encode() if raw else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timeout); nothing to tell it

    return Handler
