"""Agent tasks end to end: the CLI in a subprocess, an agent process per attempt (AG2 + the real openai
client) talking real HTTP to a scripted OpenAI-compatible server on 127.0.0.1, and the cost ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers.cli import Runner, clean_env, cli, wait_until
from tests.helpers.runs import published, read_run, work_dir
from tests.helpers.scripted_llm import Delay, HttpError, Raw, Reply, ScriptedLLM

pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")

pytestmark = pytest.mark.slow  # runs of agent tasks, each a CLI in a subprocess

KEY = "sk-test-SECRET-key-0123456789"
PRICE = {"prompt_per_1m": 2.0, "cached_prompt_per_1m": 0.5, "completion_per_1m": 8.0}


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def cost(prompt: int, completion: int, cached: int = 0) -> float:
    return ((prompt - cached) * PRICE["prompt_per_1m"] + cached * PRICE["cached_prompt_per_1m"]
            + completion * PRICE["completion_per_1m"]) / 1e6


def tool_call(n: int, name: str, **arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def spec(tmp_path: Path, url: str, tasks: str, *, budget: str = "", timeout: float = 5, retries: int = 3,
         extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"version: 1\njob:\n  name: agents\n{budget}"
        "execution:\n  max_workers: 2\n  keep_going: true\n"
        "llm:\n  default_model: m\n  models:\n    m:\n"
        f"      model: test-model\n      base_url: {url}\n      api_key_env: TEST_LLM_KEY\n"
        f"      timeout: {timeout}\n      max_retries: {retries}\n"
        f"      price: {json.dumps(PRICE)}\n{extra}"
        f"tasks:\n{tasks}"
    )
    return path


def run(tmp_path: Path, *args: str, key: str | None = KEY, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = clean_env(tmp_path)
    env.pop("TEST_LLM_KEY", None)
    if key is not None:
        env["TEST_LLM_KEY"] = key
    return cli(tmp_path, *args, env=env, timeout=timeout)


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def intents(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ledger.intents.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def journal_entries(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def states(run_dir: Path) -> dict[str, str]:
    manifest = read_run(run_dir)
    return {tid: t["state"] for tid, t in manifest["tasks"].items()}


def who(body: Any) -> str:
    """Which task a request comes from: the instructions are the first user message."""
    for m in body["messages"]:
        if m["role"] == "user":
            return str(m["content"]).split(":")[0]
    return "?"


def tool_results(body: Any) -> list[str]:
    return [str(m.get("content")) for m in body["messages"] if m["role"] == "tool"]


TASKS = """\
  - id: plan
    kind: agent
    agent: planner
    instructions: "PLAN: write the plan"
    outputs: [plan.md]
  - id: compute
    kind: agent
    agent: engineer
    instructions: "COMPUTE: compute the spectra"
    inputs: [plan.md]
    outputs: [spectra.txt]
    code_execution: true
    max_turns: 4
  - id: check
    kind: shell
    run: test -s spectra.txt && cat spectra.txt > checked.txt
    inputs: [spectra.txt]
    outputs: [checked.txt]
"""

ESCAPES = ("../escape.txt", "/tmp/cmbagent-escape-test.txt", "{outside}/escape.txt")
WRITE_CODE = (
    "open('spectra.txt', 'w').write('C_ell\\n')\n"
    "for target in {targets!r}:\n"
    "    try:\n"
    "        open(target, 'w').write('x')\n"
    "        print('WROTE', target)\n"
    "    except OSError as exc:\n"
    "        print('DENIED', target, type(exc).__name__)\n"
)


def happy_script(body: Any) -> Reply:
    task = who(body)
    if task == "PLAN":
        return Reply("1. compute spectra\n2. fit", usage=usage(1000, 200, cached=400), model="test-model-2026-01-01")
    if task == "COMPUTE" and not tool_results(body):
        outside = os.environ["AGENT_TEST_OUTSIDE"]
        code = WRITE_CODE.format(targets=tuple(e.format(outside=outside) for e in ESCAPES))
        return Reply(None, tool_calls=[tool_call(1, "run_python", code=code)], usage=usage(1500, 300))
    return Reply("spectra computed", usage=usage(2500, 50, reasoning=10))


@pytest.fixture(autouse=True)
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory outside the run directory that agent code must not write to."""
    path = tmp_path / "outside"
    path.mkdir()
    monkeypatch.setenv("AGENT_TEST_OUTSIDE", str(path))
    return path


