"""The agent process: one attempt of an agent task, ``python -m cmbagent_batch.tasks.agent.main REQUEST``.

An AG2 ``Agent`` on the task's model (any OpenAI-compatible endpoint) works on the task's instructions;
``agent_calls`` budgets, retries and ledgers each of its model calls, ``agent_tools`` gives it code
execution. Writes ``chats/transcript.jsonl`` and ``chats/transcript.md`` (also when the attempt fails:
the calls were paid for), the final answer to ``outputs/answer.md``, the declared outputs to the work
directory, and ``logs/agent-result.json``. Exit status: 0 done, 1 failed, 3 a budget was spent.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from cmbagent_batch.errors import AgentFailure, BudgetSpent
from cmbagent_batch.llm.endpoint import DEFAULT_KEY_ENV, redactor
from cmbagent_batch.rundir.atomic import write_json_atomic
from cmbagent_batch.tasks.agent.calls import Calls, calls_middleware
from cmbagent_batch.tasks.agent.launch import EXIT_BUDGET, RESULT

GATEWAY_KEY_ENV = "OPENAI_API_KEY"  # the attempt's gateway token (never a real key)
INPUT_LIMIT = 20_000  # characters of one input file put in the prompt of an agent without code execution
INPUTS_LIMIT = 100_000  # characters of all of them


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cmbagent_batch.tasks.agent.main REQUEST.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        request = json.load(fh)
    _die_with_runner()
    redact = redactor(os.environ.get(GATEWAY_KEY_ENV, ""))
    holder: list[Calls] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: _terminated(signum, request, holder, redact))
    status, code, message, trace = "ok", 0, None, None
    try:
        answer = asyncio.run(_converse(request, redact, holder))
        _write_outputs(request, answer)
    except BudgetSpent as exc:
        status, code, message = "budget_exceeded", EXIT_BUDGET, str(exc)
    except AgentFailure as exc:
        status, code, message = "error", 1, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported with its traceback in the result and stderr
        status, code, message = "error", 1, f"{type(exc).__name__}: {redact(str(exc))}"
        trace = redact(traceback.format_exc())
        print(trace, file=sys.stderr)
    finally:
        if holder:
            _write_transcript(request, holder[0].conversation, redact)
    write_json_atomic(os.path.join(request["work_dir"], "logs", RESULT),
                      {"status": status, "message": message, "traceback": trace})
    if message:
        print(message, file=sys.stderr)
    return code


def _terminated(signum: int, request: dict[str, Any], holder: list[Calls], redact: Callable[[str], str]) -> None:
    """SIGTERM (a timeout or a stop): keep the transcript, end. A call waiting for its answer is the
    gateway's to ledger (possibly billed)."""
    if holder:
        _write_transcript(request, holder[0].conversation, redact)
        write_json_atomic(os.path.join(request["work_dir"], "logs", RESULT),
                          {"status": "terminated", "message": None, "traceback": None})
    os._exit(128 + signum)


def _die_with_runner() -> None:
    """An agent whose runner died (kill -9, node failure) stops at once, with the code it runs: nobody
    would record what it spends. The call in flight, if any, keeps only its intent: the ledger shows it as
    possibly billed."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="runner-watch", daemon=True).start()


def prompt(request: dict[str, Any]) -> str:
    """The agent's system prompt: its role, where things are, and (without code execution) its inputs."""
    lines = [f"You are the {request['agent']} of a research team. Do the task you are given; end with your "
             "final answer (it is saved as the task's result)."]
    work = request["work_dir"]
    if request["code_execution"]:
        if request.get("inputs"):
            lines.append("Input files (read them by these paths): "
                         + ", ".join(os.path.join(work, p) for p in request["inputs"]))
        lines.append(f"You can run code with the tools run_python and run_shell. They run in {work}/codebase, "
                     "the only directory you can write to; write every file you make there.")
        if request["outputs"]:
            lines.append("Write these files in that directory: " + ", ".join(request["outputs"]))
        return "\n".join(lines)
    lines.extend(_inputs_text(work, request.get("inputs") or []))
    if len(request["outputs"]) == 1:
        lines.append(f"Your final answer is saved as {request['outputs'][0]}: reply with its full content.")
    return "\n".join(lines)


def _inputs_text(work: str, inputs: list[str]) -> list[str]:
    """The input files' text, for an agent that cannot read files itself (cut to the limits, saying so)."""
    out, left = [], INPUTS_LIMIT
    for pattern in inputs:
        for path in sorted(glob.glob(os.path.join(work, pattern))) or [os.path.join(work, pattern)]:
            name = os.path.relpath(path, work)
            try:
                with open(path, "rb") as fh:
                    data = fh.read(min(INPUT_LIMIT, max(left, 0)) + 1)
            except OSError as exc:
                out.append(f"Input file {name}: cannot be read ({exc.strerror or exc}).")
                continue
            text = data.decode("utf-8", "replace")
            limit = min(INPUT_LIMIT, max(left, 0))
            cut = len(text) > limit
            text = text[:limit]
            left -= len(text)
            out.append(f"Input file {name}{' (cut)' if cut else ''}:\n<<<\n{text}\n>>>")
    return out


