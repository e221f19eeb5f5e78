"""``plan --estimate``: the pure estimate, checked by hand, and the command (which makes no LLM call). What it
says of the dependency analysis is one thing: not used, cached, or one call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmbagent_batch.plan.estimate import REPLY_TOKENS, SYSTEM_TOKENS, TOOL_OUTPUT_TOKENS, Analysis, estimate
from cmbagent_batch.spec import load_spec
from tests.helpers.cli import clean_env, cli
from tests.helpers.scripted_llm import Reply, ScriptedLLM

SPEC = """\
version: 1
job: {name: est, budget_usd: 0.01}
execution: {retries: 1}
llm:
  default_model: m
  models:
    m: {model: x, base_url: "http://127.0.0.1:9/v1", price: {prompt_per_1m: 1.0, completion_per_1m: 2.0}}
tasks:
  - {id: a, kind: agent, instructions: "%s", max_turns: 3, code_execution: true}
  - {id: s, kind: shell, run: "true"}
""" % ("x" * 400)
SHELL_ONLY = """\
version: 1
job: {name: plain}
tasks:
  - {id: make, kind: shell, run: "echo 1 > a.txt", outputs: [a.txt]}
  - {id: use, kind: shell, run: "cat a.txt", inputs: [a.txt]}
"""
KEY_ENV = "ESTIMATE_TEST_KEY"
ASSUMPTIONS = (
    "Assumptions:\n"
    "  - tokens = characters / 4; an agent's system prompt adds 150 tokens\n"
    "  - each turn replies 400 completion tokens; each code execution adds 600 tokens of output to the context\n"
    "  - low: one turn per agent task, no retry; high: max_turns turns, every attempt of the task's retries used; "
    "the context grows turn by turn\n"
    "  - no prompt caching (cached prompt tokens cost less: the real cost can only be lower on that count)\n"
)
NOT_CACHED = "  - dependency analysis not cached: one call, a reply of 15 tokens per task\n"


def estimate_of(tmp_path: Path, text: str, *args: str, **env: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    out = cli(tmp_path, "plan", str(path), "--estimate", *args, env=clean_env(tmp_path, **env), timeout=60)
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    return out.stdout


def test_the_estimate_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC)
    est = estimate(load_spec(str(path)), Analysis.NOT_USED)
    base = SYSTEM_TOKENS + 100  # 400 characters of instructions
    growth = REPLY_TOKENS + TOOL_OUTPUT_TOKENS

    def call(prompt: int) -> float:
        return (prompt * 1.0 + REPLY_TOKENS * 2.0) / 1e6

    [line] = est["lines"]
    assert (line["task"], line["calls_low"], line["calls_high"]) == ("a", 1, 6)  # 3 turns x 2 attempts
    assert line["low_usd"] == pytest.approx(call(base))
    assert line["high_usd"] == pytest.approx(2 * sum(call(base + k * growth) for k in range(3)))
    assert est["high_usd"] == pytest.approx(min(0.01, line["high_usd"]))
    assert (est["analysis"], est["analysis_cached"]) == ("not used", True)  # no analysis call
    assert len(est["assumptions"]) == 4  # none about an analysis call


@pytest.mark.parametrize(("analysis", "cached"), [(Analysis.NOT_USED, True), (Analysis.CACHED, True),
                                                  (Analysis.ONE_CALL, False)])
def test_analysis_cached_keeps_its_meaning_no_analysis_call(tmp_path: Path, analysis: Analysis,
                                                            cached: bool) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC)
    est = estimate(load_spec(str(path)), analysis, 1000)
    assert (est["analysis"], est["analysis_cached"]) == (analysis.value, cached)


def test_plan_estimate_makes_no_call_and_names_its_assumptions(tmp_path: Path) -> None:
    spec = SPEC.replace("tasks:", "analysis: {sources: [explicit, llm]}\ntasks:")
    out = estimate_of(tmp_path, spec)
    assert out.startswith("Cost estimate (USD, before running):\n"
                          "  task                   model            calls         low        high\n"
                          "  (dependency analysis)  m                    1   $0.000503   $0.000503\n"
                          "  a                      m                  1-6    $0.00105     $0.0123\n"
                          "  total: $0.00155 to $0.0128\n"
                          "  job.budget_usd: $0.01 (the high estimate exceeds it: tasks may end budget_exceeded)\n"
                          "Prices used (USD per 1M tokens):\n")
    assert out.endswith(ASSUMPTIONS + NOT_CACHED)
    assert "cached, no call" not in out
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was ledgered
    data = json.loads(estimate_of(tmp_path, spec, "--format", "json"))
    assert (data["analysis"], data["analysis_cached"]) == ("one call", False)


def test_a_job_without_llm_use_says_so_in_one_line(tmp_path: Path) -> None:
    assert estimate_of(tmp_path, SHELL_ONLY) == (
        "Cost estimate (USD, before running):\n"
        "  no LLM calls: this job has no agent task and no LLM dependency analysis\n")
    data = json.loads(estimate_of(tmp_path, SHELL_ONLY, "--format", "json"))
    assert (data["analysis"], data["analysis_cached"], data["lines"], data["prices"]) == ("not used", True, [], {})
    assert data["low_usd"] == data["high_usd"] == 0


def test_agent_tasks_without_llm_analysis_say_the_analysis_makes_no_call(tmp_path: Path) -> None:
    assert estimate_of(tmp_path, SPEC) == (
        "Cost estimate (USD, before running):\n"
        "  task  model            calls         low        high\n"
        "  a     m                  1-6    $0.00105     $0.0123\n"
        "  total: $0.00105 to $0.0123\n"
        "  job.budget_usd: $0.01 (the high estimate exceeds it: tasks may end budget_exceeded)\n"
        "  dependency analysis: not by LLM (analysis.sources has no llm), no call\n"
        "Prices used (USD per 1M tokens):\n"
        "  m (x, spec): prompt 1, cached prompt price, completion 2\n" + ASSUMPTIONS)


def analysed_spec(base_url: str, agent: bool) -> str:
    task = '  - {id: a, kind: agent, instructions: "fit", max_turns: 2}\n' if agent else ""
    return ("version: 1\njob: {name: cached}\nanalysis: {sources: [explicit, files, llm]}\n"
            "llm:\n  default_model: m\n  models:\n"
            f"    m: {{model: gpt-4o-mini, base_url: \"{base_url}\", api_key_env: {KEY_ENV}, max_retries: 0,\n"
            "        price: {prompt_per_1m: 0.15, completion_per_1m: 0.6}}\n"
            "tasks:\n" + SHELL_ONLY.split("tasks:\n", 1)[1] + task)


@pytest.mark.slow
@pytest.mark.parametrize("agent", [True, False])
def test_a_cached_analysis_is_said_cached_and_nothing_else(tmp_path: Path, agent: bool) -> None:
    with ScriptedLLM([Reply({"edges": []})]) as srv:
        spec = tmp_path / "job.yaml"
        spec.write_text(analysed_spec(srv.base_url, agent))
        env = clean_env(tmp_path, **{KEY_ENV: "sk-test"})
        first = cli(tmp_path, "plan", str(spec), env=env, timeout=120)
        assert first.returncode == 0, first.stderr
        out = estimate_of(tmp_path, spec.read_text(), **{KEY_ENV: "sk-test"})
        assert len(srv.requests) == 1  # the estimate asked nothing
    if not agent:
        assert out == ("Cost estimate (USD, before running):\n"
                       "  no LLM calls: this job has no agent task, and its LLM dependency analysis is cached\n")
        return
    assert "  dependency analysis: cached, no call\n" in out
    assert "(dependency analysis)" not in out and "not cached" not in out
    assert out.endswith(ASSUMPTIONS)