def test_agent_job_runs_and_its_ledger_reconciles_to_the_cent(tmp_path: Path) -> None:
    with ScriptedLLM(happy_script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, TASKS)))
        assert srv.failures == []
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "agents"
    assert states(run_dir) == {"plan": "succeeded", "compute": "succeeded", "check": "succeeded"}
    # what each agent produced, published
    assert (published(run_dir, "plan") / "plan.md").read_text() == "1. compute spectra\n2. fit"
    assert (published(run_dir, "compute") / "spectra.txt").read_text() == "C_ell\n"
    assert (published(run_dir, "check") / "checked.txt").read_text() == "C_ell\n"
    work = work_dir(run_dir, "compute")
    assert (work / "outputs" / "answer.md").read_text() == "spectra computed"
    transcript = (work / "chats" / "transcript.jsonl").read_text()
    assert "run_python" in transcript and "DENIED ../escape.txt PermissionError" in transcript
    # the ledger: every call, priced by hand, totals to the cent
    entries = ledger(run_dir)
    assert [(e["task"], e["call"], e["status"]) for e in sorted(entries, key=lambda e: (e["task"], e["call"]))] == [
        ("compute", 1, "ok"), ("compute", 2, "ok"), ("plan", 1, "ok")]
    by_task = {(e["task"], e["call"]): e for e in entries}
    plan = by_task[("plan", 1)]
    assert (plan["prompt_tokens"], plan["cached_prompt_tokens"], plan["completion_tokens"]) == (1000, 400, 200)
    assert plan["requested_model"] == "test-model" and plan["reported_model"] == "test-model-2026-01-01"
    assert plan["agent"] == "planner" and plan["model"] == "m" and plan["price_table"] == "spec"
    assert plan["cost_usd"] == pytest.approx(cost(1000, 200, cached=400))
    assert by_task[("compute", 2)]["reasoning_tokens"] == 10
    expected = cost(1000, 200, 400) + cost(1500, 300) + cost(2500, 50)
    total = sum(e["cost_usd"] for e in entries)
    assert round(total, 2) == round(expected, 2) and total == pytest.approx(expected, abs=1e-12)
    manifest = json.loads((run_dir / "run.json").read_text())
    root = Path(__file__).resolve().parents[1] / "schemas"
    jsonschema.validate(manifest, json.loads((root / "run.schema.json").read_text()))
    entry_schema = json.loads((root / "ledger-entry.schema.json").read_text())
    for e in entries:
        jsonschema.validate(e, entry_schema)
    assert manifest["ledger"]["entries"] == 3 and manifest["ledger"]["head"] == entries[-1]["hash"]
    assert manifest["ledger"]["cost_usd"] == pytest.approx(expected)
    assert list((run_dir / "ledger").glob("rank-*.jsonl")) == []  # merged, then removed
    verify = run(tmp_path, "ledger", "verify", str(run_dir / "ledger.jsonl"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    summary = json.loads(run(tmp_path, "ledger", "summarize", str(run_dir / "ledger.jsonl"), "--by", "task",
                             "--format", "json").stdout)
    assert summary["total"]["calls"] == 3 and summary["total"]["prompt_tokens"] == 5000
    assert summary["total"]["cost_usd"] == pytest.approx(expected)


def test_code_execution_writes_inside_codebase_and_nowhere_else(tmp_path: Path, outside: Path) -> None:
    with ScriptedLLM(happy_script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, TASKS)))
        sent_back = [r for b in srv.completions for r in tool_results(b)]
    assert result.returncode == 0, result.stderr
    codebase = work_dir(tmp_path / "runs" / "agents", "compute") / "codebase"
    assert (codebase / "spectra.txt").read_text() == "C_ell\n"
    assert not (codebase.parent / "escape.txt").exists()
    assert list(outside.iterdir()) == []
    assert not Path("/tmp/cmbagent-escape-test.txt").exists()
    assert len(sent_back) == 1 and sent_back[0].count("DENIED") == 3 and "WROTE" not in sent_back[0]


def test_no_api_key_in_any_file(tmp_path: Path) -> None:
    with ScriptedLLM(happy_script) as srv:
        assert run(tmp_path, "run", str(spec(tmp_path, srv.base_url, TASKS))).returncode == 0
        assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in srv.requests)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert KEY.encode() not in path.read_bytes(), path