async def _converse(request: dict[str, Any], redact: Callable[[str], str], holder: list[Calls]) -> str:
    try:
        import openai
        from ag2 import Agent
        from ag2.config import OpenAIConfig
    except ImportError as exc:
        raise AgentFailure(f"agent tasks need AG2 and openai ({exc.name} is not installed): "
                           "pip install 'cmbagent-batch[agents]'") from None
    model = request["model"]
    token, gateway = os.environ.get(GATEWAY_KEY_ENV, ""), os.environ.get("OPENAI_BASE_URL", "")
    if not token or not gateway:
        raise AgentFailure("the agent process was started without its gateway (OPENAI_BASE_URL and "
                           f"{GATEWAY_KEY_ENV} unset): agent tasks run under cmbagent-batch run")
    # The gateway gives the endpoint the model's timeout, and says so: this side waits a little longer.
    config = OpenAIConfig(model=model["model"], api_key=token, base_url=gateway, timeout=model["timeout"] + 5,
                          max_retries=0)
    key_env = model.get("api_key_env") or DEFAULT_KEY_ENV
    calls = Calls(request, openai, key_env, redact)
    holder.append(calls)
    unconfined: list[str] = []
    tools: list[Any] = []
    if request["code_execution"]:
        from cmbagent_batch.tasks.agent.tools import code_tools

        tools = code_tools(request["work_dir"], GATEWAY_KEY_ENV, unconfined.append)
    agent = Agent(request["agent"], prompt=prompt(request), config=config, tools=tools,
                  middleware=[calls_middleware(calls)])
    try:
        reply = await agent.ask(request["instructions"])
    except json.JSONDecodeError as exc:
        raise AgentFailure(f"the model called a tool with arguments that are not valid JSON ({exc.msg}); "
                           "the reply may have been cut at its token limit") from None
    if unconfined:
        raise AgentFailure(unconfined[0])
    answer = reply.body or ""
    if not answer.strip():
        raise AgentFailure("the model's final answer is empty")
    return answer


def _write_outputs(request: dict[str, Any], answer: str) -> None:
    """The answer to ``outputs/answer.md``. A declared output (or glob) the agent's code made in
    ``codebase/`` is copied to the work directory, where it is published from; a single declared output of
    an agent without code execution gets the answer. What an earlier attempt left there is replaced."""
    work = request["work_dir"]
    os.makedirs(os.path.join(work, "outputs"), exist_ok=True)
    with open(os.path.join(work, "outputs", "answer.md"), "w", encoding="utf-8") as fh:
        fh.write(answer)
    if not request["code_execution"]:
        if len(request["outputs"]) == 1:
            with open(os.path.join(work, request["outputs"][0]), "w", encoding="utf-8") as fh:
                fh.write(answer)
        return
    codebase = os.path.join(work, "codebase")
    for pattern in request["outputs"]:
        for made in glob.glob(os.path.join(codebase, pattern)):
            target = os.path.join(work, os.path.relpath(made, codebase))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(made):
                shutil.copytree(made, target, dirs_exist_ok=True)
            else:
                shutil.copy2(made, target)


def _write_transcript(request: dict[str, Any], events: list[Any], redact: Callable[[str], str]) -> None:
    chats = os.path.join(request["work_dir"], "chats")
    os.makedirs(chats, exist_ok=True)
    rows = [{"type": "SystemPrompt", "text": prompt(request)}] + [_event_row(e) for e in events]
    with open(os.path.join(chats, "transcript.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(redact(json.dumps(row, default=str)) + "\n")
    with open(os.path.join(chats, "transcript.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# {request['task']} (attempt {request['attempt']}): {request['agent']}\n\n")
        for row in rows:
            body = row.get("text") or json.dumps({k: v for k, v in row.items() if k != "type"}, default=str)
            fh.write(redact(f"## {row['type']}\n\n{body}\n\n"))


def _event_row(event: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"type": type(event).__name__}
    parts = getattr(event, "parts", None)
    if parts is not None:  # a request: what was sent
        row["text"] = "\n".join(str(getattr(p, "content", None) or getattr(p, "text", None) or p) for p in parts)
    content = getattr(event, "content", None)
    if isinstance(content, str):
        row["text"] = content
    calls = getattr(event, "tool_calls", None)
    if calls:
        row["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in getattr(calls, "calls", calls)]
    results = getattr(event, "results", None)
    if results:
        row["tool_results"] = [{"name": getattr(r, "name", None), "result": str(getattr(r, "result", r))}
                               for r in results]
    for name in ("model", "finish_reason"):
        value = getattr(event, name, None)
        if isinstance(value, str):
            row[name] = value
    return row


if __name__ == "__main__":
    sys.exit(main())
