"""``cmbagent-batch plan`` end to end: the real CLI in subprocesses, the real openai client over real HTTP
to a scripted local server, specs and caches in ``tmp_path``.

Every ``--format json`` output is validated against ``schemas/plan.schema.json``.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cmbagent_batch.plan.analysis.cache import Cache
from tests.helpers.cli import clean_env
from tests.helpers.cli import cli as run_cli
from tests.helpers.scripted_llm import HttpError, Reply, ScriptedLLM

REPO = Path(__file__).resolve().parent.parent
PLAN_SCHEMA = json.loads((REPO / "schemas" / "plan.schema.json").read_text(encoding="utf-8"))
KEY = "sk-test-plan-0123456789"
KEY_ENV = "OPENAI_API_KEY"  # what configs/cmb-agents.yaml names in api_key_env

FALLBACK_HINT = "(analysis.fallback is 'error'; set it to 'explicit' or 'sequential' to plan without LLM edges)"
SERVER_ERROR = "The server had an error while processing your request."

# The file edges of configs/cmb-agents.yaml, as the plan lists them.
CMB_FILE_EDGES = [
    {"from": "camb-spectra", "to": "likelihood", "type": "file", "source": "files",
     "reason": "'likelihood' reads 'spectra.npz', which 'camb-spectra' writes"},
    {"from": "likelihood", "to": "report", "type": "file", "source": "files",
     "reason": "'report' reads 'fit.json', which 'likelihood' writes"},
    {"from": "literature", "to": "report", "type": "file", "source": "files",
     "reason": "'report' reads 'literature.md', which 'literature' writes"},
    {"from": "plan", "to": "camb-spectra", "type": "file", "source": "files",
     "reason": "'camb-spectra' reads 'plan.md', which 'plan' writes"},
]
LLM_REASON = "The fit needs the prior on A_L that the literature summary gives."
GOOD = {"edges": [{"from": "literature", "to": "likelihood", "type": "logic", "reason": LLM_REASON}]}
LLM_EDGE = {"from": "literature", "to": "likelihood", "type": "logic", "source": "llm", "reason": LLM_REASON}
NONE: dict[str, Any] = {"edges": []}
KNOWN_HEAD = "Known dependencies (already decided; do not repeat them):\n"
ONLY_HEAD = "Only propose dependencies with at least one end among these tasks; the others are already decided: "


# -- helpers -------------------------------------------------------------------------------------------


def plan(home: Path, spec: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``plan SPEC ARGS`` with ``HOME`` at ``home``, the endpoint's key, no CMBAGENT_/OPENAI_ variables but ``env``."""
    child_env = clean_env(home, home=home, drop=("CMBAGENT_", "OPENAI_"), **{KEY_ENV: KEY, **env})
    return run_cli(home, "plan", str(spec), *args, env=child_env, timeout=900)


