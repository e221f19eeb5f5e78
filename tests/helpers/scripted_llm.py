"""A scripted OpenAI-compatible HTTP server for tests (standard library only).

Tests drive the real ``openai`` client over real HTTP against it::

    with ScriptedLLM([Reply({"edges": []}), HttpError(429, retry_after=2), Reply("hello")]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k")
        ...
        assert len(srv.requests) == 3

Routes, each consuming one script item per request: ``POST /v1/chat/completions``, ``/v1/completions``
(legacy text), ``/v1/embeddings``, ``/v1/responses`` (Responses API) and ``/v1/messages`` (Anthropic
Messages API); ``GET /v1/models`` lists ``models``. Script items, in order (or produced by a callable that
takes the parsed request body and returns an item):

- ``Reply(content)``: an answer; ``content`` is a string, or a dict/list that is JSON-encoded. ``usage`` and
  the reported ``model`` are given by the script (defaults below). ``usage`` is always written in the
  chat-completions form and translated per route: embeddings report ``prompt_tokens`` only; responses
  ``input_tokens``/``output_tokens`` with their details; messages ``input_tokens`` (without the cached
  ones), ``cache_read_input_tokens`` and ``output_tokens``. An embeddings answer ignores ``content``.
- ``Stream(content, pause_s, chunks)``: like ``Reply``, but a streamed answer is sent piece by piece with
  ``pause_s`` between events (cut short when the server stops or the client goes away), so a test can
  kill a client mid-stream. A ``Reply`` to a ``"stream": true`` request streams too, without pauses.
- ``HttpError(status)``: an OpenAI-style error body (Anthropic-style on ``/v1/messages``), optional
  ``Retry-After`` header.
- ``Delay(seconds, then)``: sleep before answering ``then``, to trigger client timeouts.
- ``Raw(body)``: a 200 with that body as it is (not JSON, or JSON of the wrong shape).

Streams are server-sent events over chunked transfer encoding. Chat and legacy completions send a usage
chunk (``"choices": []``) only when the request has ``stream_options.include_usage``, then ``data: [DONE]``;
responses carry usage in ``response.completed``; messages in ``message_start`` (input) and
``message_delta`` (output). Responses and messages streams end without ``[DONE]``, as the real APIs do.

``ScriptedLLM(..., json_schema=False)`` models an endpoint without structured outputs: every chat request
whose ``response_format.type`` is ``"json_schema"`` gets a 400 (``JSON_SCHEMA_UNSUPPORTED``) and consumes
no item.

``srv.served`` lists what the endpoint answered (one ``Served`` per POST, with the usage it reported or
would bill, in the chat form); ``srv.served_totals()`` sums the tokens of the successful, complete ones.

When the script runs out (or a callable raises), the server answers 500 with a message saying so and
records it in ``srv.failures``, so a test that sent more requests than it scripted fails visibly.

Every name above imports from this module. The script items and records are defined in ``llm_script``,
the answer bodies and streams of each route in ``llm_answers``; this module holds the server.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from tests.helpers.llm_answers import SHAPES, Body, Events, error_body, route_tokens
from tests.helpers.llm_script import (
    CHAT,
    COMPLETIONS,
    DEFAULT_MODEL,
    DEFAULT_USAGE,
    EMBEDDING_SIZE,
    EMBEDDINGS,
    JSON_SCHEMA_UNSUPPORTED,
    MESSAGES,
    RESPONSES,
    ROUTES,
    Delay,
    HttpError,
    Item,
    Raw,
    RecordedRequest,
    Reply,
    Script,
    Served,
    Stream,
    Tokens,
)

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DEFAULT_MODEL",
    "DEFAULT_USAGE",
    "EMBEDDINGS",
    "EMBEDDING_SIZE",
    "JSON_SCHEMA_UNSUPPORTED",
    "MESSAGES",
    "RESPONSES",
    "ROUTES",
    "Body",
    "Delay",
    "Events",
    "HttpError",
    "Item",
    "Raw",
    "RecordedRequest",
    "Reply",
    "Script",
    "ScriptedLLM",
    "Served",
    "Stream",
    "Tokens",
]


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # 64 clients connecting at once are not refused (the default backlog is 5)


class ScriptedLLM:
    """The server; start with ``with ScriptedLLM(script) as srv`` (or ``start()`` / ``stop()``)."""

    def __init__(self, script: Script = (), *, json_schema: bool = True,
                 models: Iterable[str] = ("gpt-4o-mini",)) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
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
        self._served: list[Served] = []
        self._failures: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._port: int | None = None  # kept after stop() so tests can still name the URL
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ScriptedLLM:
        server = _Server(("127.0.0.1", 0), _handler_class(self))
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
    def served(self) -> list[Served]:
        """One record per answered POST, in the order the answers finished (a copy)."""
        with self._lock:
            return list(self._served)

    def served_totals(self, route: str | None = None) -> Tokens:
        """Tokens of the answers served with status 200 and sent completely (optionally of one route)."""
        total = Tokens()
        for s in self.served:
            if s.status == 200 and s.complete and s.usage is not None and route in (None, s.route):
                total += s.usage
        return total

    def wait_served(self, count: int, timeout: float = 10.0) -> list[Served]:
        """Block until ``count`` answers are recorded (a cut stream is recorded once the server notices)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._served) >= count, timeout):
                raise TimeoutError(f"{len(self._served)} answers served after {timeout} s, expected {count}")
            return list(self._served)

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

    def _record_served(self, served: Served) -> None:
        with self._changed:
            self._served.append(served)
            self._changed.notify_all()

    def _fail(self, message: str) -> HttpError:
        with self._lock:
            self._failures.append(message)
        return HttpError(500, f"scripted LLM: {message}", type="server_error")

    def _answer(self, route: str, body: Any, number: int) -> Item:
        fmt = body.get("response_format") if isinstance(body, dict) else None
        if route == CHAT and not self.json_schema and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return HttpError(400, JSON_SCHEMA_UNSUPPORTED, param="response_format")
        try:
            item = self._next(body)
        except LookupError:
            return self._fail(f"no reply scripted for request #{number}")
        except Exception as exc:  # noqa: BLE001 - a test's callable may raise anything: report it as a 500, keep serving
            return self._fail(f"script callable raised {type(exc).__name__}: {exc}")
        if not isinstance(item, (Reply, Stream, HttpError, Delay, Raw)):
            return self._fail(f"script item #{number} is not a Reply, Stream, HttpError, Delay or Raw: {item!r}")
        return item

    def _wait(self, seconds: float) -> bool:
        """Sleep; False when the server is stopping."""
        return not self._stopping.wait(seconds)


