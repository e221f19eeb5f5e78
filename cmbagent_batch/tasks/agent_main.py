"""The agent process: one attempt of an agent task, ``python -m cmbagent_batch.tasks.agent_main REQUEST``.

An AG2 ``Agent`` on the task's model (any OpenAI-compatible endpoint) works on the task's instructions.
Every HTTP attempt goes through the ledger middleware's ``on_llm_call``: the budgets are checked before it, it is retried
there (429, 5xx, timeouts, connection errors; the openai client's own retries are off so that none goes
unrecorded), and it is appended to the rank's ledger journal as soon as it ends. With code execution, the
agent gets two tools that run code in ``codebase/``, confined there by ``cmbagent_batch.tasks.sandbox``.

Writes ``chats/transcript.jsonl`` and ``chats/transcript.md``, the final answer to ``outputs/answer.md``,
and ``logs/agent-result.json``. Exit status: 0 done, 1 failed, 3 a budget was spent.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from cmbagent_batch.costs import CallRecorder, Priced
from cmbagent_batch.endpoint import (
    DEFAULT_KEY_ENV,
    backoff_delay,
    redactor,
    refusal,
    retry_after,
    retryable,
    server_message,
    utc_now,
)
from cmbagent_batch.tasks.agent import EXIT_BUDGET, RESULT, budget_problem, spent

CODE_TIMEOUT = 600.0  # seconds one code execution may take
OUTPUT_LIMIT = 8000  # characters of a code execution's output shown to the model


class AgentFailure(Exception):
    """The attempt fails with this message (no traceback: it says what went wrong)."""


class BudgetSpent(AgentFailure):
    """A budget is spent: no further call is made."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cmbagent_batch.tasks.agent_main REQUEST.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        request = json.load(fh)
    _die_with_runner()
    signal.signal(signal.SIGTERM, _record_interrupted)
    logs = os.path.join(request["work_dir"], "logs")
    recorder = _recorder(request)
    status, code, message, trace = "ok", 0, None, None
    try:
        answer = asyncio.run(_converse(request, recorder))
        _write_answer(request, answer)
    except BudgetSpent as exc:
        status, code, message = "budget_exceeded", EXIT_BUDGET, str(exc)
    except AgentFailure as exc:
        status, code, message = "error", 1, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported with its traceback in the result and stderr
        status, code, message, trace = "error", 1, f"{type(exc).__name__}: {_redact(request)(str(exc))}", None
        trace = _redact(request)(traceback.format_exc())
        print(trace, file=sys.stderr)
    finally:
        recorder.close()
    result = {"status": status, "message": message, "traceback": trace, "calls": recorder.calls,
              "cost_usd": recorder.cost_usd}
    _write_json(os.path.join(logs, RESULT), result)
    if message:
        print(message, file=sys.stderr)
    return code


_in_flight: list[Any] = []  # [recorder, started, t0] while a model call waits for its answer


def _record_interrupted(signum: int, frame: Any) -> None:
    """SIGTERM (a timeout or a stop): the call waiting for its answer goes to the ledger as an error with
    unknown tokens (the endpoint may still charge it), then the process ends."""
    if _in_flight:
        recorder, started, t0 = _in_flight
        _in_flight.clear()
        recorder.record(started=started, latency_s=time.perf_counter() - t0, status="error",
                        error="interrupted while waiting for the endpoint (task timed out or the run stopped); "
                              "tokens unknown")
        recorder.close()
    os._exit(128 + signum)


