"""The write-ahead ledger: every model call is announced (its intent) before it is sent, so a call whose
answer never came back shows as ``unknown: possibly billed`` in ``ledger summarize``, ``verify`` and the
report. Storage tests on real files; end to end with the CLI, agent processes and the real ``openai``
client over HTTP against the scripted server; and a ledger from before intents, which reads as it did."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch import cli
from cmbagent_batch.ledger import report as report_module
from cmbagent_batch.ledger.costs import CallRecorder, Priced
from cmbagent_batch.ledger.entry import utc_timestamp
from cmbagent_batch.ledger.files import intents_journal_path, journal_path
from cmbagent_batch.ledger.intents import UNKNOWN, endpoint_host, intent_key
from cmbagent_batch.ledger.merge import merge
from cmbagent_batch.spec.pricing import Price
from tests.helpers.cli import Runner, clean_env, wait_until
from tests.helpers.cli import cli as run_cli
from tests.helpers.ledger_entries import entry, head_of, write_chain
from tests.helpers.scripted_llm import Delay, HttpError, Reply, ScriptedLLM

KEY = "sk-test-SECRET-key-0123456789"
PRICE = {"prompt_per_1m": 2.0, "cached_prompt_per_1m": 0.5, "completion_per_1m": 8.0}


def ledger_cli(*args: str) -> tuple[int, str]:
    """``cmbagent-batch ledger ARGS`` in this process: exit code and stdout."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(out):
        code = cli.main(["ledger", *args])
    out.flush()
    return code, raw.getvalue().decode("utf-8")


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- a ledger from before intents: read, summarized, verified and reported ------------------------------

# What the commands print for this ledger: the figures they printed before intents existed (the code of the
# commit before them), with money, counts and the chain's status as they are shown since.
BEFORE_INTENTS = {
    'summarize-table': (
        'model        calls  errors  prompt  cached  completion  reasoning  cost_usd\n'
        '-----------  -----  ------  ------  ------  ----------  ---------  --------\n'
        'gpt-4o-mini     15       2  15,240   1,500       3,240         44     $0.24\n'
        'gpt-4.1         15       2  15,225   1,500       3,225         43    $0.225\n'
        'TOTAL           30       4  30,465   3,000       6,465         87    $0.465\n'
    ),
    'summarize-json': (
        '{\n'
        '  "verified": true,\n'
        '  "unverified_reason": null,\n'
        '  "total": {\n'
        '    "calls": 30,\n'
        '    "errors": 4,\n'
        '    "prompt_tokens": 30465,\n'
        '    "cached_prompt_tokens": 3000,\n'
        '    "completion_tokens": 6465,\n'
        '    "reasoning_tokens": 87,\n'
        '    "cost_usd": 0.465\n'
        '  },\n'
        '  "groups": [\n'
        '    {\n'
        '      "key": {\n'
        '        "model": "gpt-4o-mini"\n'
        '      },\n'
        '      "calls": 15,\n'
        '      "errors": 2,\n'
        '      "prompt_tokens": 15240,\n'
        '      "cached_prompt_tokens": 1500,\n'
        '      "completion_tokens": 3240,\n'
        '      "reasoning_tokens": 44,\n'
        '      "cost_usd": 0.24\n'
        '    },\n'
        '    {\n'
        '      "key": {\n'
        '        "model": "gpt-4.1"\n'
        '      },\n'
        '      "calls": 15,\n'
        '      "errors": 2,\n'
        '      "prompt_tokens": 15225,\n'
        '      "cached_prompt_tokens": 1500,\n'
        '      "completion_tokens": 3225,\n'
        '      "reasoning_tokens": 43,\n'
        '      "cost_usd": 0.225\n'
        '    }\n'
        '  ]\n'
        '}\n'
    ),
    'summarize-csv': (
        'model,calls,errors,prompt_tokens,cached_prompt_tokens,completion_tokens,reasoning_tokens,cost_usd\n'
        'gpt-4o-mini,15,2,15240,1500,3240,44,0.24\n'
        'gpt-4.1,15,2,15225,1500,3225,43,0.225\n'
    ),
    'summarize-task': (
        'task   calls  errors  prompt  cached  completion  reasoning  cost_usd\n'
        '-----  -----  ------  ------  ------  ----------  ---------  --------\n'
        'sim-1      8       1   8,120     800       1,720         22     $0.12\n'
        'sim-3      7       1   7,105     700       1,505         21    $0.105\n'
        'sim-0      6       1   6,092     600       1,292         15    $0.092\n'
        'sim-2      6       1   6,088     600       1,288         18    $0.088\n'
        '-          3       0   3,060     300         660         11     $0.06\n'
        'TOTAL     30       4  30,465   3,000       6,465         87    $0.465\n'
    ),
    'verify': (
        'intact: 30 entries, head 58b14cf665629dc3498fa859d42471b67975f332706eced377d0ab3d64e2eef2\n'
        'matches run.json: 30 entries, head 58b14cf665629dc3498fa859d42471b67975f332706eced377d0ab3d64e2eef2\n'
    ),
}


