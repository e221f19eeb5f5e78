"""The gateway's HTTP side: an OpenAI-compatible API on 127.0.0.1 that forwards each call of an attempt
to its model's real endpoint, with the real key, and meters it (``metering``).

A request is refused, with an OpenAI-style error and nothing forwarded, when its token is not that of an
open grant (401: unknown, or of an attempt that has ended), when it names a model its task did not
declare (403, ``model_not_declared``), when a budget is spent (402, ``budget_exceeded``, naming the
budget), or when its intent cannot be journaled (503, ``ledger_unwritable``). Otherwise its intent is
journaled, then it is forwarded as it came (a streamed chat or text completion is asked for its usage,
and the chunk that carries it is dropped unless the client asked too); the answer goes back as the
endpoint sent it, status and errors included (the real keys taken out of an error's text), and its
result is journaled once it has come whole. The journal writes happen in the event loop: a line's
``write`` takes microseconds, and the fsyncs are grouped on a thread of their own (``metering.Books``).
A request for a local model asking for a ``json_schema`` reply is asked for a ``json_object`` with that
schema, the form llama.cpp's server takes. Served with aiohttp: one event loop serves every call of the
rank's attempts at once.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from cmbagent_batch.gateway.grants import Grant, Route
from cmbagent_batch.gateway.metering import Books, Budgets, Metered
from cmbagent_batch.gateway.usage import Api, StreamUsage, ask_usage, for_local, prompt_chars, usage_of
from cmbagent_batch.llm.endpoint import utc_now

ENDED_KEPT = 100_000  # tokens of ended attempts remembered, to say so when one comes back
ANTHROPIC_VERSION = "2023-06-01"
_HOP = {"host", "authorization", "x-api-key", "content-length", "connection", "keep-alive", "transfer-encoding",
        "te", "upgrade", "proxy-authorization", "accept-encoding"}


def error_body(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    """An OpenAI-style error answer."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def token_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or None