ONE_AGENT = """\
  - id: solo
    kind: agent
    agent: researcher
    instructions: "SOLO: summarise"
    outputs: [summary.md]
"""


def test_429_and_500_are_retried_and_every_attempt_is_in_the_ledger(tmp_path: Path) -> None:
    script = [HttpError(429, retry_after=0), HttpError(500, retry_after=0), Reply("done", usage=usage(100, 10))]
    with ScriptedLLM(script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT)))
        assert len(srv.completions) == 3
    assert result.returncode == 0, result.stderr
    entries = ledger(tmp_path / "runs" / "agents")
    assert [(e["call"], e["status"], e["cost_usd"]) for e in entries] == [
        (1, "error", 0.0), (2, "error", 0.0), (3, "ok", pytest.approx(cost(100, 10)))]
    assert entries[0]["error"].startswith("429: Rate limit reached")
    assert entries[1]["error"].startswith("500: ")


def test_401_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    with ScriptedLLM([HttpError(401)]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT)))
        assert len(srv.completions) == 1
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    manifest = read_run(run_dir)
    reason = manifest["tasks"]["solo"]["reason"]
    assert reason == (f"LLM endpoint {srv.base_url} rejected the API key (401) for model 'test-model'; "
                      "check $TEST_LLM_KEY")
    assert [e["status"] for e in ledger(run_dir)] == ["error"]
    assert "Traceback" not in result.stderr


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    with ScriptedLLM([]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT)), key=None)
        assert srv.completions == []
    assert result.returncode == 2  # refused before any task runs: the preflight
    assert result.stderr.splitlines()[0].endswith(
        "$.llm.models.m.api_key_env: model 'm': its API key variable TEST_LLM_KEY is not set here "
        "(task 'solo' uses it)")
    assert not (tmp_path / "runs" / "agents").exists()


def test_timeouts_are_retried_then_reported(tmp_path: Path) -> None:
    script = [Delay(3, Reply("late")), Delay(3, Reply("late"))]
    with ScriptedLLM(script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT, timeout=0.5, retries=1)))
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    assert ledger(run_dir) == []  # both cut at the model's timeout: possibly billed, not answered
    assert [i["call"] for i in intents(run_dir) if not i["paired"]] == [1, 2]
    reason = read_run(run_dir)["tasks"]["solo"]["reason"]
    assert reason == f"LLM endpoint {srv.base_url} did not answer within 0.5 s, 2 attempts (model 'test-model')"


TWO_AGENTS = """\
  - id: first
    kind: agent
    instructions: "FIRST: go"
  - id: second
    kind: agent
    instructions: "SECOND: go"
    depends_on: [first]
  - id: after
    kind: shell
    run: "true"
    depends_on: [second]
"""


def test_a_spent_job_budget_starts_no_new_llm_work(tmp_path: Path) -> None:
    # the first call costs $0.01, the budget is $0.005: the second agent task never starts
    with ScriptedLLM([Reply("ok", usage=usage(5000, 0))]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, TWO_AGENTS, budget="  budget_usd: 0.005\n")))
        assert len(srv.completions) == 1
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    assert states(run_dir) == {"first": "succeeded", "second": "budget_exceeded", "after": "upstream_failed"}
    manifest = read_run(run_dir)
    assert manifest["tasks"]["second"]["reason"] == (
        "not started: the job's LLM budget is spent: $0.01 of job.budget_usd $0.005")
    assert manifest["tasks"]["after"]["reason"] == "upstream task 'second' stopped: LLM budget spent"
    status = run(tmp_path, "status", str(run_dir)).stdout
    assert "  second  budget_exceeded" in status
    assert "      not started: the job's LLM budget is spent" in status
    assert "LLM cost: $0.01 over 1 model calls, 200.0% of job.budget_usd $0.005 (ledger: " in status


def test_a_running_agent_stops_at_its_next_call_when_its_task_budget_is_spent(tmp_path: Path) -> None:
    tasks = ONE_AGENT.replace("    outputs: [summary.md]\n", "    code_execution: true\n    budget_usd: 0.001\n")
    script = [Reply(None, tool_calls=[tool_call(1, "run_shell", command="echo hi")], usage=usage(1000, 0)),
              Reply("never sent")]
    with ScriptedLLM(script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks)))
        assert len(srv.completions) == 1
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    assert states(run_dir) == {"solo": "budget_exceeded"}
    reason = read_run(run_dir)["tasks"]["solo"]["reason"]
    assert reason == "stopped before model call 2: the task's LLM budget is spent: $0.002 of budget_usd $0.001"
    assert len(ledger(run_dir)) == 1
    assert "run_shell" in (work_dir(run_dir, "solo") / "chats/transcript.jsonl").read_text()