def old_ledger(run_dir: Path) -> None:
    """A run directory whose ledger was written before intents (the made-up run of the ledger tests)."""
    run_dir.mkdir(parents=True)
    entries = [entry(n, task=None if n % 10 == 0 else f"sim-{n % 4}", model=("gpt-4o-mini", "gpt-4.1")[n % 2],
                     cost=round(0.001 * n, 6), status="error" if n % 7 == 0 else "ok") for n in range(1, 31)]
    lines = write_chain(run_dir / "ledger.jsonl", entries)
    record = {"file": "ledger.jsonl", "entries": len(lines), "head": head_of(lines),
              "cost_usd": sum(e["cost_usd"] for e in entries)}
    (run_dir / "run.json").write_text(json.dumps({"ledger": record, "budget_usd": 1.0}))


def test_a_ledger_from_before_intents_reads_as_it_did(tmp_path: Path) -> None:
    run = tmp_path / "run"
    old_ledger(run)
    for fmt in ("table", "json", "csv"):
        assert ledger_cli("summarize", str(run), "--format", fmt) == (0, BEFORE_INTENTS[f"summarize-{fmt}"])
    assert ledger_cli("summarize", str(run / "ledger.jsonl"), "--by", "task") == (0, BEFORE_INTENTS["summarize-task"])
    assert ledger_cli("verify", str(run)) == (0, BEFORE_INTENTS["verify"])
    code, out = ledger_cli("report", str(run), "-o", str(tmp_path / "r.html"))
    assert (code, out) == (0, f"wrote {tmp_path / 'r.html'}: 30 calls, $0.465\n")
    page = (tmp_path / "r.html").read_text()
    assert 'id="unresolved"' not in page and 'id="unverified"' not in page  # no intents, and a whole chain
    assert page.count("<td class=\"price-date\">2025-08-15</td>") == 2  # its two models, the shipped table's date
    assert sorted(p.name for p in run.iterdir()) == ["ledger.jsonl", "run.json"]  # nothing written beside it


# --- storage: journals, merge, pairing ----------------------------------------------------------------


def recorder(run_dir: Path, rank: int = 0, task: str = "solo") -> CallRecorder:
    return CallRecorder(run_dir=str(run_dir), job="demo", run_id="run-1", rank=rank, host="node1", source="agent",
                        task=task, attempt=1, agent="engineer",
                        model=Priced("m", "test-model", Price(**PRICE), "spec"))


