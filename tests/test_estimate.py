"""``plan --estimate``: the pure estimate, checked by hand, and the command (which makes no LLM call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmbagent_batch.plan.estimate import REPLY_TOKENS, SYSTEM_TOKENS, TOOL_OUTPUT_TOKENS, estimate
from cmbagent_batch.spec import load_spec
from tests.helpers.cli import cli

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


def test_the_estimate_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC)
    est = estimate(load_spec(str(path)), None)
    base = SYSTEM_TOKENS + 100  # 400 characters of instructions
    growth = REPLY_TOKENS + TOOL_OUTPUT_TOKENS

    def call(prompt: int) -> float:
        return (prompt * 1.0 + REPLY_TOKENS * 2.0) / 1e6

    [line] = est["lines"]
    assert (line["task"], line["calls_low"], line["calls_high"]) == ("a", 1, 6)  # 3 turns x 2 attempts
    assert line["low_usd"] == pytest.approx(call(base))
    assert line["high_usd"] == pytest.approx(2 * sum(call(base + k * growth) for k in range(3)))
    assert est["high_usd"] == pytest.approx(min(0.01, line["high_usd"]))
    assert est["analysis_cached"] is True and est["assumptions"]


def test_plan_estimate_makes_no_call_and_names_its_assumptions(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC.replace("tasks:", "analysis: {sources: [explicit, llm]}\ntasks:"))
    out = cli(tmp_path, "plan", str(path), "--estimate", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(dependency analysis)" in out.stdout and "Assumptions:" in out.stdout
    assert "job.budget_usd: $0.0100 (the high estimate exceeds it" in out.stdout
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was ledgered
    js = cli(tmp_path, "plan", str(path), "--estimate", "--format", "json", timeout=60)
    assert json.loads(js.stdout)["analysis_cached"] is False