def test_kill_9_mid_job_keeps_completed_calls_and_a_rerun_completes_the_chain(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    answered: list[str] = []

    def script(body: Any) -> Any:
        task = who(body)
        if task == "FIRST" and "FIRST" not in answered:
            answered.append(task)
            return Reply("first done", usage=usage(100, 10))
        if task == "SECOND" and len(answered) == 1:
            answered.append("hang")
            return Delay(60, Reply("too late"))
        return Reply("done", usage=usage(200, 20))

    with ScriptedLLM(script) as srv:
        path = spec(tmp_path, srv.base_url, TWO_AGENTS)
        monkeypatch.setenv("TEST_LLM_KEY", KEY)
        runner = Runner(tmp_path, str(path))
        try:
            wait_until("the second agent's call is in flight", lambda: answered == ["FIRST", "hang"], runner)
            os.killpg(runner.proc.pid, signal.SIGKILL)
            runner.proc.wait(10)
        finally:
            runner.kill()
        run_dir = tmp_path / "runs" / "agents"
        kept = journal_entries(run_dir)
        assert [(e["task"], e["status"]) for e in kept][:1] == [("first", "ok")]
        result = run(tmp_path, "run", str(path))
    assert result.returncode == 0, result.stderr
    entries = ledger(run_dir)
    # The watchdog ends the killed run's agent at once (SIGTERM), and the agent records its call in flight
    # as an error as it goes; had it noticed its runner's death first, there is no such entry.
    calls = [(e["task"], e["status"]) for e in entries]
    assert calls in ([("first", "ok"), ("second", "ok")], [("first", "ok"), ("second", "error"), ("second", "ok")])
    assert entries[0]["id"] == kept[0]["id"]  # the call made before the kill, kept once
    assert run(tmp_path, "ledger", "verify", str(run_dir / "ledger.jsonl")).returncode == 0


def test_reruns_append_to_the_same_chain(tmp_path: Path) -> None:
    with ScriptedLLM(lambda body: Reply("ok", usage=usage(10, 1))) as srv:
        path = spec(tmp_path, srv.base_url, ONE_AGENT)
        assert run(tmp_path, "run", str(path)).returncode == 0
        first = ledger(tmp_path / "runs" / "agents")
        assert run(tmp_path, "run", str(path), "--only", "solo").returncode == 0  # up to date: no call
        assert ledger(tmp_path / "runs" / "agents") == first
        path.write_text(path.read_text().replace("SOLO: summarise", "SOLO: summarise again"))
        assert run(tmp_path, "run", str(path)).returncode == 0
    entries = ledger(tmp_path / "runs" / "agents")
    assert entries[: len(first)] == first and len(entries) == len(first) + 1
    assert entries[-1]["prev"] == first[-1]["hash"] and entries[-1]["run_id"] != first[-1]["run_id"]


def test_a_rerun_publishes_the_new_answer_not_the_old_one(tmp_path: Path) -> None:
    answers = iter(["FIRST ANSWER", "SECOND ANSWER"])
    with ScriptedLLM(lambda body: Reply(next(answers), usage=usage(10, 1))) as srv:
        path = spec(tmp_path, srv.base_url, ONE_AGENT)
        assert run(tmp_path, "run", str(path)).returncode == 0
        path.write_text(path.read_text().replace("SOLO: summarise", "SOLO: summarise again"))
        assert run(tmp_path, "run", str(path)).returncode == 0
    assert (published(tmp_path / "runs" / "agents", "solo") / "summary.md").read_text() == "SECOND ANSWER"


def test_the_cmb_example_runs_end_to_end_against_an_endpoint(tmp_path: Path) -> None:
    """configs/cmb-agents.yaml, pointed at the scripted endpoint: code agents write their declared files."""
    import re

    def scientist(body: Any) -> Reply:
        system = next((str(m["content"]) for m in body["messages"] if m["role"] == "system"), "")
        if "response_format" in body:  # the dependency analysis
            return Reply({"edges": []}, usage=usage(800, 20))
        wanted = re.search(r"Write these files in that directory: (.*)", system)
        if wanted and not tool_results(body):
            code = "".join(f"open({name.strip()!r}, 'w').write('result')\n" for name in wanted.group(1).split(","))
            return Reply(None, tool_calls=[tool_call(1, "run_python", code=code)], usage=usage(900, 120))
        return Reply("Final answer.", usage=usage(1200, 80))

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "cmb-agents.yaml").read_text()
    with ScriptedLLM(scientist) as srv:
        text = re.sub(r"(\n      model: [^\n]+\n)", rf"\1      base_url: {srv.base_url}\n", text)
        text = re.sub(r"\n      base_url: https://api.openai.com/v1", "", text).replace("OPENAI_API_KEY", "TEST_LLM_KEY")
        path = tmp_path / "cmb-agents.yaml"
        path.write_text(text)
        result = run(tmp_path, "run", str(path))
        assert srv.failures == []
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "cmb-agents"
    assert set(states(run_dir).values()) == {"succeeded"}
    assert (published(run_dir, "report") / "report.md").read_text() == "Final answer."
    assert (published(run_dir, "camb-spectra") / "spectra.npz").read_text() == "result"
    entries = ledger(run_dir)
    assert {e["source"] for e in entries} == {"agent", "analysis"}
    manifest = read_run(run_dir)
    assert manifest["ledger"]["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in entries))


def test_a_call_cut_by_the_task_timeout_is_possibly_billed_in_the_ledger(tmp_path: Path) -> None:
    tasks = ONE_AGENT + "    timeout: 2\n"
    with ScriptedLLM([Delay(30, Reply("late"))]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks, timeout=60)))
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    assert ledger(run_dir) == []  # no answer came: the call is possibly billed, with its prompt's size
    [cut] = [i for i in intents(run_dir) if not i["paired"]]
    assert (cut["task"], cut["attempt"], cut["source"]) == ("solo", 1, "agent") and cut["prompt_chars"] > 0
    assert "possibly billed" in result.stderr
    assert read_run(run_dir)["tasks"]["solo"]["reason"].startswith(
        "timed out after 2 s (process group killed) (agent process; see ")