def test_an_intent_is_journaled_before_its_result_which_carries_its_id(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    intent = rec.intend(started=utc_timestamp(1_795_824_000), url="https://user:pw@api.example.org:8443/v1",
                        prompt_chars=1001)
    [journaled] = lines_of(Path(intents_journal_path(str(tmp_path), 0)))
    assert journaled == intent and not Path(journal_path(str(tmp_path), 0)).exists()
    assert (intent["endpoint"], intent["prompt_chars"], intent["prompt_tokens_estimate"]) == (
        "api.example.org:8443", 1001, 251)
    assert (intent["model"], intent["requested_model"], intent["task"], intent["attempt"], intent["call"]) == (
        "m", "test-model", "solo", 1, 1)
    result = rec.record(started="ignored", latency_s=0.5, status="ok", prompt_tokens=300, completion_tokens=20,
                        intent=intent)
    rec.close()
    assert intent_key(result) == intent_key(intent) and result["call"] == 1 and rec.calls == 1
    assert lines_of(Path(journal_path(str(tmp_path), 0))) == [result]


def test_merge_keeps_every_intent_and_pairs_each_with_its_result(tmp_path: Path) -> None:
    made = {}
    for rank in (0, 1):  # two ranks: the same call number on each, told apart by id
        rec = recorder(tmp_path, rank, task=f"t{rank}")
        for n in (1, 2):
            made[(rank, n)] = rec.intend(started=utc_timestamp(1_795_824_000 + n), url="http://127.0.0.1:9/v1",
                                         prompt_chars=100 * n)
        rec.record(started="", latency_s=0.1, status="error", error="500: boom", intent=made[(rank, 1)])
        rec.close()  # call 2 of each rank never got its answer
    result = merge(str(tmp_path))
    assert (result.entries, result.intents_added) == (2, 4)
    assert sorted(intent_key(i) for i in result.unresolved) == sorted(intent_key(made[(r, 2)]) for r in (0, 1))
    merged = lines_of(tmp_path / "ledger.intents.jsonl")
    assert [(i["seq"], i["rank"], i["call"], i["paired"]) for i in merged] == [
        (1, 0, 1, True), (2, 1, 1, True), (3, 0, 2, False), (4, 1, 2, False)]
    assert os.listdir(tmp_path / "ledger") == ["merge.lock"]
    assert merge(str(tmp_path)).intents_added == 0  # a second merge adds nothing
    code, out = ledger_cli("summarize", str(tmp_path), "--format", "json")
    data = json.loads(out)
    assert (code, data["total"]["calls"], data["intents"], data["unresolved"], data["unresolved_cost"]) == (
        0, 2, 4, 2, UNKNOWN)
    assert [(c["rank"], c["prompt_chars"], c["endpoint"]) for c in data["unresolved_calls"]] == [
        (0, 200, "127.0.0.1:9"), (1, 200, "127.0.0.1:9")]


def test_a_result_merged_after_its_intent_resolves_it(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    intent = rec.intend(started=utc_timestamp(1_795_824_000), url=None, prompt_chars=10)
    assert [i["paired"] for i in lines_of(tmp_path / "ledger.intents.jsonl")] == []
    merge(str(tmp_path))  # the call is still waiting for its answer
    assert [i["paired"] for i in lines_of(tmp_path / "ledger.intents.jsonl")] == [False]
    assert json.loads(ledger_cli("summarize", str(tmp_path), "--format", "json")[1])["unresolved"] == 1
    rec.record(started="", latency_s=3.0, status="ok", prompt_tokens=5, completion_tokens=1, intent=intent)
    rec.close()
    merge(str(tmp_path))
    code, out = ledger_cli("summarize", str(tmp_path))
    assert code == 0 and out.endswith("unresolved: 0 (every one of 1 calls sent has its result)\n")
    code, out = ledger_cli("verify", str(tmp_path))
    assert code == 0 and "intents intact: 1 intents, head " in out
    assert out.endswith("unresolved: 0 (every one of 1 calls sent has its result)\n")


def test_merge_killed_after_the_intents_were_appended_adds_none_twice(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    rec.intend(started=utc_timestamp(1_795_824_000), url=None, prompt_chars=10)
    rec.close()
    journals = {p: p.read_bytes() for p in (tmp_path / "ledger").glob("*.jsonl")}
    merge(str(tmp_path))
    for path, data in journals.items():  # as if the merge died before removing the journals
        path.write_bytes(data)
    assert merge(str(tmp_path)).intents_added == 0
    assert len(lines_of(tmp_path / "ledger.intents.jsonl")) == 1
    assert ledger_cli("verify", str(tmp_path))[0] == 0


def test_verify_finds_an_edited_intent(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    rec.intend(started=utc_timestamp(1_795_824_000), url=None, prompt_chars=4000)
    rec.close()
    merge(str(tmp_path))
    path = tmp_path / "ledger.intents.jsonl"
    path.write_text(path.read_text().replace('"prompt_chars":4000', '"prompt_chars":4'))
    code, out = ledger_cli("verify", str(tmp_path))
    assert code == 1
    assert out.splitlines()[-1] == f"{path}:1: the hash does not match the line: the entry was edited"


def test_the_report_module_spells_unknown_as_the_ledger_does() -> None:
    assert report_module.UNKNOWN == UNKNOWN
    assert endpoint_host("http://127.0.0.1:8080/v1") == "127.0.0.1:8080" and endpoint_host(None) == ""


# --- end to end: agent processes, the real openai client, the scripted endpoint -------------------------


def spec(tmp_path: Path, url: str, tasks: str, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "version: 1\njob:\n  name: agents\nexecution:\n  max_workers: 2\n  keep_going: true\n"
        "llm:\n  default_model: m\n  models:\n    m:\n"
        f"      model: test-model\n      base_url: {url}\n      api_key_env: TEST_LLM_KEY\n"
        f"      timeout: 120\n      max_retries: 2\n      price: {json.dumps(PRICE)}\n{extra}tasks:\n{tasks}")
    return path


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, *args, env=clean_env(tmp_path, TEST_LLM_KEY=KEY), timeout=180)


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def who(body: Any) -> str:
    return next((str(m["content"]).split(":")[0] for m in body["messages"] if m["role"] == "user"), "?")


TWO_AGENTS = """\
  - id: first
    kind: agent
    instructions: "FIRST: write a haiku about the CMB"
  - id: second
    kind: agent
    instructions: "SECOND: explain lensing of the CMB in one paragraph"
    depends_on: [first]
"""


@pytest.mark.slow
def test_a_normal_run_resolves_every_intent(tmp_path: Path) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    failed: list[str] = []

    def script(body: Any) -> Any:
        if "response_format" in body:  # the dependency analysis
            return Reply({"edges": []}, usage=usage(700, 10))
        if who(body) == "SECOND" and not failed:
            failed.append("once")
            return HttpError(500, retry_after=0)
        return Reply("done", usage=usage(300, 20))

    extra = "analysis:\n  sources: [explicit, files, llm]\n  model: m\n"
    with ScriptedLLM(script) as srv:
        result = run(tmp_path, "run", str(spec(tmp_path, srv.base_url, TWO_AGENTS, extra)))
        assert srv.failures == []
        sent = [sum(len(str(m.get("content") or "")) for m in body["messages"])
                + (len(json.dumps(body["response_format"])) if "response_format" in body else 0)
                for body in srv.completions]
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "agents"
    entries = lines_of(run_dir / "ledger.jsonl")
    intents = lines_of(run_dir / "ledger.intents.jsonl")
    assert [(e["source"], e["task"], e["status"]) for e in entries] == [
        ("analysis", None, "ok"), ("agent", "first", "ok"), ("agent", "second", "error"), ("agent", "second", "ok")]
    assert [intent_key(i) for i in intents] == [intent_key(e) for e in entries]  # one each, same id and time
    assert all(i["paired"] for i in intents)
    assert {i["endpoint"] for i in intents} == {f"127.0.0.1:{srv.port}"}
    assert [i["prompt_chars"] for i in intents] == sent  # the characters of each request's messages
    assert all(i["prompt_tokens_estimate"] == -(-i["prompt_chars"] // 4) for i in intents)
    assert list((run_dir / "ledger").glob("*.jsonl")) == []
    verify = run(tmp_path, "ledger", "verify", str(run_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "intents intact: 4 intents" in verify.stdout
    assert verify.stdout.endswith("unresolved: 0 (every one of 4 calls sent has its result)\n")
    summary = json.loads(run(tmp_path, "ledger", "summarize", str(run_dir), "--format", "json").stdout)
    assert (summary["total"]["calls"], summary["intents"], summary["unresolved"]) == (4, 4, 0)
    assert "possibly billed" not in result.stderr


@pytest.mark.slow
def test_sigkill_of_an_agent_waiting_for_its_answer_leaves_an_unresolved_intent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    import psutil

    held: list[str] = []

    def script(body: Any) -> Any:
        if who(body) == "SECOND":
            held.append("SECOND")
            return Delay(120, Reply("too late"))  # the endpoint holds the answer back
        return Reply("done", usage=usage(300, 20))

    with ScriptedLLM(script) as srv:
        monkeypatch.setenv("TEST_LLM_KEY", KEY)
        runner = Runner(tmp_path, str(spec(tmp_path, srv.base_url, TWO_AGENTS)))
        try:
            wait_until("the second agent's call is in flight", lambda: held == ["SECOND"], runner)
            [agent] = [p for p in psutil.Process(runner.proc.pid).children(recursive=True)
                       if "cmbagent_batch.tasks.agent.main" in " ".join(p.cmdline())]
            os.kill(agent.pid, signal.SIGKILL)
            assert runner.wait(60) == 1
        finally:
            runner.kill()
    run_dir = tmp_path / "runs" / "agents"
    assert [(e["task"], e["status"]) for e in lines_of(run_dir / "ledger.jsonl")] == [("first", "ok")]
    [killed] = [i for i in lines_of(run_dir / "ledger.intents.jsonl") if not i["paired"]]
    assert (killed["task"], killed["model"], killed["requested_model"]) == ("second", "m", "test-model")
    assert killed["prompt_chars"] > len("SECOND: explain lensing of the CMB in one paragraph")
    assert f"possibly billed): {killed['timestamp']}  task second attempt 1" in runner.stderr()
    size = f"prompt {killed['prompt_chars']:,} characters (~{killed['prompt_tokens_estimate']:,} tokens)"
    line = (f"  {killed['timestamp']}  task second attempt 1  model m (test-model) at 127.0.0.1:{srv.port}  "
            f"{size}  id {killed['id']}\n")
    unresolved = ("unresolved: 1 call sent with no result recorded, unknown: possibly billed "
                  f"({killed['prompt_chars']:,} prompt characters)\n" + line)

    verify = run(tmp_path, "ledger", "verify", str(run_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("intact: 1 entries, head ") and verify.stdout.endswith(unresolved)
    assert "intents intact: 2 intents, head " in verify.stdout
    summary = run(tmp_path, "ledger", "summarize", str(run_dir / "ledger.jsonl"))
    assert summary.returncode == 0
    assert summary.stdout.endswith(unresolved.replace(" characters)\n", " characters; not in the table above)\n"))
    data = json.loads(run(tmp_path, "ledger", "summarize", str(run_dir), "--format", "json").stdout)
    assert (data["total"]["calls"], data["unresolved"], data["unresolved_cost"]) == (1, 1, "unknown: possibly billed")
    assert data["unresolved_calls"] == [{k: v for k, v in killed.items() if k not in ("seq", "prev", "hash",
                                                                                        "paired")}]
    report = run(tmp_path, "ledger", "report", str(run_dir), "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    assert report.stdout.endswith(", 1 more sent with no result (unknown: possibly billed)\n")
    page = (tmp_path / "r.html").read_text()
    assert 'id="unresolved" data-value="1"' in page and page.count("unknown: possibly billed") >= 2
    assert f"<td>{killed['requested_model']}</td><td>127.0.0.1:{srv.port}</td>" \
           f'<td class="n">{killed["prompt_chars"]:,}</td>' in page


def test_analysis_calls_are_announced_before_they_are_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmbagent_batch.ledger.costs import analysis_recorder
    from cmbagent_batch.plan.analysis.llm import infer_edges
    from cmbagent_batch.spec.loader import load_spec_bytes

    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    seen: list[str] = []
    with ScriptedLLM([HttpError(500, retry_after=0), Reply({"edges": []}, usage=usage(300, 5))]) as srv:
        tasks = "  - {id: a, kind: shell, run: 'true'}\n  - {id: b, kind: shell, run: 'true'}\n"
        path = spec(tmp_path, srv.base_url, tasks, "analysis:\n  sources: [explicit, llm]\n  model: m\n")
        job = load_spec_bytes(path.read_bytes(), str(path))
        record = analysis_recorder(str(tmp_path), job, "run-1", "node1")

        def on_call(call: Any) -> None:
            seen.append(type(call).__name__)
            if type(call).__name__ == "LlmIntent":  # sent only once its intent is in the journal
                assert len(lines_of(Path(intents_journal_path(str(tmp_path), 0)))) == seen.count("LlmIntent") - 1
            record([call])
            if type(call).__name__ == "LlmIntent":
                assert len(lines_of(Path(intents_journal_path(str(tmp_path), 0)))) == seen.count("LlmIntent")

        infer_edges(job.tasks, [], job.llm.models["m"], on_call=on_call, sleep=lambda s: None)
    assert seen == ["LlmIntent", "LlmCall", "LlmIntent", "LlmCall"]
    assert merge(str(tmp_path)).unresolved == ()
    entries, intents = lines_of(tmp_path / "ledger.jsonl"), lines_of(tmp_path / "ledger.intents.jsonl")
    assert [(e["source"], e["call"], e["status"]) for e in entries] == [("analysis", 1, "error"), ("analysis", 2, "ok")]
    assert [intent_key(i) for i in intents] == [intent_key(e) for e in entries] and all(i["paired"] for i in intents)
    assert {(i["task"], i["agent"], i["endpoint"]) for i in intents} == {(None, "dependency-analysis",
                                                                           f"127.0.0.1:{srv.port}")}


def test_the_report_lists_unresolved_calls_escaped() -> None:
    from cmbagent_batch.ledger.report import render_report

    unresolved = [{"id": "r/0/1/1", "timestamp": utc_timestamp(1_795_824_000), "task": "<t>", "attempt": 2,
                   "agent": "a", "requested_model": "gpt-<x>", "endpoint": "h:1", "prompt_chars": 4000,
                   "prompt_tokens_estimate": 1000}]
    page = render_report([entry(1)], title="t", budget_usd=None, unresolved=unresolved)
    assert 'id="unresolved" data-value="1"' in page and '<section id="unresolved-calls">' in page
    assert ("<td>&lt;t&gt;</td><td>2</td><td>a</td><td>gpt-&lt;x&gt;</td><td>h:1</td><td class=\"n\">4,000</td>"
            '<td class="n">1,000</td><td class="err">unknown: possibly billed</td>') in page
    none = render_report([entry(1)], title="t", budget_usd=None, unresolved=[])
    assert "every call sent has its result" in none and render_report([entry(1)], title="t", budget_usd=None) != none
