"""The gateway process of a rank: ``python -m cmbagent_batch.gateway.main``, started by its runner
(``gateway.client``), to which it answers on its stdin and stdout, one JSON object a line.

- The runner's first line gives the real keys (``{"keys": {VARIABLE: value}}``): they come through this
  pipe only, never the environment or a file. The gateway answers ``{"port": N}`` once it listens on
  127.0.0.1:N.
- Then ``{"id": n, "op": "open", "token": T, "grant": {...}}`` opens a grant, answered ``{"id": n}``;
  ``{"id": n, "op": "close", "token": T}`` closes one (its token is refused from then on), answered
  ``{"id": n, "spent": {...}}``: what the attempt's calls came to.
- The end of its stdin (the runner is done, or died, even by SIGKILL) ends it, and so does its parent's
  death: a call still being answered then keeps its intent alone in the ledger (possibly billed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from typing import Any

import orjson
from aiohttp import web

from cmbagent_batch.gateway.grants import Grant
from cmbagent_batch.gateway.server import Gateway

SHUTDOWN_S = 1.0  # how long calls still being answered have once the runner is done


def _say(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
    sys.stdout.buffer.flush()


def _control(gateway: Gateway, line: bytes) -> dict[str, Any]:
    """The answer to one line of the runner's: a grant that cannot be opened (its ledger journals cannot be
    opened: a full disk) is an error for that attempt alone, not the end of the gateway."""
    message: Any = None
    try:
        message = orjson.loads(line)
        op, token = message.get("op"), message.get("token", "")
        if op == "open":
            gateway.open(token, Grant.from_json(message["grant"]))
            return {"id": message["id"]}
        if op == "close":
            return {"id": message["id"], "spent": gateway.close(token)}
        return {"id": message.get("id"), "error": f"unknown operation {op!r}"}
    except Exception as exc:  # noqa: BLE001 - said to the runner, which fails the attempt with it
        ident = message.get("id") if isinstance(message, dict) else None
        return {"id": ident, "error": f"{type(exc).__name__}: {exc}"}


async def _serve(gateway: Gateway) -> None:
    runner = web.AppRunner(gateway.app(), access_log=None, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    _say({"port": runner.addresses[0][1]})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    try:
        while line := await reader.readline():
            _say(_control(gateway, line))
    finally:
        await runner.cleanup()


def _die_with_parent() -> None:
    """A gateway whose runner died stops: nobody would close its grants."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="runner-watch", daemon=True).start()


def main() -> int:
    first = sys.stdin.buffer.readline()
    if not first:
        return 1
    gateway = Gateway(orjson.loads(first).get("keys") or {})
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # a stop is the runner's to make: calls
        signal.signal(sig, signal.SIG_IGN)  # being answered finish, and the end of stdin ends the gateway
    _die_with_parent()
    asyncio.run(_serve(gateway))
    return 0


if __name__ == "__main__":
    sys.exit(main())