def test_plan_puts_its_analysis_calls_in_the_ledger(tmp_path: Path) -> None:
    tasks = ONE_AGENT + "  - {id: other, kind: shell, run: 'true'}\n"
    extra = "analysis:\n  sources: [explicit, files, llm]\n  model: m\n"
    with ScriptedLLM([HttpError(500, retry_after=0), Reply({"edges": []}, usage=usage(300, 5))]) as srv:
        path = spec(tmp_path, srv.base_url, tasks)
        path.write_text(path.read_text().replace("tasks:\n", extra + "tasks:\n"))
        result = run(tmp_path, "plan", str(path))
    assert result.returncode == 0, result.stderr
    entries = ledger(tmp_path / "runs" / "agents")
    assert [(e["source"], e["agent"], e["task"], e["call"], e["status"]) for e in entries] == [
        ("analysis", "dependency-analysis", None, 1, "error"), ("analysis", "dependency-analysis", None, 2, "ok")]
    assert entries[1]["cost_usd"] == pytest.approx(cost(300, 5))


def test_agent_code_never_sees_the_api_key(tmp_path: Path) -> None:
    tasks = ONE_AGENT.replace("    outputs: [summary.md]\n", "    code_execution: true\n")
    script = [Reply(None, tool_calls=[tool_call(1, "run_shell", command="echo K=$TEST_LLM_KEY; env")],
                    usage=usage(10, 1)), Reply("done", usage=usage(10, 1))]
    with ScriptedLLM(script) as srv:
        assert run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks))).returncode == 0
        [sent_back] = [r for b in srv.completions for r in tool_results(b)]
    assert "K=\n" in sent_back and "TEST_LLM_KEY" not in sent_back and "HOME=" in sent_back
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert KEY.encode() not in path.read_bytes(), path