class Gateway:
    """The open grants of a rank's attempts, by token, and the server that forwards their calls."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = dict(keys)  # the real keys, by variable: never written anywhere
        self._secrets = [v.encode() for v in self._keys.values() if len(v) >= 8]
        self.grants: dict[str, Metered] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._budgets = Budgets()
        self._books = Books()
        self._session: aiohttp.ClientSession | None = None

    # -- grants, from the runner ---------------------------------------------------------------------
    def open(self, token: str, grant: Grant) -> None:
        self.grants[token] = Metered(grant, self._books.of(grant))

    def close(self, token: str) -> dict[str, Any]:
        metered = self.grants.pop(token, None)
        if metered is None:
            return {}
        self._ended[token] = metered.grant.who()
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        return metered.close().to_json()

    # -- serving -------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{api:.+}", self.forward)
        app.router.add_get("/v1/models", self.models)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)  # the endpoints' own limits apply
        # trust_env: HTTPS_PROXY and NO_PROXY, as the runner got them (a cluster's nodes may reach the
        # internet through a proxy alone)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                              trust_env=True)

    async def _stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        self._books.close()

    async def models(self, request: web.Request) -> web.Response:
        metered = self._granted(request)
        if isinstance(metered, web.Response):
            return metered
        data = [{"id": r.model, "object": "model", "created": 0, "owned_by": "cmbagent-batch"}
                for r in metered.grant.routes]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    def _granted(self, request: web.Request) -> Metered | web.Response:
        token = token_of(request)
        metered = self.grants.get(token or "")
        if metered is not None:
            return metered
        if token is not None and token in self._ended:
            return error_body(401, f"this token was of {self._ended[token]}, which has ended: a token is good for "
                                   "its attempt only", "invalid_request_error", "token_expired")
        return error_body(401, "not a token of a running attempt: cmbagent-batch gives each attempt of a task "
                               "that declares models its own, in OPENAI_API_KEY", "invalid_request_error",
                          "invalid_api_key")

    async def forward(self, request: web.Request) -> web.StreamResponse:
        api = Api.of(request.path)
        if api is None:
            return error_body(404, f"the gateway forwards /v1/chat/completions, /v1/completions, /v1/embeddings, "
                                   f"/v1/responses and /v1/messages, not {request.path}", "invalid_request_error",
                              "unknown_url")
        metered = self._granted(request)
        if isinstance(metered, web.Response):
            return metered
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return error_body(400, "the request body is not a JSON object", "invalid_request_error")
        grant = metered.grant
        route = grant.route(body.get("model"))
        if route is None:
            why = (f"model {body.get('model')!r} is not declared by task {grant.task}; it may call: "
                   f"{grant.declared()} (add it to the task's models)")
            metered.refused(why)
            return error_body(403, why, "invalid_request_error", "model_not_declared")
        loop = asyncio.get_running_loop()
        capped = grant.job_usd is not None or grant.task_usd is not None
        budget = await loop.run_in_executor(None, self._budgets.problem, grant) if capped else None
        if budget is not None:
            metered.refused(budget, budget=True)
            return error_body(402, budget, "budget_exceeded")
        changed = ask_usage(api, body)
        asked = changed
        if body.get("model") != route.model:  # named by its key in llm.models: the endpoint knows its name
            body["model"] = route.model
            changed = True
        if route.provider == "local" and api is Api.CHAT:
            changed = for_local(body) or changed
        sent = orjson.dumps(body) if changed else raw
        try:
            intent = metered.intend(route, utc_now(), prompt_chars(body))
        except OSError as exc:  # nothing goes out that the ledger cannot show
            return error_body(503, f"the call was not sent: the gateway cannot write the ledger journal of rank "
                                   f"{grant.rank} ({exc.strerror or exc}: {exc.filename or grant.run_dir})",
                              "ledger_unwritable")
        return await _Call(self, metered, route, api, intent, asked).send(request, sent)

    def upstream_headers(self, request: web.Request, route: Route, api: Api) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP and k.lower() != "content-type"}
        key = self._keys.get(route.api_key_env or "", "") if route.api_key_env else ""
        if api is Api.MESSAGES:
            if key:
                headers["x-api-key"] = key
            headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        headers["Content-Type"] = "application/json"
        return headers

    def redact(self, data: bytes) -> bytes:
        """``data`` without the real keys (an endpoint's error may quote the key it was sent)."""
        for secret in self._secrets:
            data = data.replace(secret, b"[redacted]")
        return data

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the gateway's client session starts with its server"
        return self._session


class _Call:
    """One forwarded call, from its intent to its result (or to its cut)."""

    def __init__(self, gateway: Gateway, metered: Metered, route: Route, api: Api, intent: dict[str, Any],
                 asked: bool) -> None:
        self.gateway, self.metered, self.route, self.api = gateway, metered, route, api
        self.intent, self.asked = intent, asked
        self.t0 = time.perf_counter()
        self.settled = False

    async def send(self, request: web.Request, sent: bytes) -> web.StreamResponse:
        url = self.route.base_url.rstrip("/") + self.api.value + (f"?{request.query_string}" if request.query_string else "")
        headers = self.gateway.upstream_headers(request, self.route, self.api)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.route.timeout, sock_read=self.route.timeout)
        try:
            async with self.gateway.session.post(url, data=sent, headers=headers, timeout=timeout) as up:
                if "text/event-stream" in up.headers.get("Content-Type", "") and up.status == 200:
                    return await self._stream(request, up)
                return await self._whole(up)
        except aiohttp.ClientConnectorError as exc:  # never reached the endpoint: nothing was billed
            await self._result("error", f"connection error: {exc.os_error or exc}", None, None)
            return error_body(502, f"the endpoint of model {self.route.key} ({self.route.base_url}) could not be "
                                   f"reached: {exc.os_error or exc}", "api_connection_error")
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            self._cut()
            what = f"did not answer within {self.route.timeout:g} s" if isinstance(exc, asyncio.TimeoutError) \
                else f"broke off its answer ({type(exc).__name__}: {exc})"
            return error_body(504, f"the endpoint of model {self.route.key} ({self.route.base_url}) {what}; the "
                                   "call may have been billed", "api_timeout_error")
        finally:
            if not self.settled:  # cancelled: the client went away, or the gateway is stopping
                self._cut()

    async def _whole(self, up: aiohttp.ClientResponse) -> web.Response:
        data = await up.read()
        if up.status != 200:
            data = self.gateway.redact(data)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if up.status == 200 and not isinstance(answer, dict):  # the client cannot read it either; it was paid
            await self._result("error", f"unreadable answer: {data[:200].decode('utf-8', 'replace')}", None, None)
        elif up.status == 200:
            tokens, model = usage_of(self.api, answer)
            error = None if tokens is not None else "the endpoint reported no token usage: 0 tokens counted"
            await self._result("ok", error, model, tokens)
        else:
            await self._result("error", f"{up.status}: {_message(answer, data)}", None, None)
        headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP and k.lower() != "content-encoding"}
        return web.Response(status=up.status, body=data, headers=headers)  # decompressed, if it came compressed

    async def _stream(self, request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP and k.lower() != "content-encoding"}
        out = web.StreamResponse(status=200, headers=headers)
        await out.prepare(request)
        usage = StreamUsage(self.api, self.asked)
        rest = b""
        try:
            async for data in up.content.iter_any():  # what came, whole events forwarded in one write
                events, rest = _events(rest + data)
                kept = [e for e in events if _keep(e, usage)]
                if kept:
                    await out.write(b"".join(kept))
            if rest.strip() and _keep(rest, usage):
                await out.write(rest)
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionResetError):
            # the endpoint stopped answering, or the client went away (its answer is not read further: the
            # endpoint stops generating): possibly billed, unless its usage came already
            await self._settle(usage)
            return out
        await self._settle(usage)
        await out.write_eof()
        return out

    async def _settle(self, usage: StreamUsage) -> None:
        """The result of a streamed call once its answer ended or was cut: a cut one whose usage is not
        known keeps its intent alone."""
        if self.settled:
            return
        if usage.tokens is None and not usage.done:
            self._cut()
            return
        error = None if usage.tokens is not None else "the endpoint reported no token usage: 0 tokens counted"
        await self._result("ok", error, usage.model, usage.tokens)

    async def _result(self, status: str, error: str | None, model: str | None, tokens: Any) -> None:
        self.settled = True
        try:
            self.metered.answered(self.route, self.intent, self.t0, status, error, model, tokens)
        except OSError as exc:  # the answer still goes back; the call stays possibly billed, and says why
            print(f"cmbagent-batch gateway: cannot journal the result of call {self.intent['id']} of "
                  f"{self.metered.grant.who()}: {exc}; it is possibly billed in the ledger", file=sys.stderr)

    def _cut(self) -> None:
        if not self.settled:
            self.settled = True
            self.metered.cut()


def _events(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole server-sent events at the start of ``data`` (each with the blank line that ends it), and
    the rest."""
    events: list[bytes] = []
    start = 0
    while True:
        lf, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        if lf < 0 and crlf < 0:
            return events, data[start:]
        end = lf + 2 if crlf < 0 or 0 <= lf < crlf else crlf + 4
        events.append(data[start:end])
        start = end


def _keep(event: bytes, usage: StreamUsage) -> bool:
    """Read one server-sent event's data; whether it goes on to the client."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            usage.end()
            return True
        try:
            return usage.feed(orjson.loads(data))
        except orjson.JSONDecodeError:
            return True
    return True


def _message(answer: Any, data: bytes) -> str:  # ``data`` is redacted already
    """An error answer's message, for the ledger (short)."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        message = answer["error"].get("message")
        if isinstance(message, str):
            return message[:500]
    return data[:200].decode("utf-8", "replace")