def _die_with_runner() -> None:
    """An agent whose runner died (kill -9, node failure) stops at once, with the code it runs: nobody
    would record what it spends. The call in flight, if any, is lost with it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="runner-watch", daemon=True).start()


def _recorder(request: dict[str, Any]) -> CallRecorder:
    return CallRecorder(run_dir=request["run_dir"], job=request["job"], run_id=request["run_id"],
                        rank=request["rank"], host=request["host"], source="agent", task=request["task"],
                        attempt=request["attempt"], agent=request["agent"],
                        model=Priced.from_request(request["model"]))


def _redact(request: dict[str, Any]) -> Any:
    return redactor(os.environ.get(request["model"].get("api_key_env") or DEFAULT_KEY_ENV, ""))


def _prompt(request: dict[str, Any]) -> str:
    lines = [f"You are the {request['agent']} of a research team. Do the task you are given; end with your "
             "final answer (it is saved as the task's result)."]
    work = request["work_dir"]
    if request.get("inputs"):
        lines.append("Input files (read them by these paths): "
                     + ", ".join(os.path.join(work, p) for p in request["inputs"]))
    if request["code_execution"]:
        lines.append(f"You can run code with the tools run_python and run_shell. They run in {work}/codebase, "
                     "the only directory you can write to; write every file you make there.")
        if request["outputs"]:
            lines.append("Write these files in that directory: " + ", ".join(request["outputs"]))
    elif len(request["outputs"]) == 1:
        lines.append(f"Your final answer is saved as {request['outputs'][0]}: reply with its full content.")
    return "\n".join(lines)


async def _converse(request: dict[str, Any], recorder: CallRecorder) -> str:
    try:
        import openai
        from ag2 import Agent, Middleware
        from ag2.config import OpenAIConfig
    except ImportError as exc:
        raise AgentFailure(f"agent tasks need AG2 and openai ({exc.name} is not installed): "
                           "pip install 'cmbagent-batch[agents]'") from None
    model = request["model"]
    key_env = model.get("api_key_env") or DEFAULT_KEY_ENV
    key = os.environ.get(key_env, "")
    if not key:
        raise AgentFailure(f"agent task with model '{model['name']}' needs an API key in ${key_env}, which is not set")
    config = OpenAIConfig(model=model["model"], api_key=key, base_url=model.get("base_url"),
                          timeout=model["timeout"], max_retries=0)
    tools = _code_tools(request) if request["code_execution"] else []
    ledger = Middleware(_ledger_middleware(), request=request, recorder=recorder, openai=openai, key=key, key_env=key_env)
    agent = Agent(request["agent"], prompt=_prompt(request), config=config, tools=tools, middleware=[ledger])
    reply = await agent.ask(request["instructions"])
    await _write_transcript(request, reply)
    return reply.body or ""


def _ledger_middleware() -> type:
    """AG2 middleware (built per turn by ``Middleware``) whose ``on_llm_call`` wraps every model call:
    budget check, retries and a ledger entry per HTTP attempt. Made here: ag2 is imported only now."""
    from ag2.middleware.base import BaseMiddleware

    class LedgerMiddleware(BaseMiddleware):
        def __init__(self, event: Any, context: Any, **options: Any) -> None:
            super().__init__(event, context)
            self.options = options

        on_llm_call = _on_llm_call

    return LedgerMiddleware


_turns: dict[int, int] = {}  # model calls answered, per recorder (max_turns spans the whole attempt)


async def _on_llm_call(self: Any, call_next: Any, events: Any, context: Any) -> Any:
    o = self.options
    request, recorder, openai = o["request"], o["recorder"], o["openai"]
    redact = redactor(o["key"])
    model = request["model"]
    url = model.get("base_url") or "https://api.openai.com/v1"
    answered = _turns.get(id(recorder), 0)
    if answered >= request["max_turns"]:
        raise AgentFailure(f"the agent did not finish within max_turns={request['max_turns']} model turns")
    failures = 0
    while True:
        job_spent, task_spent = spent(request["run_dir"], request["task"])
        if (why := budget_problem(request, job_spent, task_spent)) is not None:
            raise BudgetSpent(f"stopped before model call {recorder.calls + 1}: {why}")
        started, t0 = utc_now(), time.perf_counter()
        wait_for: float | None = None
        _in_flight[:] = [recorder, started, t0]
        try:
            response = await call_next(events, context)
        except openai.APIStatusError as exc:
            status, text = exc.status_code, server_message(exc, redact)
            recorder.record(started=started, latency_s=time.perf_counter() - t0, status="error",
                            error=f"{status}: {text}")
            if not retryable(status):
                raise AgentFailure(refusal(url, model["model"], o["key_env"], status, text)) from None
            last = f"failed after {failures + 1} attempts; last error: {status} {text}"
            wait_for = retry_after(exc.response.headers)
        except openai.APITimeoutError:
            recorder.record(started=started, latency_s=time.perf_counter() - t0, status="error",
                            error=f"timed out after {model['timeout']:g} s")
            last = f"did not answer within {model['timeout']:g} s, {failures + 1} attempts"
        except openai.APIConnectionError as exc:
            cause = redact(str(exc.__cause__ or exc))
            recorder.record(started=started, latency_s=time.perf_counter() - t0, status="error",
                            error=f"connection error: {cause}")
            last = f"could not be reached after {failures + 1} attempts: {cause}"
        else:
            usage = response.usage
            recorder.record(started=started, latency_s=time.perf_counter() - t0, status="ok",
                            reported_model=response.model, prompt_tokens=int(usage.prompt_tokens or 0),
                            cached_prompt_tokens=int(usage.cache_read_input_tokens or 0),
                            completion_tokens=int(usage.completion_tokens or 0),
                            reasoning_tokens=int(usage.thinking_tokens or 0))
            _turns[id(recorder)] = answered + 1
            return response
        finally:
            _in_flight.clear()
        failures += 1
        if failures > model["max_retries"]:
            raise AgentFailure(f"LLM endpoint {url} {last} (model '{model['model']}')")
        await asyncio.sleep(backoff_delay(failures, wait_for, random.random()))


def _code_tools(request: dict[str, Any]) -> list[Any]:
    from ag2 import tool

    codebase = os.path.join(request["work_dir"], "codebase")
    os.makedirs(os.path.join(codebase, ".tmp"), exist_ok=True)

    @tool
    def run_python(code: str) -> str:
        """Run a Python program in the task's codebase directory; returns its exit code and output."""
        path = os.path.join(codebase, f"snippet_{_count()}.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(code)
        return _confined([sys.executable, path], codebase)

    @tool
    def run_shell(command: str) -> str:
        """Run a bash command in the task's codebase directory; returns its exit code and output."""
        return _confined(["bash", "-c", command], codebase)

    return [run_python, run_shell]


_counter = 0


def _count() -> int:
    global _counter
    _counter += 1
    return _counter


def _confined(argv: list[str], codebase: str) -> str:
    """Run ``argv`` in ``codebase`` with writes confined to it; the model sees the exit code and output."""
    env = dict(os.environ, TMPDIR=os.path.join(codebase, ".tmp"), HOME=codebase, PYTHONDONTWRITEBYTECODE="1")
    wrapped = [sys.executable, "-m", "cmbagent_batch.tasks.sandbox", "--writable", codebase, "--", *argv]
    try:
        done = subprocess.run(wrapped, cwd=codebase, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=CODE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {CODE_TIMEOUT:g} s"
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    if len(out) > OUTPUT_LIMIT:
        out = out[:OUTPUT_LIMIT // 2] + "\n...[output cut]...\n" + out[-OUTPUT_LIMIT // 2:]
    if done.returncode == 126 and b"Landlock" in done.stderr:
        raise AgentFailure(done.stderr.decode("utf-8", "replace").strip())
    return f"exit code {done.returncode}\n{out}"


async def _write_transcript(request: dict[str, Any], reply: Any) -> None:
    chats = os.path.join(request["work_dir"], "chats")
    os.makedirs(chats, exist_ok=True)
    events = list(await reply.history.get_events())
    rows = [_event_row(e) for e in events]
    with open(os.path.join(chats, "transcript.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")
    with open(os.path.join(chats, "transcript.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# {request['task']} (attempt {request['attempt']}): {request['agent']}\n\n")
        for row in rows:
            fh.write(f"## {row['type']}\n\n{row.get('text') or json.dumps(row, default=str)}\n\n")


def _event_row(event: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"type": type(event).__name__}
    text = getattr(event, "content", None)
    if isinstance(text, str):
        row["text"] = text
    for name in ("name", "arguments", "result", "id"):
        value = getattr(event, name, None)
        if value is not None and not callable(value):
            row[name] = value if isinstance(value, (str, int, float, bool)) else repr(value)
    calls = getattr(event, "tool_calls", None)
    if calls:
        row["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in getattr(calls, "calls", calls)]
    return row


def _write_answer(request: dict[str, Any], answer: str) -> None:
    """The answer to ``outputs/answer.md``; declared outputs made in ``codebase/`` are moved to the work
    directory, where they are published from; a single declared output the agent did not write gets the
    answer (a writing task without code execution)."""
    work = request["work_dir"]
    os.makedirs(os.path.join(work, "outputs"), exist_ok=True)
    with open(os.path.join(work, "outputs", "answer.md"), "w", encoding="utf-8") as fh:
        fh.write(answer)
    missing = []
    for out in request["outputs"]:
        target = os.path.join(work, out)
        made = os.path.join(work, "codebase", out)
        if os.path.lexists(target):
            continue
        if os.path.exists(made):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(made, target) if os.path.isfile(made) else shutil.copytree(made, target)
        else:
            missing.append(out)
    if len(missing) == 1 and len(request["outputs"]) == 1 and not request["code_execution"]:
        with open(os.path.join(work, missing[0]), "w", encoding="utf-8") as fh:
            fh.write(answer)


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