def valid_plan(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The plan printed by a successful ``--format json`` run, checked against the plan schema."""
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    jsonschema.Draft202012Validator(PLAN_SCHEMA).validate(data)
    return data


def plan_json(home: Path, spec: Path, *args: str, **env: str) -> dict[str, Any]:
    result = plan(home, spec, "--format", "json", *args, **env)
    assert result.stderr == ""
    return valid_plan(result)


def cmb_spec(base_url: str, *, fallback: str = "error", max_retries: int = 1, timeout: float = 5) -> dict[str, Any]:
    """configs/cmb-agents.yaml with its analysis model pointed at ``base_url``."""
    data: dict[str, Any] = yaml.safe_load((REPO / "configs" / "cmb-agents.yaml").read_text(encoding="utf-8"))
    mini = data["llm"]["models"]["mini"]
    assert mini["api_key_env"] == KEY_ENV and data["analysis"]["model"] == "mini"
    mini.update(base_url=base_url, timeout=timeout, max_retries=max_retries)
    data["analysis"]["fallback"] = fallback
    return data


def task(data: dict[str, Any], task_id: str) -> dict[str, Any]:
    (found,) = [t for t in data["tasks"] if t["id"] == task_id]
    return found


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def llm_section(base_url: str, *, max_retries: int = 1) -> dict[str, Any]:
    return {"default_model": "mini", "models": {"mini": {
        "model": "gpt-4o-mini", "base_url": base_url, "api_key_env": KEY_ENV, "timeout": 5,
        "max_retries": max_retries, "price": {"prompt_per_1m": 0.15, "completion_per_1m": 0.60}}}}


def user_message(srv: ScriptedLLM) -> str:
    return str(srv.requests[-1].body["messages"][-1]["content"])


def known_list(pairs: list[tuple[str, str]]) -> str:
    return json.dumps([{"from": a, "to": b} for a, b in pairs])


def records(cache_root: Path, kind: str) -> list[Path]:
    return sorted((cache_root / kind).glob("*/*.json"))


def corrupt_warning(path: Path) -> str:
    return f"cmbagent-batch: warning: cache record {path} is corrupt (checksum mismatch or truncated); recomputing"


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def edit(path: Path) -> None:
    """Change one byte inside the payload: still valid JSON, same length, wrong checksum."""
    raw = path.read_bytes()
    at = raw.index(b'"payload":') + len(b'"payload":')
    i = raw.index(b"e", at)  # every payload holds an "e" (in "edges", "tasks", ...)
    path.write_bytes(raw[:i] + b"E" + raw[i + 1:])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


# -- explicit and file edges ---------------------------------------------------------------------------

PIPELINE = """\
version: 1
job:
  name: pipeline
tasks:
  - id: params
    kind: shell
    run: echo '{}' > params.json
    outputs: [params.json]
  - id: sim-{seed}
    kind: shell
    run: echo {seed} > maps/sim_{seed}.fits
    inputs: [./params.json]
    outputs: ["maps/sim_{seed}.fits"]
    matrix:
      seed: [1, 2]
  - id: stack
    kind: shell
    run: cat maps/*.fits > stack.fits
    inputs: ["maps/*.fits"]
    outputs: [stack.fits]
  - id: logger
    kind: shell
    run: echo hi > logs/run.log
    outputs: ["logs/*.log"]
  - id: scan
    kind: shell
    run: cat logs/run.log
    inputs: [logs/run.log]
  - id: plot
    kind: python
    call: os:getcwd
    depends_on: [stack]
    inputs: [stack.fits]
  - id: publish
    kind: shell
    run: echo done
    depends_on: ["sim-*", plot]
"""


@pytest.mark.slow
def test_explicit_and_file_edges_with_exact_reasons(home: Path) -> None:
    spec = home / "pipeline.yaml"
    spec.write_text(PIPELINE, encoding="utf-8")
    data = plan_json(home, spec)
    assert data["edges"] == [
        {"from": "logger", "to": "scan", "type": "file", "source": "files",
         "reason": "'scan' reads 'logs/run.log', which 'logger' writes"},  # an output glob matches a path
        {"from": "params", "to": "sim-1", "type": "file", "source": "files",
         "reason": "'sim-1' reads 'params.json', which 'params' writes"},  # ./params.json normalised
        {"from": "params", "to": "sim-2", "type": "file", "source": "files",
         "reason": "'sim-2' reads 'params.json', which 'params' writes"},
        {"from": "plot", "to": "publish", "type": "order", "source": "explicit",
         "reason": "'publish' lists 'plot' in depends_on"},
        {"from": "sim-1", "to": "publish", "type": "order", "source": "explicit",
         "reason": "'publish' lists 'sim-1' in depends_on"},  # a depends_on glob, expanded
        {"from": "sim-1", "to": "stack", "type": "file", "source": "files",
         "reason": "'stack' reads 'maps/sim_1.fits', which 'sim-1' writes"},  # an input glob matches outputs
        {"from": "sim-2", "to": "publish", "type": "order", "source": "explicit",
         "reason": "'publish' lists 'sim-2' in depends_on"},
        {"from": "sim-2", "to": "stack", "type": "file", "source": "files",
         "reason": "'stack' reads 'maps/sim_2.fits', which 'sim-2' writes"},
        # stack -> plot is both explicit and a file edge: one edge, the explicit one kept
        {"from": "stack", "to": "plot", "type": "order", "source": "explicit",
         "reason": "'plot' lists 'stack' in depends_on"},
    ]
    assert data["levels"] == [["logger", "params"], ["scan", "sim-1", "sim-2"], ["stack"], ["plot"], ["publish"]]
    assert data["widths"] == [2, 3, 1, 1, 1]
    assert data["critical_path"] == {"length": 5.0, "tasks": ["params", "sim-1", "stack", "plot", "publish"]}
    assert [(t["id"], t["kind"], t["level"]) for t in data["tasks"]] == [
        ("logger", "shell", 0), ("params", "shell", 0), ("plot", "python", 3), ("publish", "shell", 4),
        ("scan", "shell", 1), ("sim-1", "shell", 1), ("sim-2", "shell", 1), ("stack", "shell", 2)]
    assert data["analysis"] == {"sources": ["explicit", "files"], "model": None, "cache": "off", "requests": 0,
                                "fallback_used": None}
    assert data["from_cache"] is False
    assert data["spec"]["path"] == str(spec)


def test_unchanged_spec_without_llm_replans_from_cache(home: Path) -> None:
    spec = home / "pipeline.yaml"
    spec.write_text(PIPELINE, encoding="utf-8")
    first = plan_json(home, spec)
    again = plan_json(home, spec)
    assert again["from_cache"] is True
    assert {**again, "from_cache": False} == first
    assert len(records(home / ".cmbagent-batch" / "cache", "plan")) == 1  # beside the spec


# -- LLM edges and the analysis cache ------------------------------------------------------------------


@pytest.mark.slow
def test_llm_edge_first_plan_asks_once_then_the_cache_answers(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        first = plan_json(home, spec)
        assert len(srv.requests) == 1
        second = plan_json(home, spec)
        text = plan(home, spec)
        assert len(srv.requests) == 1  # the reruns asked nothing
    assert srv.failures == []
    assert first["edges"] == sorted(CMB_FILE_EDGES + [LLM_EDGE], key=lambda e: (e["from"], e["to"]))
    a = first["analysis"]
    assert (a["model"], a["cache"], a["requests"], a["fallback_used"]) == ("mini", "miss", 1, None)
    assert a["cache_reason"] == "no earlier analysis of this spec with this model and prompt version"
    assert [(c["requested_model"], c["status"]) for c in a["calls"]] == [("gpt-4o-mini", "ok")]
    assert a["cost_usd"] == pytest.approx(120 * 0.15e-6 + 30 * 0.60e-6)
    # the request: every task, and the file edges as known dependencies
    user = srv.requests[0].body["messages"][-1]["content"]
    sent = json.loads(user.split("Tasks:\n", 1)[1].split("\n" + KNOWN_HEAD, 1)[0])
    assert [t["id"] for t in sent] == ["plan", "camb-spectra", "likelihood", "literature", "report"]
    assert user.endswith(KNOWN_HEAD + known_list([(e["from"], e["to"]) for e in CMB_FILE_EDGES]))
    # the rerun
    assert second["edges"] == first["edges"]
    assert second["from_cache"] is True
    b = second["analysis"]
    assert (b["cache"], b["requests"], b["calls"], b["cost_usd"]) == ("hit", 0, [], 0.0)
    assert b["cache_reason"] == "unchanged spec file; plan and analysis reused"
    assert text.returncode == 0 and text.stderr == ""
    assert ("Analysis: sources explicit, files, llm; model mini; cache hit; 0 requests\n"
            "  cache: unchanged spec file; plan and analysis reused\n") in text.stdout
    assert f"  literature -> likelihood [logic, llm]: {LLM_REASON}\n" in text.stdout


@pytest.mark.slow
def test_editing_one_task_asks_only_about_it_and_reuses_other_llm_edges(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD), Reply(NONE)]) as srv:
        data = cmb_spec(srv.base_url)
        spec = write(home / "job.yaml", data)
        plan_json(home, spec)
        task(data, "plan")["instructions"] = "Plan how to measure A_L; write the steps to plan.md.\n"
        write(spec, data)
        edited = plan_json(home, spec)
        assert len(srv.requests) == 2
        user = user_message(srv)
    a = edited["analysis"]
    assert (a["cache"], a["requests"], a["reused_edges"]) == ("partial", 1, 1)
    assert a["changed"] == ["plan (instructions changed)"]
    assert a["cache_reason"] == "1 task(s) changed since the last analysis: plan (instructions changed)"
    assert LLM_EDGE in edited["edges"]  # still valid: neither end changed
    assert user.endswith(
        KNOWN_HEAD + known_list([("camb-spectra", "likelihood"), ("likelihood", "report"), ("literature", "likelihood"),
                                 ("literature", "report"), ("plan", "camb-spectra")])
        + "\n" + ONLY_HEAD + '["plan"]')


@pytest.mark.slow
def test_a_new_task_is_reported_new_and_asked_about(home: Path) -> None:
    review = {"id": "review", "kind": "agent", "agent": "critic", "description": "Check the report.",
              "instructions": "Read report.md and list its weakest claims.", "inputs": ["report.md"]}
    with ScriptedLLM([Reply(GOOD), Reply(NONE)]) as srv:
        data = cmb_spec(srv.base_url)
        spec = write(home / "job.yaml", data)
        plan_json(home, spec)
        data["tasks"].append(review)
        write(spec, data)
        grown = plan_json(home, spec)
        assert len(srv.requests) == 2
        user = user_message(srv)
    a = grown["analysis"]
    assert (a["cache"], a["changed"], a["reused_edges"]) == ("partial", ["review (new)"], 1)
    assert a["cache_reason"] == "1 task(s) changed since the last analysis: review (new)"
    assert user.endswith(ONLY_HEAD + '["review"]')
    assert LLM_EDGE in grown["edges"]
    assert {"from": "report", "to": "review", "type": "file", "source": "files",
            "reason": "'review' reads 'report.md', which 'report' writes"} in grown["edges"]


@pytest.mark.slow
def test_a_removed_task_drops_its_llm_edges_without_a_request(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD)]) as srv:
        data = cmb_spec(srv.base_url)
        spec = write(home / "job.yaml", data)
        plan_json(home, spec)
        data["tasks"] = [t for t in data["tasks"] if t["id"] != "literature"]
        write(spec, data)  # report still reads literature.md, which nothing writes now: it is beside the spec
        (home / "literature.md").write_text("notes\n")
        shrunk = plan_json(home, spec)
        assert len(srv.requests) == 1
    a = shrunk["analysis"]
    assert (a["cache"], a["requests"], a["changed"], a["reused_edges"]) == ("partial", 0, ["literature (removed)"], 0)
    assert [e["source"] for e in shrunk["edges"]] == ["files", "files", "files"]


@pytest.mark.slow
def test_a_settings_change_reuses_the_llm_analysis(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD)]) as srv:
        data = cmb_spec(srv.base_url)
        spec = write(home / "job.yaml", data)
        plan_json(home, spec)
        data["execution"]["max_workers"] = 8  # new spec bytes, same tasks
        write(spec, data)
        replanned = plan_json(home, spec)
        assert len(srv.requests) == 1
    a = replanned["analysis"]
    assert (replanned["from_cache"], a["cache"], a["requests"]) == (False, "hit", 0)
    assert a["cache_reason"] == "same tasks, known edges, model and prompt as a cached analysis"
    assert LLM_EDGE in replanned["edges"]


@pytest.mark.slow
def test_refresh_analysis_asks_again_even_when_cached(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD), Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        plan_json(home, spec)
        refreshed = plan_json(home, spec, "--refresh-analysis")
        assert len(srv.requests) == 2
        after = plan_json(home, spec)
        assert len(srv.requests) == 2
    a = refreshed["analysis"]
    assert (refreshed["from_cache"], a["cache"], a["requests"], a["cache_reason"]) == (
        False, "miss", 1, "--refresh-analysis")
    assert "Only propose" not in srv.requests[-1].body["messages"][-1]["content"]  # every task asked about
    assert after["analysis"]["cache"] == "hit" and LLM_EDGE in after["edges"]


@pytest.mark.slow
def test_another_cache_dir_starts_cold(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD), Reply(GOOD), Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        plan_json(home, spec)
        assert len(srv.requests) == 1
        by_flag = plan_json(home, spec, "--cache-dir", str(home / "flag-cache"))
        assert len(srv.requests) == 2
        by_env = plan_json(home, spec, CMBAGENT_CACHE_DIR=str(home / "env-cache"))
        assert len(srv.requests) == 3
        again = plan_json(home, spec, "--cache-dir", str(home / "flag-cache"))
        assert len(srv.requests) == 3
    for data in (by_flag, by_env):
        assert (data["from_cache"], data["analysis"]["cache"], data["analysis"]["requests"]) == (False, "miss", 1)
    assert again["from_cache"] is True
    for root in (home / ".cmbagent-batch" / "cache", home / "flag-cache", home / "env-cache"):
        assert [len(records(root, kind)) for kind in ("plan", "llm", "llm-last")] == [1, 1, 1]


@pytest.mark.slow
def test_a_plan_from_the_cache_reports_no_stale_changes(home: Path) -> None:
    with ScriptedLLM([Reply(GOOD), Reply(NONE)]) as srv:
        data = cmb_spec(srv.base_url)
        spec = write(home / "job.yaml", data)
        plan_json(home, spec)
        task(data, "plan")["instructions"] = "Plan it.\n"
        write(spec, data)
        assert plan_json(home, spec)["analysis"]["changed"] == ["plan (instructions changed)"]
        hit = plan_json(home, spec)
        assert len(srv.requests) == 2
    assert hit["analysis"]["cache"] == "hit"
    assert hit["analysis"].get("changed", []) == []


@pytest.mark.slow
def test_removing_a_known_edge_asks_about_its_tasks_again(home: Path) -> None:
    with ScriptedLLM([Reply(NONE), Reply(NONE)]) as srv:
        data = cmb_spec(srv.base_url)
        task(data, "literature")["depends_on"] = ["plan"]
        spec = write(home / "job.yaml", data)
        first = plan_json(home, spec)
        assert {"from": "plan", "to": "literature", "type": "order", "source": "explicit",
                "reason": "'literature' lists 'plan' in depends_on"} in first["edges"]
        del task(data, "literature")["depends_on"]
        write(spec, data)
        second = plan_json(home, spec)
        # a cold analysis of this spec asks about plan -> literature; a warm one must too
        assert len(srv.requests) == 2
        last_line = user_message(srv).rsplit("\n", 1)[-1]
    assert second["analysis"]["cache"] in ("partial", "miss")
    assert second["analysis"]["requests"] == 1
    assert not last_line.startswith(ONLY_HEAD) or '"literature"' in last_line


# -- failures and fallbacks ----------------------------------------------------------------------------


@pytest.mark.slow
def test_server_errors_with_fallback_error_exit_1_with_the_status_and_the_hint(home: Path) -> None:
    with ScriptedLLM([HttpError(500), HttpError(503)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url, fallback="error", max_retries=1))
        result = plan(home, spec, "--format", "json")
        assert len(srv.requests) == 2  # max_retries: 1
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"cmbagent-batch: error: LLM endpoint {srv.base_url} failed for model 'gpt-4o-mini' after 2 attempts; "
        f"last error: 503 {SERVER_ERROR}\n{FALLBACK_HINT}\n")
    assert not (home / ".cmbagent-batch" / "cache" / "llm").exists()


@pytest.mark.slow
def test_401_is_not_retried(home: Path) -> None:
    with ScriptedLLM([HttpError(401)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url, fallback="error", max_retries=3))
        result = plan(home, spec)
        assert len(srv.requests) == 1
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"cmbagent-batch: error: LLM endpoint {srv.base_url} rejected the API key (401) for model 'gpt-4o-mini'; "
        f"check ${KEY_ENV}\n{FALLBACK_HINT}\n")


@pytest.mark.slow
def test_fallback_explicit_keeps_other_edges_warns_and_is_not_cached(home: Path) -> None:
    with ScriptedLLM([HttpError(401), Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url, fallback="explicit"))
        result = plan(home, spec, "--format", "json")
        reason = (f"LLM endpoint {srv.base_url} rejected the API key (401) for model 'gpt-4o-mini'; "
                  f"check ${KEY_ENV}")
        assert result.stderr == ("cmbagent-batch: warning: LLM dependency analysis failed; using only the other "
                                 f"sources' edges (analysis.fallback: explicit): {reason}\n")
        failed = valid_plan(result)
        assert len(srv.requests) == 1
        retried = plan_json(home, spec)  # the failure was not cached: the next plan asks again
        assert len(srv.requests) == 2
    assert failed["edges"] == CMB_FILE_EDGES
    a = failed["analysis"]
    assert (a["fallback_used"], a["fallback_reason"], a["requests"]) == ("explicit", reason, 1)
    assert [c["status"] for c in a["calls"]] == ["error"]
    b = retried["analysis"]
    assert (retried["from_cache"], b["fallback_used"], b["cache"]) == (False, None, "miss")
    assert LLM_EDGE in retried["edges"]


@pytest.mark.slow
def test_fallback_explicit_text_output_says_so(home: Path) -> None:
    with ScriptedLLM([HttpError(401)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url, fallback="explicit"))
        result = plan(home, spec)
    assert result.returncode == 0
    assert (f"  WARNING: LLM analysis failed, fallback 'explicit' used: LLM endpoint {srv.base_url} rejected the "
            f"API key (401) for model 'gpt-4o-mini'; check ${KEY_ENV}\n") in result.stdout


SEQUENTIAL = {
    "version": 1,
    "job": {"name": "seq"},
    "analysis": {"sources": ["explicit", "files", "llm"], "fallback": "sequential"},
    "tasks": [
        {"id": "zeta", "kind": "shell", "run": "echo z"},
        {"id": "alpha", "kind": "shell", "run": "echo a"},
        {"id": "mid", "kind": "shell", "run": "echo m"},
    ],
}
FALLBACK_REASON = "analysis.fallback is 'sequential' and LLM analysis failed"


@pytest.mark.parametrize(("depends", "chain", "explicit"), [
    pytest.param({}, ["zeta", "alpha", "mid"], [], id="file-order"),
    # zeta must wait for mid: file order, moved only as far as the edge requires
    pytest.param({"zeta": ["mid"]}, ["alpha", "mid", "zeta"], [("mid", "zeta")], id="known-edge"),
])
@pytest.mark.slow
def test_fallback_sequential_chains_tasks_in_file_order(home: Path, depends: dict[str, list[str]],
                                                        chain: list[str], explicit: list[tuple[str, str]]) -> None:
    with ScriptedLLM([HttpError(401)]) as srv:
        data = copy.deepcopy(SEQUENTIAL)
        data["llm"] = llm_section(srv.base_url)
        for tid, deps in depends.items():
            task(data, tid)["depends_on"] = deps
        spec = write(home / "seq.yaml", data)
        result = plan(home, spec, "--format", "json")
        assert len(srv.requests) == 1
    assert result.stderr == (
        "cmbagent-batch: warning: LLM dependency analysis failed; running tasks one after another "
        f"(analysis.fallback: sequential): LLM endpoint {srv.base_url} rejected the API key (401) for model "
        f"'gpt-4o-mini'; check ${KEY_ENV}\n")
    out = valid_plan(result)
    expected = []
    for a, b in zip(chain, chain[1:]):
        if (a, b) in explicit:
            expected.append({"from": a, "to": b, "type": "order", "source": "explicit",
                             "reason": f"{b!r} lists {a!r} in depends_on"})
        else:
            expected.append({"from": a, "to": b, "type": "order", "source": "fallback", "reason": FALLBACK_REASON})
    assert out["edges"] == sorted(expected, key=lambda e: (e["from"], e["to"]))
    assert out["levels"] == [[tid] for tid in chain]
    assert out["analysis"]["fallback_used"] == "sequential"


@pytest.mark.slow
def test_unreachable_endpoint_with_fallback_explicit(home: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    spec = write(home / "job.yaml", cmb_spec(url, fallback="explicit", max_retries=1))
    result = plan(home, spec, "--format", "json")
    # the OS words the cause (e.g. "[Errno 111] Connection refused"); ours is everything before it
    assert result.stderr.startswith(
        "cmbagent-batch: warning: LLM dependency analysis failed; using only the other sources' edges "
        f"(analysis.fallback: explicit): LLM endpoint {url} could not be reached for model 'gpt-4o-mini' "
        "after 2 attempts: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    data = valid_plan(result)
    assert data["edges"] == CMB_FILE_EDGES
    assert data["analysis"]["fallback_used"] == "explicit"
    assert [c["status"] for c in data["analysis"]["calls"]] == ["error", "error"]
    assert not (home / ".cmbagent-batch" / "cache" / "plan").exists()


# -- cache corruption and concurrency ------------------------------------------------------------------


@pytest.mark.slow
def test_a_truncated_plan_record_is_reported_and_recomputed(home: Path) -> None:
    cache = home / ".cmbagent-batch" / "cache"
    with ScriptedLLM([Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        first = plan_json(home, spec)
        (record,) = records(cache, "plan")
        truncate(record)
        result = plan(home, spec, "--format", "json")
        assert result.stderr == corrupt_warning(record) + "\n"
        recomputed = valid_plan(result)
        clean = plan_json(home, spec)  # the record was written again, whole
        assert len(srv.requests) == 1  # the LLM analysis came from its own record
    assert recomputed["edges"] == first["edges"]
    assert (recomputed["from_cache"], recomputed["analysis"]["cache"]) == (False, "hit")
    assert clean["from_cache"] is True and clean["edges"] == first["edges"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, edit], ids=["truncate", "edit"])
def test_corrupt_plan_and_llm_records_are_reported_and_recomputed(home: Path, damage: Any) -> None:
    cache = home / ".cmbagent-batch" / "cache"
    with ScriptedLLM([Reply(GOOD), Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        first = plan_json(home, spec)
        damaged = [*records(cache, "plan"), *records(cache, "llm"), *records(cache, "llm-last")]
        assert len(damaged) == 3
        for path in damaged:
            damage(path)
        result = plan(home, spec, "--format", "json")
        assert result.stderr == "".join(corrupt_warning(p) + "\n" for p in damaged)
        recomputed = valid_plan(result)
        assert len(srv.requests) == 2  # nothing trustworthy was left: asked again
        clean = plan(home, spec, "--format", "json")
        assert clean.stderr == ""
        assert len(srv.requests) == 2
    assert recomputed["edges"] == first["edges"]
    assert (recomputed["analysis"]["cache"], recomputed["analysis"]["requests"]) == ("miss", 1)
    assert valid_plan(clean)["from_cache"] is True


@pytest.mark.slow
def test_a_lost_llm_record_is_rebuilt_from_the_last_analysis_without_a_request(home: Path) -> None:
    cache = home / ".cmbagent-batch" / "cache"
    with ScriptedLLM([Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        first = plan_json(home, spec)
        damaged = [*records(cache, "plan"), *records(cache, "llm")]
        for path in damaged:
            edit(path)
        result = plan(home, spec, "--format", "json")
        assert len(srv.requests) == 1
    assert result.stderr == "".join(corrupt_warning(p) + "\n" for p in damaged)
    recomputed = valid_plan(result)
    assert recomputed["edges"] == first["edges"]
    assert recomputed["analysis"]["requests"] == 0


@pytest.mark.slow
def test_a_lost_llm_record_is_explained_in_words(home: Path) -> None:
    cache = home / ".cmbagent-batch" / "cache"
    with ScriptedLLM([Reply(GOOD)]) as srv:
        spec = write(home / "job.yaml", cmb_spec(srv.base_url))
        plan_json(home, spec)
        for path in [*records(cache, "plan"), *records(cache, "llm")]:
            edit(path)
        result = plan(home, spec, "--format", "json")
    reason = valid_plan(result)["analysis"]["cache_reason"]
    assert not reason.endswith(": ") and "0 task(s)" not in reason


def _put_many(root: str, key: str, writer: str, count: int, start: Any) -> None:
    """One of two processes writing the same key over and over."""
    cache = Cache(root, warn=lambda message: None)
    start.wait()
    for i in range(count):
        cache.put("llm", key, {"writer": writer, "i": i, "pad": writer * 20_000})


@pytest.mark.slow
def test_two_processes_writing_one_key_never_leave_an_unreadable_record(tmp_path: Path) -> None:
    root = str(tmp_path / "cache")
    key = "ab" + "0" * 62
    warnings: list[str] = []
    cache = Cache(root, warn=warnings.append)
    cache.put("llm", key, {"writer": "seed", "i": -1, "pad": ""})
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    count = 300
    writers = [ctx.Process(target=_put_many, args=(root, key, w, count, start)) for w in ("a", "b")]
    for p in writers:
        p.start()
    start.set()
    reads = 0
    while any(p.is_alive() for p in writers):
        record = cache.get("llm", key)
        assert warnings == []
        assert record is not None and record["writer"] in ("seed", "a", "b")
        assert record["pad"] == ("" if record["writer"] == "seed" else record["writer"] * 20_000)
        reads += 1
    for p in writers:
        p.join()
        assert p.exitcode == 0
    final = cache.get("llm", key)
    assert warnings == []
    assert final is not None and final["writer"] in ("a", "b") and final["i"] == count - 1
    assert final["pad"] == final["writer"] * 20_000
    assert os.listdir(os.path.dirname(cache.path("llm", key))) == [f"{key}.json"]  # no temporary file left
    assert reads > 0


def test_an_unusable_cache_dir_is_not_an_internal_error(home: Path) -> None:
    spec = home / "toy.yaml"
    spec.write_text(WEIGHTED, encoding="utf-8")
    result = plan(home, spec, "--cache-dir", str(spec / "cache"))  # below a file: cannot be created
    assert result.returncode in (0, 2), result.stderr
    assert "internal error" not in result.stderr


# -- cycles --------------------------------------------------------------------------------------------

CYCLE = """\
version: 1
job:
  name: loop
tasks:
  - id: a
    kind: shell
    run: cat y > x
    inputs: [y]
    outputs: [x]
  - id: b
    kind: shell
    run: cat x > y
    inputs: [x]
    outputs: [y]
"""
CYCLE_MESSAGE = (
    "cmbagent-batch: error: the dependency edges make a cycle (-> reads 'runs before'):\n"
    "  a -> b: 'b' reads 'x', which 'a' writes [files]\n"
    "  b -> a: 'a' reads 'y', which 'b' writes [files]\n")


def test_a_cycle_of_file_edges_exits_2_spelling_the_cycle(home: Path) -> None:
    spec = home / "loop.yaml"
    spec.write_text(CYCLE, encoding="utf-8")
    result = plan(home, spec)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", CYCLE_MESSAGE)
    assert not (home / ".cmbagent-batch" / "cache" / "plan").exists()


def test_a_cycle_of_file_edges_is_reported_before_asking_the_model(home: Path) -> None:
    with ScriptedLLM([Reply(NONE)]) as srv:  # today's behaviour: asked, then the cycle is found
        data = yaml.safe_load(CYCLE)
        data["llm"] = llm_section(srv.base_url, max_retries=0)
        data["analysis"] = {"sources": ["explicit", "files", "llm"]}
        spec = write(home / "loop.yaml", data)
        result = plan(home, spec)
        requests = len(srv.requests)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", CYCLE_MESSAGE)
    assert requests == 0


# -- output formats ------------------------------------------------------------------------------------


def three_tasks(base_url: str) -> dict[str, Any]:
    return {
        "version": 1,
        "job": {"name": "three"},
        "llm": llm_section(base_url),
        "analysis": {"sources": ["explicit", "files", "llm"], "fallback": "error"},
        "tasks": [
            {"id": "fetch", "kind": "shell", "run": "curl -o raw.dat https://example.org", "outputs": ["raw.dat"]},
            {"id": "clean", "kind": "python", "call": "pipeline:clean", "inputs": ["raw.dat"]},
            {"id": "report", "kind": "agent", "instructions": "Summarise the cleaning run and the fetch log.",
             "depends_on": ["clean"]},
        ],
    }


THREE_REPLY = {"edges": [{"from": "fetch", "to": "report", "type": "data",
                          "reason": 'The report quotes the fetch log ("raw <data>").'}]}


@pytest.mark.slow
def test_text_dot_and_mermaid_show_every_edge_with_its_source(home: Path) -> None:
    with ScriptedLLM([Reply(THREE_REPLY)]) as srv:
        spec = write(home / "three.yaml", three_tasks(srv.base_url))
        (home / "pipeline.py").write_text("def clean():\n    pass\n")  # its call must resolve
        text = plan(home, spec)
        dot = plan(home, spec, "--format", "dot")
        mermaid = plan(home, spec, "--format", "mermaid")
        assert len(srv.requests) == 1
    for result in (text, dot, mermaid):
        assert (result.returncode, result.stderr) == (0, "")
    assert text.stdout == (
        "Job three: 3 tasks, 3 edges, 3 levels\n"
        "Critical path: 3 (fetch -> clean -> report)\n"
        "Parallelism: at most 1 task at once, 1.00 on average (total work / critical path)\n"
        "Analysis: sources explicit, files, llm; model mini; cache miss; 1 request; $0.000036\n"
        "  cache: no earlier analysis of this spec with this model and prompt version\n"
        "\n"
        "Level 0 (1): fetch\n"
        "Level 1 (1): clean\n"
        "Level 2 (1): report\n"
        "\n"
        "Edges (from -> to [type, source]: reason):\n"
        "  clean -> report [order, explicit]: 'report' lists 'clean' in depends_on\n"
        "  fetch -> clean [file, files]: 'clean' reads 'raw.dat', which 'fetch' writes\n"
        '  fetch -> report [data, llm]: The report quotes the fetch log ("raw <data>").\n')
    assert dot.stdout == (
        'digraph "three" {\n'
        "  rankdir=LR;\n"
        "  node [shape=box, fontname=Helvetica];\n"
        '  "clean" [label="clean\\npython"];\n'
        '  "fetch" [label="fetch\\nshell"];\n'
        '  "report" [label="report\\nagent"];\n'
        '  "clean" -> "report" [label="order (explicit)", style=solid, color=black, '
        "tooltip=\"'report' lists 'clean' in depends_on\"];\n"
        '  "fetch" -> "clean" [label="file (files)", style=dashed, color=blue4, '
        "tooltip=\"'clean' reads 'raw.dat', which 'fetch' writes\"];\n"
        '  "fetch" -> "report" [label="data (llm)", style=bold, color=darkgreen, '
        'tooltip="The report quotes the fetch log (\\"raw <data>\\")."];\n'
        "}\n")
    assert mermaid.stdout == (
        "flowchart LR\n"
        '  t0["clean"]\n'
        '  t1["fetch"]\n'
        '  t2["report"]\n'
        '  t0 -->|"order (explicit)"| t2\n'
        '  t1 -.->|"file (files)"| t0\n'
        '  t1 ==>|"data (llm)"| t2\n')


@pytest.mark.slow
def test_dot_and_mermaid_show_fallback_edges(home: Path) -> None:
    with ScriptedLLM([HttpError(401)]) as srv:
        data = copy.deepcopy(SEQUENTIAL)
        data["llm"] = llm_section(srv.base_url)
        data["tasks"] = data["tasks"][:2]
        spec = write(home / "seq.yaml", data)
        dot = plan(home, spec, "--format", "dot")
    with ScriptedLLM([HttpError(401)]) as srv:
        data["llm"] = llm_section(srv.base_url)
        write(spec, data)
        mermaid = plan(home, spec, "--format", "mermaid")
    assert dot.returncode == 0 and mermaid.returncode == 0
    assert ('  "zeta" -> "alpha" [label="order (fallback)", style=dotted, color=red, '
            f'tooltip="{FALLBACK_REASON}"];\n') in dot.stdout
    assert '  t1 -.->|"order (fallback)"| t0\n' in mermaid.stdout


WEIGHTED = """\
version: 1
job:
  name: toy
tasks:
  - id: prep
    kind: shell
    run: echo p > params.json
    outputs: [params.json]
    estimate: 10
  - id: sim-{n}
    kind: shell
    run: echo {n} > map_{n}.txt
    inputs: [params.json]
    outputs: ["map_{n}.txt"]
    estimate: 100
    matrix:
      n: [1, 2]
  - id: notes
    kind: python
    call: os:getcwd
    estimate: 5
  - id: merge
    kind: shell
    run: cat map_*.txt > all.txt
    inputs: ["map_*.txt"]
    depends_on: [notes]
    estimate: 20
"""


def test_text_output_levels_critical_path_and_parallelism(home: Path) -> None:
    spec = home / "toy.yaml"
    spec.write_text(WEIGHTED, encoding="utf-8")
    result = plan(home, spec)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "Job toy: 5 tasks, 5 edges, 3 levels\n"
        "Critical path: 130 (prep -> sim-1 -> merge)\n"
        "Parallelism: at most 2 tasks at once, 1.81 on average (total work / critical path)\n"  # 235 / 130
        "Analysis: sources explicit, files\n"
        "\n"
        "Level 0 (2): notes, prep\n"
        "Level 1 (2): sim-1, sim-2\n"
        "Level 2 (1): merge\n"
        "\n"
        "Edges (from -> to [type, source]: reason):\n"
        "  notes -> merge [order, explicit]: 'merge' lists 'notes' in depends_on\n"
        "  prep -> sim-1 [file, files]: 'sim-1' reads 'params.json', which 'prep' writes\n"
        "  prep -> sim-2 [file, files]: 'sim-2' reads 'params.json', which 'prep' writes\n"
        "  sim-1 -> merge [file, files]: 'merge' reads 'map_1.txt', which 'sim-1' writes\n"
        "  sim-2 -> merge [file, files]: 'merge' reads 'map_2.txt', which 'sim-2' writes\n")
    cached = plan(home, spec)
    assert cached.stdout == result.stdout  # the cached plan prints the same


# -- scale (no timing: speed is measured in bench/) ----------------------------------------------------


@pytest.mark.slow
def test_a_chain_of_100000_tasks_plans(home: Path) -> None:
    n = 100_000
    lines = ["version: 1", "job:", "  name: chain", "tasks:", "  - id: t000000", "    kind: shell", "    run: 'true'"]
    for i in range(1, n):
        lines += [f"  - id: t{i:06d}", "    kind: shell", "    run: 'true'", f"    depends_on: [t{i - 1:06d}]"]
    spec = home / "chain.yaml"
    spec.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = plan_json(home, spec)
    assert (len(data["tasks"]), len(data["edges"]), len(data["levels"])) == (n, n - 1, n)
    assert data["critical_path"]["length"] == n
    cp = data["critical_path"]["tasks"]
    assert (len(cp), cp[0], cp[-1]) == (n, "t000000", "t099999")
    assert data["parallelism"] == {"max_width": 1, "average": 1.0}


@pytest.mark.slow
def test_a_matrix_of_100000_tasks_plans(home: Path) -> None:
    a = ", ".join(str(i) for i in range(100))
    b = ", ".join(str(i) for i in range(1000))
    spec = home / "matrix.yaml"
    spec.write_text(
        "version: 1\njob:\n  name: sweep\ntasks:\n"
        "  - id: sim-{a}-{b}\n    kind: shell\n    run: echo {a} {b} > out_{a}_{b}.txt\n"
        "    outputs: ['out_{a}_{b}.txt']\n"
        f"    matrix:\n      a: [{a}]\n      b: [{b}]\n"
        "  - id: combine\n    kind: shell\n    run: cat out_*.txt\n    inputs: ['out_*.txt']\n",
        encoding="utf-8")
    data = plan_json(home, spec)
    assert (len(data["tasks"]), len(data["edges"]), data["widths"]) == (100_001, 100_000, [100_000, 1])
    assert {e["to"] for e in data["edges"]} == {"combine"}
    assert data["edges"][0] == {"from": "sim-0-0", "to": "combine", "type": "file", "source": "files",
                                "reason": "'combine' reads 'out_0_0.txt', which 'sim-0-0' writes"}


def test_the_tasks_of_a_matrix_entry_share_what_their_inputs_match(tmp_path: Path) -> None:
    from cmbagent_batch.plan.analysis.deps import explicit_edges
    from cmbagent_batch.plan.analysis.files import file_edges, input_sources
    from cmbagent_batch.spec import load_spec

    (tmp_path / "job.yaml").write_text(
        "version: 1\njob: {name: share}\ntasks:\n"
        "  - {id: make, kind: shell, run: echo, outputs: [grid.txt, 'logs/*.log']}\n"
        "  - id: use-{n}\n    kind: shell\n    run: echo\n    inputs: [grid.txt, params.ini]\n    matrix: {n: [1, 2, 3]}\n"
        "  - id: loop-{n}\n    kind: shell\n    run: echo\n    inputs: ['logs/*.log']\n    outputs: ['logs/{n}.log']\n"
        "    depends_on: [make]\n    matrix: {n: [1, 2]}\n")
    spec = load_spec(str(tmp_path / "job.yaml"))
    sources = input_sources(spec.tasks)
    assert sources["use-1"] == [("grid.txt", [("make", "grid.txt")]), ("params.ini", [])]
    assert sources["use-1"] is sources["use-3"]  # one list for the entry's tasks
    assert sources["loop-1"] == [("logs/*.log", [("loop-2", "logs/2.log"), ("make", "logs/*.log")])]
    assert sources["loop-2"] == [("logs/*.log", [("loop-1", "logs/1.log"), ("make", "logs/*.log")])]
    assert [(e.src, e.dst) for e in file_edges(spec.tasks)] == [
        ("loop-1", "loop-2"), ("loop-2", "loop-1"), ("make", "loop-1"), ("make", "loop-2"), ("make", "use-1"),
        ("make", "use-2"), ("make", "use-3")]
    assert [(e.src, e.dst, e.reason) for e in explicit_edges(spec.tasks)] == [
        ("make", "loop-1", "'loop-1' lists 'make' in depends_on"), ("make", "loop-2", "'loop-2' lists 'make' in depends_on")]
    assert file_edges(list(spec.tasks)) == file_edges(spec.tasks) and input_sources(list(spec.tasks)) == sources


def test_a_cached_plan_keeps_its_tasks_as_columns_and_prints_the_same(home: Path) -> None:
    spec = write(home / "job.yaml", {
        "version": 1, "job": {"name": "cols"},
        "tasks": [{"id": "prep", "kind": "shell", "run": "echo", "estimate": 3},
                  {"id": "sim-{n}", "kind": "python", "call": "json:dumps", "depends_on": ["prep"],
                   "matrix": {"n": [2, 1]}}]})
    cold = plan_json(home, spec)
    (record,) = records(home / ".cmbagent-batch" / "cache", "plan")
    payload = json.loads(record.read_bytes().split(b'"payload":', 1)[1][:-1])
    assert "tasks" not in payload
    assert payload["task_columns"] == {"id": ["prep", "sim-1", "sim-2"], "kind": ["shell", "python", "python"],
                                       "level": [0, 1, 1], "weight": [3.0, 1.0, 1.0]}
    cached = plan_json(home, spec)
    assert cold["tasks"] == cached["tasks"] == [
        {"id": "prep", "kind": "shell", "level": 0, "weight": 3.0},
        {"id": "sim-1", "kind": "python", "level": 1, "weight": 1.0},
        {"id": "sim-2", "kind": "python", "level": 1, "weight": 1.0}]
    assert {**cold, "from_cache": True} == cached
    text = plan(home, spec)
    assert text.stdout.splitlines()[0] == "Job cols: 3 tasks, 2 edges, 2 levels"
