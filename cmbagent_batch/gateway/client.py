"""The runner's side of its rank's gateway: the gateway process started on the first attempt that calls
a model, and its grants opened and closed. It gets the real keys (``keys.held``) through its stdin.

**One gateway per rank, not per node.** A rank's attempts start and end in its runner, which opens and
closes their grants without a message to anyone; the calls go to the rank's own ledger journal, the one
its agent calls always went to; and a rank that dies takes its gateway with it, leaving only its own
calls as possibly billed. A gateway per node would need the ranks of a node to agree on who serves and
to hand grants across processes, for the saving of an idle process per rank.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import os
import subprocess
import sys
import threading
from typing import IO, Any

import orjson

from cmbagent_batch.errors import GatewayError
from cmbagent_batch.gateway.grants import Grant, Spent
from cmbagent_batch.gateway.keys import held, held_names
from cmbagent_batch.llm.local_model import bypass_proxy

START_S = 60.0  # for the gateway process to import aiohttp and listen
ANSWER_S = 30.0  # for it to answer an open or a close

class GatewayProcess:
    """One running gateway: ``url``, ``open(token, grant)``, ``close(token)``, ``stop()``."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        names = held_names()
        env = {k: v for k, v in os.environ.items() if k not in names}
        env.update(bypass_proxy(env))  # a local model's server is on 127.0.0.1: never through a proxy
        with open(log_path, "ab") as log:  # its own session: a Ctrl-C is for the runner, which stops it
            self.proc = subprocess.Popen([sys.executable, "-m", "cmbagent_batch.gateway.main"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout
        self._lock = threading.Lock()  # the answers waited for
        self._sending = threading.Lock()  # the pipe to the gateway
        self._ids = itertools.count(1)
        self._waiting: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._started: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        threading.Thread(target=self._read, name="gateway-answers", daemon=True).start()
        self._send({"keys": held()})
        try:
            port = int(self._started.result(START_S)["port"])
        except GatewayError:
            raise
        except (concurrent.futures.TimeoutError, KeyError, ValueError, TypeError):
            self.stop()
            raise GatewayError(f"the metering gateway did not start within {START_S:g} s; see {log_path}") from None
        self.url = f"http://127.0.0.1:{port}/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def open(self, token: str, grant: Grant) -> None:
        self._ask({"op": "open", "token": token, "grant": grant.to_json()})

    def close(self, token: str) -> Spent:
        return Spent.from_json(self._ask({"op": "close", "token": token}).get("spent") or {})

    def stop(self) -> None:
        try:
            self._in.close()  # the gateway ends at the end of its stdin
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        answer: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._lock:
            n = next(self._ids)
            self._waiting[n] = answer
        try:
            self._send({"id": n, **message})
            said = answer.result(ANSWER_S)
            if said.get("error"):
                raise GatewayError(f"the metering gateway refused: {said['error']}; see {self.log_path}")
            return said
        except concurrent.futures.TimeoutError:
            raise GatewayError(f"the metering gateway did not answer within {ANSWER_S:g} s; see {self.log_path}") from None
        finally:
            with self._lock:
                self._waiting.pop(n, None)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            with self._sending:
                self._in.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
                self._in.flush()
        except (OSError, ValueError) as exc:
            raise GatewayError(f"the metering gateway has stopped ({exc}); see {self.log_path}") from None

    def _read(self) -> None:
        for line in self._out:
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "port" in message:
                self._started.set_result(message)
                continue
            with self._lock:
                waiting = self._waiting.get(message.get("id"))
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
        ended = GatewayError(f"the metering gateway has stopped (exit code {self.proc.wait()}); see {self.log_path}")
        with self._lock:
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ended)
        if not self._started.done():
            self._started.set_exception(ended)


_gateway: GatewayProcess | None = None
_gateway_lock = threading.Lock()


def gateway(log_path: str) -> GatewayProcess:
    """This process's gateway, started now if it is not running (said on stderr when it is started again)."""
    global _gateway
    with _gateway_lock:
        if _gateway is not None and _gateway.alive():
            return _gateway
        if _gateway is None:
            atexit.register(stop)
        else:
            print(f"cmbagent-batch: warning: the metering gateway stopped (exit code {_gateway.proc.poll()}; see "
                  f"{_gateway.log_path}): started again; calls it was forwarding are in the ledger as possibly "
                  "billed", file=sys.stderr)
        _gateway = GatewayProcess(log_path)
        return _gateway


def running() -> GatewayProcess | None:
    """This process's gateway if it runs (none is started)."""
    with _gateway_lock:
        return _gateway if _gateway is not None and _gateway.alive() else None


def stop() -> None:
    """Stop this process's gateway, if one runs (the end of a run, on every rank)."""
    global _gateway
    with _gateway_lock:
        if _gateway is not None:
            _gateway.stop()
            _gateway = None
