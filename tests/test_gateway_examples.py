"""The examples that call models from a task's own code, run as users run them: ``configs/llm-shell.yaml``
against the scripted endpoint, and ``configs/cmbagent-oneshot.yaml`` (CMBAgent's one-shot mode, from the
interpreter ``ONESHOT_PYTHON`` names) on the local model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env, cli
from tests.helpers.metering import KEY, ledger, served, tokens, usage
from tests.helpers.runs import read_run
from tests.helpers.scripted_llm import Reply, ScriptedLLM

pytest.importorskip("openai", reason="the examples use the openai client (the 'agents' extra)")

pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parent.parent


def test_the_shell_example_s_ledger_matches_the_endpoint_and_no_task_sees_the_key(tmp_path: Path) -> None:
    example = (ROOT / "configs/llm-shell.yaml").read_text()
    assert "base_url: https://api.openai.com/v1" in example
    with ScriptedLLM(lambda body: Reply("The CMB says a lot.", usage=usage(40 + len(str(body)) % 7, 9))) as srv:
        (tmp_path / "llm-shell.yaml").write_text(example.replace("https://api.openai.com/v1", srv.base_url))
        env = clean_env(tmp_path, OPENAI_API_KEY=KEY)
        result = cli(tmp_path, "run", "llm-shell.yaml", env=env, timeout=180)
        assert result.returncode == 0, result.stderr
        run_dir = tmp_path / "runs/llm-shell"
        entries = ledger(run_dir)
        assert tokens(entries) == served(srv) and len(entries) == 3
        assert {r.api_key for r in srv.requests} == {KEY}
    assert sorted(e["task"] for e in entries) == ["ask-isw", "ask-lensing", "ask-reionization"]
    answers = sorted(p.read_text() for p in (run_dir / "outputs").rglob("answer.md"))
    assert answers == ["The CMB says a lot."] * 3
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    summary = cli(tmp_path, "ledger", "summarize", str(run_dir), "--by", "task", check=True).stdout
    assert all(f"ask-{t}" in summary for t in ("isw", "lensing", "reionization"))
    assert cli(tmp_path, "ledger", "verify", str(run_dir)).returncode == 0


def test_cmbagent_one_shot_on_the_local_model_ends_cleanly_with_its_calls_in_the_ledger(tmp_path: Path) -> None:
    python = os.environ.get("ONESHOT_PYTHON")
    if not python:
        pytest.skip("ONESHOT_PYTHON names no interpreter with cmbagent installed (.ci/run makes one)")
    pytest.importorskip("llama_cpp", reason="the example's model runs here: the 'local' extra")
    spec = (ROOT / "configs/cmbagent-oneshot.yaml").read_text()
    first = spec.index("        - topic: sachs-wolfe")  # one question of the three: a toy model is slow
    (tmp_path / "oneshot.yaml").write_text(spec[:first])
    (tmp_path / "cmbagent_oneshot.py").write_text((ROOT / "configs/cmbagent_oneshot.py").read_text())
    env = clean_env(tmp_path, ONESHOT_PYTHON=python, ONESHOT_MAX_ROUNDS="3")
    result = cli(tmp_path, "run", "oneshot.yaml", env=env, timeout=900)
    run_dir = tmp_path / "runs/cmbagent-oneshot"
    task = read_run(run_dir)["tasks"]["oneshot-tcmb"]
    assert task["state"] in ("succeeded", "failed"), task
    log = next(run_dir.rglob("oneshot-tcmb/logs/stderr.log")).read_text()
    if task["state"] == "failed":  # cleanly: the script says why, the runner has no traceback
        assert "cmbagent_oneshot: " in log or task.get("timed_out"), log[-3000:]
    assert "Traceback" not in result.stderr
    entries = ledger(run_dir)
    assert entries and {(e["task"], e["source"], e["model"]) for e in entries} == {("oneshot-tcmb", "task", "mini")}
    summary = cli(tmp_path, "ledger", "summarize", str(run_dir), "--by", "task", check=True).stdout
    assert "oneshot-tcmb" in summary
    print(summary)