# -- HTTP ----------------------------------------------------------------------------------------------
def _sse(event: str | None, payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _handler_class(owner: ScriptedLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        timeout = 10  # an idle kept-alive connection closes eventually
        # TCP_NODELAY: an answer's headers and body are two writes, and with Nagle's algorithm the second
        # waits for the client's delayed ACK, 40 ms a call on Linux, which no real endpoint costs
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            owner._record(RecordedRequest("GET", self.path, self._headers(), None))
            if self.path.rstrip("/") == "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in owner.models]
                self._send(200, {"object": "list", "data": data})
            else:
                self._send(404, error_body(HttpError(404, f"no route GET {self.path}")))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            number = owner._record(RecordedRequest("POST", self.path, self._headers(), body, raw))
            route = self.path.split("?")[0].rstrip("/")
            stream = isinstance(body, dict) and bool(body.get("stream")) and route in SHAPES

            def served(status: int, complete: bool, item: Reply | Stream | None = None, streamed: bool = False) -> None:
                owner._record_served(Served(number, route, status, item.model if item else None,
                                            route_tokens(route, item.usage) if item else None, streamed, complete,
                                            self.headers.get("Authorization")))

            if route not in SHAPES:
                served(404, self._send(404, error_body(HttpError(404, f"no route POST {self.path}"))))
                return
            if not isinstance(body, dict):
                error = HttpError(400, "We could not parse the JSON body of your request.")
                served(400, self._send(400, error_body(error, route)))
                return
            item = owner._answer(route, body, number)
            while isinstance(item, Delay):
                owner._wait(item.seconds)
                item = item.then
            if isinstance(item, HttpError):
                headers = {} if item.retry_after is None else {"Retry-After": str(item.retry_after)}
                served(item.status, self._send(item.status, error_body(item, route), headers))
            elif isinstance(item, Raw):
                served(200, self._send(200, item.body, raw=True))
            else:
                to_body, to_events = SHAPES[route]
                if stream and to_events is not None:
                    pause = item.pause_s if isinstance(item, Stream) else 0.0
                    served(200, self._stream(to_events(item, body, number), pause), item, True)
                else:
                    served(200, self._send(200, to_body(item, body, number)), item)

        def _headers(self) -> dict[str, str]:
            return {k.lower(): v for k, v in self.headers.items()}

        def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None,
                  raw: bool = False) -> bool:
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
                return True
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timeout); nothing to tell it
                return False

        def _stream(self, events: Iterator[tuple[str | None, Any]], pause_s: float) -> bool:
            """Send server-sent events, chunked; False when cut short (the connection is then dropped)."""
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, (event, payload) in enumerate(events):
                    if i and pause_s > 0 and not self._pause(pause_s):
                        raise ConnectionAbortedError
                    data = _sse(event, payload)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.write(b"0\r\n\r\n")
                return True
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.close_connection = True
                try:  # an endpoint that dies mid-stream: the client sees the body end unfinished
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return False

        def _pause(self, seconds: float) -> bool:
            """Sleep between stream events; False when the server stops or the client has gone."""
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if not owner._wait(min(left, 0.05)) or self._client_gone():
                    return False
            return True

        def _client_gone(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            try:
                return not self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                return True

    return Handler
