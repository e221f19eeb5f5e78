"""Answer one research question with CMBAgent's one-shot mode, every agent on one model.

    python cmbagent_oneshot.py "QUESTION"

Run in a task's work directory. Reads from the environment:
  OPENAI_BASE_URL   the OpenAI-compatible endpoint (OPENAI_API_BASE is accepted too, for older setups)
  OPENAI_API_KEY    the key (or token) sent to it
  CMBAGENT_MODEL    the model name every agent uses
and optionally ONESHOT_AGENT (researcher, the default, or engineer: engineer runs the Python code the
model writes, in ONESHOT_WORK_DIR), ONESHOT_MAX_ROUNDS (default 20), ONESHOT_REQUEST_TIMEOUT (seconds
per request, default 600), ONESHOT_WORK_DIR (default cmbagent_work).

Writes answer.md in the current directory; CMBAgent's own files (chats/, cost_report_*.json, the saved
report) go to ONESHOT_WORK_DIR. Exit status: 0 answered, 1 CMBAgent failed or gave no answer, 2 usage
or environment error.

Why not ``cmbagent.one_shot()`` itself (cmbagent 0.0.1.post30): it sets only the engineer's and the
researcher's models and leaves every other agent on its built-in one (the researcher's formatter calls
o3-mini, control and terminator gpt-4.1, plan_reviewer and idea_hater Claude, whose client refuses to
start without ANTHROPIC_API_KEY); and it clears its work directory and then writes chats/ files into a
chats/ directory it never creates. So this script builds ``CMBAgent`` as one_shot does, with one model
for all agents, and creates the directories itself.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ANSWER_FILE = "answer.md"
AGENTS = ("researcher", "engineer")


class UsageError(Exception):
    """The command line or the environment is wrong: exit status 2."""


class NoAnswer(Exception):
    """CMBAgent ran but left no answer: exit status 1."""


@dataclass(frozen=True)
class Settings:
    question: str
    base_url: str
    api_key: str
    model: str
    agent: str
    max_rounds: int
    request_timeout: float
    work_dir: str


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")
    return value


def read_settings(argv: Sequence[str], env: Mapping[str, str]) -> Settings:
    """The run's settings from the command line and the environment; every problem in one message."""
    problems = []
    if len(argv) != 1 or not argv[0].strip():
        problems.append('usage: cmbagent_oneshot.py "QUESTION" (one non-empty argument)')
    base_url = env.get("OPENAI_BASE_URL") or env.get("OPENAI_API_BASE") or ""
    if not base_url:
        problems.append("OPENAI_BASE_URL is not set: the endpoint to call (e.g. http://127.0.0.1:PORT/v1)")
    api_key = env.get("OPENAI_API_KEY", "")
    if not api_key:
        problems.append("OPENAI_API_KEY is not set")
    model = env.get("CMBAGENT_MODEL", "")
    if not model:
        problems.append("CMBAGENT_MODEL is not set: the model name every agent uses")
    agent = env.get("ONESHOT_AGENT", "researcher")
    if agent not in AGENTS:
        problems.append(f"ONESHOT_AGENT must be one of {', '.join(AGENTS)}, got {agent!r}")
    try:
        max_rounds = _int(env, "ONESHOT_MAX_ROUNDS", 20)
        timeout = float(_int(env, "ONESHOT_REQUEST_TIMEOUT", 600))
    except UsageError as exc:
        problems.append(str(exc))
        max_rounds, timeout = 0, 0.0
    if problems:
        raise UsageError("\n".join(problems))
    return Settings(question=argv[0].strip(), base_url=base_url.rstrip("/"), api_key=api_key, model=model,
                    agent=agent, max_rounds=max_rounds, request_timeout=timeout,
                    work_dir=os.path.abspath(env.get("ONESHOT_WORK_DIR", "cmbagent_work")))


def model_config(s: Settings) -> dict[str, Any]:
    """One AG2 config entry for the endpoint. api_type 'openai' is written out: CMBAgent's own
    ``get_model_config`` picks the client from the model's name ('claude' -> Anthropic, 'gemini' ->
    Google, 'o3' -> adds reasoning_effort), which a name served behind a gateway must not trigger."""
    return {"model": s.model, "api_key": s.api_key, "base_url": s.base_url, "api_type": "openai"}