def test_inconsistent_usage_is_capped_and_still_ledgered(tmp_path: Path) -> None:
    odd = usage(100, 10)
    odd["prompt_tokens_details"] = {"cached_tokens": 500}
    odd["completion_tokens_details"] = {"reasoning_tokens": 50}
    with ScriptedLLM([Reply("ok", usage=odd)]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT)))
    assert result.returncode == 0, result.stderr
    [entry] = ledger(tmp_path / "runs" / "agents")
    assert (entry["prompt_tokens"], entry["cached_prompt_tokens"], entry["reasoning_tokens"]) == (100, 100, 10)
    log = (tmp_path / "runs/agents/gateway/rank-0000.log").read_text()  # the gateway ledgers the calls
    assert "the ledger caps the parts at their totals" in log


def test_an_unreadable_answer_is_ledgered_and_fails_clearly(tmp_path: Path) -> None:
    with ScriptedLLM([Raw("<html>bad gateway</html>")]) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, ONE_AGENT)))
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    [entry] = ledger(run_dir)
    assert entry["status"] == "error" and entry["error"].startswith("unreadable answer: ")
    reason = read_run(run_dir)["tasks"]["solo"]["reason"]
    assert reason.startswith(f"LLM endpoint {srv.base_url} sent an answer that could not be read for model "
                             "'test-model': ")
    assert "Traceback" not in result.stderr


def test_max_turns_stops_an_agent_that_never_finishes(tmp_path: Path) -> None:
    tasks = ONE_AGENT.replace("    outputs: [summary.md]\n", "    code_execution: true\n    max_turns: 2\n")

    def forever(body: Any) -> Reply:
        return Reply(None, tool_calls=[tool_call(len(body["messages"]), "run_shell", command="true")],
                     usage=usage(10, 1))

    with ScriptedLLM(forever) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks)))
        assert len(srv.completions) == 2
    assert result.returncode == 1
    run_dir = tmp_path / "runs" / "agents"
    assert read_run(run_dir)["tasks"]["solo"]["reason"] == (
        "the agent did not finish within max_turns=2 model turns")
    assert len(ledger(run_dir)) == 2
    transcript = (work_dir(run_dir, "solo") / "chats/transcript.jsonl").read_text()
    assert transcript.count("run_shell") >= 2  # kept although the attempt failed


def test_glob_outputs_made_by_code_are_published_and_background_code_does_not_outlive_its_tool(
        tmp_path: Path) -> None:
    import psutil

    tasks = ONE_AGENT.replace("    outputs: [summary.md]\n", "    code_execution: true\n    outputs: ['plots/*.txt']\n")
    command = "mkdir -p plots && echo a > plots/a.txt && echo b > plots/b.txt && (sleep 987654 &) && echo started"
    script = [Reply(None, tool_calls=[tool_call(1, "run_shell", command=command)], usage=usage(10, 1)),
              Reply("done", usage=usage(10, 1))]
    with ScriptedLLM(script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks)))
        [sent_back] = [r for b in srv.completions for r in tool_results(b)]
    assert result.returncode == 0, result.stderr
    assert sent_back == "exit code 0\nstarted\n"
    plots = published(tmp_path / "runs" / "agents", "solo") / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["a.txt", "b.txt"]
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "987654"]]


def test_an_agent_without_code_execution_is_given_its_inputs(tmp_path: Path) -> None:
    tasks = """\
  - id: notes
    kind: shell
    run: echo "A_L = 1.18 +- 0.07" > notes.txt
    outputs: [notes.txt]
  - id: report
    kind: agent
    instructions: "REPORT: write it"
    inputs: [notes.txt]
    outputs: [report.md]
"""
    with ScriptedLLM([Reply("report", usage=usage(10, 1))]) as srv:
        assert run(tmp_path, "run", str(spec(tmp_path, srv.base_url, tasks))).returncode == 0
        [body] = srv.completions
    system = next(m["content"] for m in body["messages"] if m["role"] == "system")
    assert "Input file notes.txt:\n<<<\nA_L = 1.18 +- 0.07\n\n>>>" in system


def test_without_landlock_code_execution_fails_before_any_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmbagent_batch.tasks.agent import launch as agent
    from cmbagent_batch.tasks.agent import sandbox

    monkeypatch.setattr(sandbox, "landlock_status", lambda: (0, "landlock system calls are not implemented"))
    assert agent._cannot_run({"code_execution": True}) == (
        "code execution needs Linux Landlock (kernel 5.13 or newer with landlock enabled) to confine agent "
        "code to codebase/; this kernel reports: landlock system calls are not implemented")
    assert agent._cannot_run({"code_execution": False}) is None