def run_one_shot(s: Settings) -> Any:
    """CMBAgent's one-shot mode, as ``cmbagent.one_shot`` runs it, every agent on ``s.model``."""
    os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")  # no IPython display in a batch task
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(s.work_dir, exist_ok=True)
    # Importing cmbagent makes ./cmbagent_output in the current directory: import from the work dir.
    here = os.getcwd()
    os.chdir(s.work_dir)
    try:
        from cmbagent.cmbagent import CMBAgent
        from cmbagent.utils import default_agents_llm_model
    except ImportError as exc:
        raise UsageError(f"cmbagent is not installed for {sys.executable}: {exc}. "
                         "Install it with: pip install cmbagent") from None
    finally:
        os.chdir(here)

    config = model_config(s)
    # Every agent with a built-in model gets ours; the others take default_llm_config_list.
    per_agent = {name: dict(config) for name in default_agents_llm_model}
    agent = CMBAgent(
        work_dir=s.work_dir,
        clear_work_dir=False,  # solve() would empty it after we made chats/
        default_llm_config_list=[dict(config)],
        agent_llm_configs=per_agent,
        timeout=s.request_timeout,
    )
    check_models(agent, s.model)
    for sub in ("chats", "data", "codebase"):
        os.makedirs(os.path.join(s.work_dir, sub), exist_ok=True)
    agent.solve(s.question, max_rounds=s.max_rounds, initial_agent=s.agent, mode="one_shot",
                shared_context={"max_n_attempts": 3})
    write_cost_report(agent)
    return agent


def check_models(agent: Any, model: str) -> None:
    """Refuse to start if any agent, or the group chat managers (which take ``agent.llm_config``), would
    call another model than ``model``."""
    holders = [("group chat managers", agent.llm_config)]
    holders += [(a.name, getattr(a, "llm_config", None)) for a in agent.agents]
    others = sorted(
        f"{name}: {config['config_list'][0].get('model')}"
        for name, config in holders
        if isinstance(config, dict) and config.get("config_list")
        and config["config_list"][0].get("model") != model
    )
    if others:
        raise NoAnswer("some agents would call another model: " + "; ".join(others))


def write_cost_report(agent: Any) -> None:
    """CMBAgent's cost table (printed, and saved as cost_report_*.json in its work dir). Its prices are
    AG2's table: $0 for a model name it does not know; the batch ledger has the real figures."""
    if not hasattr(agent, "groupchat"):  # as one_shot does
        agent.groupchat = type("NoGroupChat", (), {"new_conversable_agents": []})()
    try:
        agent.display_cost()
    except Exception as exc:  # noqa: BLE001 - a report problem must not hide the answer
        print(f"cmbagent_oneshot: cost report skipped: {exc}", file=sys.stderr)


# Whose message is the answer, best first: the engineer's nested chat reports the code it ran and its output.
ANSWER_SOURCES = {"researcher": ("researcher",), "engineer": ("engineer_nest", "engineer")}


def answer_text(agent: Any, initial_agent: str) -> str:
    """The last non-empty message of the first of ``ANSWER_SOURCES[initial_agent]`` that spoke."""
    history = getattr(getattr(agent, "chat_result", None), "chat_history", None) or []
    for source in ANSWER_SOURCES[initial_agent]:
        for message in reversed(history):
            content = message.get("content")
            if message.get("name") == source and isinstance(content, str) and content.strip():
                return content.strip()
    names = sorted({str(m.get("name")) for m in history})
    raise NoAnswer(f"no message from {initial_agent} in the chat ({len(history)} messages, from: "
                   f"{', '.join(names) or 'nobody'})")


def write_answer(question: str, text: str, path: str = ANSWER_FILE) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# {question}\n\n{text}\n")
    os.replace(tmp, path)


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    try:
        settings = read_settings(argv, env)
    except UsageError as exc:
        print(f"cmbagent_oneshot: {exc}", file=sys.stderr)
        return 2
    try:
        agent = run_one_shot(settings)
        write_answer(settings.question, answer_text(agent, settings.agent))
    except UsageError as exc:
        print(f"cmbagent_oneshot: {exc}", file=sys.stderr)
        return 2
    except NoAnswer as exc:
        print(f"cmbagent_oneshot: no answer: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # CMBAgent calls sys.exit() (status 0) when it misses an agent
        print(f"cmbagent_oneshot: CMBAgent exited early (sys.exit({exc.code!r})) without an answer",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure inside CMBAgent/AG2 is the task's failure
        traceback.print_exc()
        print(f"cmbagent_oneshot: CMBAgent failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"cmbagent_oneshot: answer written to {os.path.abspath(ANSWER_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
