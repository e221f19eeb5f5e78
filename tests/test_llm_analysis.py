"""LLM dependency analysis against the real openai client over real HTTP to a scripted local server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from cmbagent_batch.errors import AnalysisError, LocalModelError
from cmbagent_batch.plan.analysis.llm import (
    PROMPT_VERSION,
    LlmAnalysis,
    LlmAnalysisError,
    backoff_delay,
    infer_edges,
)
from cmbagent_batch.plan.analysis.llm_reply import check_reply, reply_schema, task_facts
from cmbagent_batch.plan.dag import Dag, Edge
from cmbagent_batch.spec.model import ModelSpec, TaskSpec
from tests.helpers.scripted_llm import JSON_SCHEMA_UNSUPPORTED, Delay, HttpError, Item, Reply, ScriptedLLM

KEY = "sk-test-0123456789abcdef-SECRET"
KEY_ENV = "CMBB_TEST_LLM_KEY"

TASKS = (
    TaskSpec(id="fetch", kind="shell", description="Download the Planck maps",
             run="wget -O maps/planck.fits https://example.org/planck.fits", outputs=("maps/planck.fits",)),
    TaskSpec(id="spectra", kind="python", description="Compute power spectra from the maps",
             call="cmb.spectra:main", inputs=("maps/*.fits",), outputs=("spectra.npz",)),
    TaskSpec(id="fit", kind="agent", agent="engineer", description="Fit cosmological parameters",
             instructions="Use the power spectra to fit LCDM.", model="mini"),
    TaskSpec(id="report", kind="agent", agent="researcher", description="Write the report",
             instructions="Summarise the parameter fit."),
)
IDS = {t.id for t in TASKS}
KNOWN = [("fetch", "spectra")]
GOOD = {"edges": [
    {"from": "spectra", "to": "fit", "type": "data", "reason": "The fit uses the power spectra."},
    {"from": "fit", "to": "report", "type": "logic", "reason": "The report summarises the fit."},
]}
GOOD_EDGES = (
    Edge(src="fit", dst="report", type="logic", source="llm", reason="The report summarises the fit."),
    Edge(src="spectra", dst="fit", type="data", source="llm", reason="The fit uses the power spectra."),
)
FIX_TAIL = ("\nSend the corrected reply: the complete JSON object with every missing dependency, "
            "not only the changed ones.")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)


class Sleeps(list[float]):
    """Stands in for time.sleep: records the delays, waits for none."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def spec(base_url: str, **kw: Any) -> ModelSpec:
    return ModelSpec(**{"name": "mini", "model": "gpt-4o-mini", "base_url": base_url, "api_key_env": KEY_ENV,
                        "timeout": 5.0, "max_retries": 2, **kw})


def no_key(*things: object) -> None:
    for thing in things:
        assert KEY not in repr(thing)


def user_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


# -- good replies and what is sent -------------------------------------------------------------------------

def test_good_reply_gives_typed_edges_with_reasons(sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply(GOOD)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert isinstance(result, LlmAnalysis)
    assert result.edges == GOOD_EDGES
    assert result.mode == "json_schema"
    assert result.notes == ()
    assert [c.status for c in result.calls] == ["ok"]
    assert sleeps == []
    assert srv.failures == [] and srv.remaining == 0
    known = Edge(src="fetch", dst="spectra", type="file", source="files", reason="maps/planck.fits")
    dag = Dag([t.id for t in TASKS], [known, *result.edges])
    assert set(dag.edges) == {known, *GOOD_EDGES}


def test_request_carries_task_fields_known_edges_and_key(sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply(GOOD)]) as srv:
        infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    (request,) = srv.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "gpt-4o-mini"
    assert body["temperature"] == 0
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == reply_schema(IDS)
    assert fmt["json_schema"]["schema"]["properties"]["edges"]["items"]["properties"]["from"]["enum"] == sorted(IDS)
    system, user = body["messages"]
    assert system["role"] == "system" and '"edges"' in system["content"] and "JSON" in system["content"]
    text = user["content"]
    sent = json.loads(text.split("Tasks:\n", 1)[1].split("\nKnown dependencies", 1)[0])
    assert sent == [task_facts(t) for t in TASKS]
    assert sent[0] == {"id": "fetch", "kind": "shell", "description": "Download the Planck maps",
                       "run": "wget -O maps/planck.fits https://example.org/planck.fits",
                       "outputs": ["maps/planck.fits"]}
    assert sent[2] == {"id": "fit", "kind": "agent", "agent": "engineer", "description": "Fit cosmological parameters",
                       "instructions": "Use the power spectra to fit LCDM."}
    assert sent[1]["inputs"] == ["maps/*.fits"] and sent[1]["outputs"] == ["spectra.npz"]
    assert text.endswith('Known dependencies (already decided; do not repeat them):\n[{"from": "fetch", "to": "spectra"}]')


def test_long_texts_are_cut_and_marked(sleeps: Sleeps) -> None:
    long = TaskSpec(id="long", kind="agent", agent="engineer", instructions="x" * 5000)
    with ScriptedLLM([Reply({"edges": []})]) as srv:
        result = infer_edges([*TASKS, long], [], spec(srv.base_url), sleep=sleeps)
    text = user_text(srv.completions[0])
    assert "x" * 2000 + " [truncated: 5000 characters in full]" in text
    assert "x" * 2001 not in text
    assert "Known dependencies (already decided; do not repeat them):\nnone" in text
    assert result.edges == ()


def test_prompt_version_is_exported() -> None:
    assert PROMPT_VERSION == "1"


def test_usage_recorded_exactly_as_reported(sleeps: Sleeps) -> None:
    usage = {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290,
             "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 7}}
    with ScriptedLLM([Reply(GOOD, usage=usage, model="gpt-4o-mini-2024-07-18")]) as srv:
        (call,) = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps).calls
    assert (call.requested_model, call.reported_model) == ("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert (call.prompt_tokens, call.cached_prompt_tokens, call.completion_tokens, call.reasoning_tokens) == (
        1234, 1024, 56, 7)
    assert call.status == "ok" and call.error is None
    assert call.started_at.endswith("+00:00") and call.latency_s >= 0


def test_missing_usage_counts_zero(sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply(GOOD, usage=None)]) as srv:
        (call,) = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps).calls
    assert (call.prompt_tokens, call.cached_prompt_tokens, call.completion_tokens, call.reasoning_tokens) == (0, 0, 0, 0)


def test_duplicate_of_known_edge_is_dropped_with_a_note(sleeps: Sleeps) -> None:
    reply = {"edges": [{"from": "fetch", "to": "spectra", "type": "file", "reason": "maps"}, *GOOD["edges"]]}
    with ScriptedLLM([Reply(reply)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert result.edges == GOOD_EDGES
    assert result.notes == ('dropped edges[0] ("fetch" -> "spectra"): already a known dependency',)
    assert len(srv.requests) == 1


# -- structured-output fallback ----------------------------------------------------------------------------

def test_json_schema_rejected_falls_back_to_json_object(sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply(GOOD)], json_schema=False) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert result.edges == GOOD_EDGES
    assert result.mode == "json_object"
    assert result.notes == (f"the endpoint rejected response_format json_schema (400: {JSON_SCHEMA_UNSUPPORTED}); "
                            "asked for json_object instead",)
    assert [b["response_format"]["type"] for b in srv.completions] == ["json_schema", "json_object"]
    assert [(c.status, c.error) for c in result.calls] == [("error", f"400: {JSON_SCHEMA_UNSUPPORTED}"), ("ok", None)]
    assert sleeps == []


def test_bad_request_in_both_modes_fails_with_the_server_message(sleeps: Sleeps) -> None:
    msg = "Unsupported value: 'temperature' does not support 0 with this model."
    with ScriptedLLM([HttpError(400, msg), HttpError(400, msg)]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert str(err.value) == (f"LLM endpoint {srv.base_url} rejected the request (400) for model 'gpt-4o-mini': {msg}")
    assert len(srv.requests) == 2 and sleeps == []


# -- fix rounds --------------------------------------------------------------------------------------------

EDGE = {"from": "spectra", "to": "fit", "type": "data", "reason": "r"}
BAD_REPLIES = [
    pytest.param('{"edges": [', ["the reply is not valid JSON (Expecting value at line 1 column 12); "
                                 "send only the JSON object"], id="not-json"),
    pytest.param({"dependencies": []}, ['the reply has no "edges" key'], id="no-edges"),
    pytest.param(["spectra"], ['the reply must be a JSON object with the key "edges", not array'], id="not-object"),
    pytest.param({"edges": {"spectra": "fit"}}, ['"edges" must be an array, not object'], id="edges-not-list"),
    pytest.param({"edges": [{"from": "spectra", "to": "fit", "type": "needs"}]},
                 ['edges[0] lacks "reason"', 'edges[0].type must be one of data, file, api, logic, order, not "needs"'],
                 id="shape"),
    pytest.param({"edges": [{**EDGE, "to": 3}, "fit"]},
                 ["edges[0].to must be a string, not number",
                  "edges[1] must be an object with from, to, type and reason, not string"], id="types"),
    pytest.param({"edges": [{**EDGE, "from": "spectrum"}]},
                 ['edges[0].from: unknown task id "spectrum" (did you mean "spectra"?)'], id="unknown-id"),
    pytest.param({"edges": [{**EDGE, "from": "fit"}]}, ['edges[0]: task "fit" cannot depend on itself'], id="self"),
    pytest.param({"edges": [EDGE, {**EDGE, "type": "logic"}]}, ['edges[1] repeats edges[0] ("spectra" -> "fit")'],
                 id="duplicate"),
    pytest.param({"edges": [{**EDGE, "reason": " "}]}, ["edges[0].reason is empty"], id="empty-reason"),
    pytest.param({"edges": [{**EDGE, "from": "spectra", "to": "fetch"}]},
                 ['edges[0] ("spectra" -> "fetch") closes a cycle: spectra -> fetch -> spectra'], id="cycle-with-known"),
    pytest.param({"edges": [EDGE, {**EDGE, "from": "fit", "to": "report"}, {**EDGE, "from": "report", "to": "spectra"}]},
                 ['edges[0] ("spectra" -> "fit") closes a cycle: spectra -> fit -> report -> spectra'], id="cycle"),
]


@pytest.mark.parametrize(("bad", "problems"), BAD_REPLIES)
def test_bad_reply_gets_a_fix_round_then_correction_is_accepted(bad: Any, problems: list[str],
                                                               sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply(bad), Reply(GOOD)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert result.edges == GOOD_EDGES
    assert result.notes == ("the model needed 1 fix round(s)",)
    assert len(result.calls) == 2
    first, follow_up = srv.completions
    assert follow_up["messages"][:2] == first["messages"]
    bad_text = bad if isinstance(bad, str) else json.dumps(bad)
    assert follow_up["messages"][2] == {"role": "assistant", "content": bad_text}
    assert follow_up["messages"][3] == {"role": "user", "content": "Your reply has these problems:\n"
                                        + "\n".join(f"- {p}" for p in problems) + FIX_TAIL}


def test_still_bad_after_max_fix_rounds_raises(sleeps: Sleeps) -> None:
    bad = {"edges": [{**EDGE, "from": "spectrum"}]}
    with ScriptedLLM([Reply(bad)] * 3) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert str(err.value) == (
        "LLM dependency analysis with model 'mini' got no usable reply after 3 tries (2 fix rounds); "
        "the last reply had these problems:\n"
        '- edges[0].from: unknown task id "spectrum" (did you mean "spectra"?)')
    assert len(srv.completions) == 3
    assert srv.failures == []
    assert isinstance(err.value, LlmAnalysisError)
    assert [c.status for c in err.value.calls] == ["ok", "ok", "ok"]


def test_no_fix_rounds_means_one_request(sleeps: Sleeps) -> None:
    with ScriptedLLM([Reply("not json")]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), max_fix_rounds=0, sleep=sleeps)
    assert str(err.value) == (
        "LLM dependency analysis with model 'mini' got no usable reply after 1 tries (0 fix rounds); "
        "the last reply had these problems:\n"
        "- the reply is not valid JSON (Expecting value at line 1 column 1); send only the JSON object")
    assert len(srv.completions) == 1


# -- ask_about ---------------------------------------------------------------------------------------------

def test_ask_about_restricts_the_request_and_the_accepted_edges(sleeps: Sleeps) -> None:
    outside = {"edges": GOOD["edges"]}
    inside = {"edges": [GOOD["edges"][1]]}
    with ScriptedLLM([Reply(outside), Reply(inside)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), ask_about={"report"}, sleep=sleeps)
    assert result.edges == (GOOD_EDGES[0],)
    first, follow_up = srv.completions
    assert user_text(first).endswith("Only propose dependencies with at least one end among these tasks; "
                                     'the others are already decided: ["report"]')
    assert user_text(follow_up) == ("Your reply has these problems:\n"
                                    '- edges[0] ("spectra" -> "fit") involves none of the tasks asked about' + FIX_TAIL)


def test_nothing_to_ask_calls_no_model(closed_port: int, sleeps: Sleeps) -> None:
    model = spec(f"http://127.0.0.1:{closed_port}/v1")
    for result in (infer_edges(TASKS, KNOWN, model, ask_about=set(), sleep=sleeps),
                   infer_edges(TASKS[:1], [], model, sleep=sleeps)):
        assert result == LlmAnalysis((), (), "json_schema", ("no pair of tasks to ask about; the model was not called",))


def test_programming_errors_are_value_errors(sleeps: Sleeps) -> None:
    model = spec("http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="ask_about names unknown tasks"):
        infer_edges(TASKS, KNOWN, model, ask_about={"nope"}, sleep=sleeps)
    with pytest.raises(ValueError, match="known edges name unknown tasks"):
        infer_edges(TASKS, [("fetch", "nope")], model, sleep=sleeps)


# -- endpoint errors ---------------------------------------------------------------------------------------

def test_429_is_retried_with_backoff(sleeps: Sleeps) -> None:
    with ScriptedLLM([HttpError(429), Reply(GOOD)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert result.edges == GOOD_EDGES
    assert [(c.status, c.error) for c in result.calls] == [
        ("error", "429: Rate limit reached. Please try again later."), ("ok", None)]
    assert result.calls[0].reported_model is None and result.calls[0].prompt_tokens == 0
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 1.25
    assert len(srv.completions) == 2


@pytest.mark.parametrize(("retry_after", "waited"), [(7, 7.0), ("0.5", 0.5), (3600, 60.0)])
def test_retry_after_is_honoured_and_capped(retry_after: Any, waited: float, sleeps: Sleeps) -> None:
    with ScriptedLLM([HttpError(429, retry_after=retry_after), Reply(GOOD)]) as srv:
        infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert sleeps == [waited]


def test_server_errors_exhaust_retries(sleeps: Sleeps) -> None:
    with ScriptedLLM([HttpError(500), HttpError(503), HttpError(500)]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url, max_retries=2), sleep=sleeps)
    assert str(err.value) == (f"LLM endpoint {srv.base_url} failed for model 'gpt-4o-mini' after 3 attempts; "
                              "last error: 500 The server had an error while processing your request.")
    assert len(srv.completions) == 3
    assert len(sleeps) == 2 and 1.0 <= sleeps[0] <= 1.25 and 2.0 <= sleeps[1] <= 2.5
    assert isinstance(err.value, LlmAnalysisError)
    assert [(c.status, c.error) for c in err.value.calls] == [
        ("error", "500: The server had an error while processing your request."),
        ("error", "503: The server had an error while processing your request."),
        ("error", "500: The server had an error while processing your request.")]


@pytest.mark.slow
def test_timeout_is_retried(sleeps: Sleeps) -> None:
    with ScriptedLLM([Delay(3, Reply(GOOD)), Reply(GOOD)]) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url, timeout=0.5), sleep=sleeps)
    assert result.edges == GOOD_EDGES
    assert [(c.status, c.error) for c in result.calls] == [("error", "timed out after 0.5 s"), ("ok", None)]
    assert len(sleeps) == 1


@pytest.mark.slow
def test_timeouts_exhaust_retries(sleeps: Sleeps) -> None:
    with ScriptedLLM([Delay(3), Delay(3)]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url, timeout=0.5, max_retries=1), sleep=sleeps)
    assert str(err.value) == (f"LLM endpoint {srv.base_url} did not answer within 0.5 s for model 'gpt-4o-mini' "
                              "after 2 attempts")


def test_unreachable_endpoint_names_the_url(closed_port: int, sleeps: Sleeps) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    with pytest.raises(AnalysisError) as err:
        infer_edges(TASKS, KNOWN, spec(url, max_retries=1), sleep=sleeps)
    # the OS words the cause (e.g. "[Errno 111] Connection refused"); ours is everything before it
    assert str(err.value).startswith(f"LLM endpoint {url} could not be reached for model 'gpt-4o-mini' "
                                     "after 2 attempts: ")
    assert len(sleeps) == 1
    no_key(str(err.value))


def test_401_fails_at_once_and_never_shows_the_key(sleeps: Sleeps) -> None:
    with ScriptedLLM([HttpError(401, f"Incorrect API key provided: {KEY}.")]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert str(err.value) == (f"LLM endpoint {srv.base_url} rejected the API key (401) for model 'gpt-4o-mini'; "
                              f"check ${KEY_ENV}")
    assert len(srv.requests) == 1 and sleeps == []
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert isinstance(err.value, LlmAnalysisError)
    assert [(c.status, c.error) for c in err.value.calls] == [("error", "401: Incorrect API key provided: ***.")]
    no_key(err.value, err.value.calls)


@pytest.mark.parametrize(("status", "message"), [
    (403, "LLM endpoint {url} refused access (403) for model 'gpt-4o-mini': "
          "You are not allowed to use this model."),
    (404, "LLM endpoint {url} answered 404 for model 'gpt-4o-mini': "
          "The model does not exist or you do not have access to it.; check the model name and base_url"),
    (422, "LLM endpoint {url} answered 422 for model 'gpt-4o-mini': "
          "The server had an error while processing your request."),
])
def test_client_errors_fail_at_once(status: int, message: str, sleeps: Sleeps) -> None:
    with ScriptedLLM([HttpError(status)]) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert str(err.value) == message.format(url=srv.base_url)
    assert len(srv.requests) == 1 and sleeps == []


def test_missing_key_env_var(monkeypatch: pytest.MonkeyPatch, closed_port: int, sleeps: Sleeps) -> None:
    monkeypatch.delenv(KEY_ENV)
    url = f"http://127.0.0.1:{closed_port}/v1"
    with pytest.raises(AnalysisError) as err:
        infer_edges(TASKS, KNOWN, spec(url), sleep=sleeps)
    assert str(err.value) == f"LLM analysis with model 'mini' needs an API key in ${KEY_ENV}, which is not set"
    with pytest.raises(AnalysisError) as err:
        infer_edges(TASKS, KNOWN, spec(url, api_key_env=None), sleep=sleeps)
    assert str(err.value) == "LLM analysis with model 'mini' needs an API key in $OPENAI_API_KEY, which is not set"
    assert isinstance(err.value, LlmAnalysisError) and err.value.calls == ()


def test_a_local_model_is_asked_for_json_object_with_the_schema_and_needs_no_key(
        monkeypatch: pytest.MonkeyPatch, sleeps: Sleeps) -> None:
    monkeypatch.delenv(KEY_ENV)
    local = ModelSpec(name="smol", model="smollm2-135m-instruct", provider="local", timeout=5.0, max_retries=0)
    with ScriptedLLM([Reply(GOOD)]) as srv:
        result = infer_edges(TASKS, KNOWN, local, sleep=sleeps, base_url=lambda: srv.base_url)
    assert (result.edges, result.mode, result.notes) == (GOOD_EDGES, "json_object", ())
    (request,) = srv.requests
    assert request.body["response_format"] == {"type": "json_object", "schema": reply_schema(IDS)}
    assert request.headers["authorization"] == "Bearer no-key-local-model"


def test_a_local_server_that_does_not_start_fails_the_analysis_before_any_request(sleeps: Sleeps) -> None:
    def broken() -> str:
        raise LocalModelError("the server of local model 'smol' exited with status 1 while starting")

    local = ModelSpec(name="smol", model="smollm2-135m-instruct", provider="local")
    with pytest.raises(LlmAnalysisError) as err:
        infer_edges(TASKS, KNOWN, local, sleep=sleeps, base_url=broken)
    assert str(err.value) == ("LLM dependency analysis with model 'smol' not started: the server of local model "
                              "'smol' exited with status 1 while starting")
    assert err.value.calls == ()


def test_default_key_env_is_openai_api_key(monkeypatch: pytest.MonkeyPatch, sleeps: Sleeps) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ScriptedLLM([Reply(GOOD)]) as srv:
        infer_edges(TASKS, KNOWN, spec(srv.base_url, api_key_env=None), sleep=sleeps)
    assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_key_never_in_records_or_messages(sleeps: Sleeps) -> None:
    echo = f"Rate limit for key {KEY} reached."
    script: list[Item] = [HttpError(429, echo), HttpError(500, echo), Reply(GOOD)]
    with ScriptedLLM(script) as srv:
        result = infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert [c.error for c in result.calls] == ["429: Rate limit for key *** reached.",
                                               "500: Rate limit for key *** reached.", None]
    no_key(result)
    with ScriptedLLM([HttpError(500, echo)] * 3) as srv:
        with pytest.raises(AnalysisError) as err:
            infer_edges(TASKS, KNOWN, spec(srv.base_url), sleep=sleeps)
    assert str(err.value).endswith("last error: 500 Rate limit for key *** reached.")
    assert isinstance(err.value, LlmAnalysisError)
    no_key(err.value, err.value.calls)


# -- pure parts --------------------------------------------------------------------------------------------

def test_backoff_delay() -> None:
    assert [backoff_delay(n, None, 0.0) for n in (1, 2, 3, 6, 7)] == [1.0, 2.0, 4.0, 30.0, 30.0]
    assert backoff_delay(1, None, 0.999) == pytest.approx(1.24975)
    assert backoff_delay(3, 2.5, 0.7) == 2.5
    assert backoff_delay(1, -4.0, 0.0) == 0.0
    assert backoff_delay(1, 1e9, 0.0) == 60.0


def test_cycle_check_is_iterative_on_long_chains() -> None:
    ids = [f"t{i:05d}" for i in range(5000)]
    known = list(zip(ids, ids[1:]))
    reply = {"edges": [{"from": ids[-1], "to": ids[0], "type": "order", "reason": "r"}]}
    check = check_reply(json.dumps(reply), ids, known)
    (problem,) = check.problems
    assert problem.startswith(f'edges[0] ("{ids[-1]}" -> "{ids[0]}") closes a cycle: {ids[-1]} -> {ids[0]} -> ')
    assert problem.count(" -> ") == 5001


def test_extra_keys_are_ignored_with_a_note() -> None:
    reply = {"edges": [{**EDGE, "confidence": 0.9}], "parallel_groups": []}
    check = check_reply(json.dumps(reply), IDS, KNOWN)
    assert check.ok and [e.reason for e in check.edges] == ["r"]
    assert check.notes == ('ignored unexpected key(s) "parallel_groups" in the reply',
                           'ignored unexpected key(s) "confidence" in edges[0]')


def test_module_import_does_not_import_openai() -> None:
    code = "import sys, cmbagent_batch.plan.analysis.llm; assert 'openai' not in sys.modules, 'openai imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the scripted server itself ----------------------------------------------------------------------------

def test_scripted_server_reports_running_out_of_script_and_serves_models() -> None:
    with ScriptedLLM((), models=("m1", "m2")) as srv:
        with openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["m1", "m2"]
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert srv.failures == ["no reply scripted for request #2"]
    assert [r.method for r in srv.requests] == ["GET", "POST"]


def test_scripted_server_accepts_a_callable_script() -> None:
    def script(body: dict[str, Any]) -> Reply:
        return Reply(f"echo {body['messages'][0]['content']}")

    with ScriptedLLM(script) as srv:
        with openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0) as client:
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "echo hi"
    assert srv.remaining is None


def test_missing_openai_package_is_a_clear_analysis_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from cmbagent_batch.errors import LlmAnalysisError
    from cmbagent_batch.plan.analysis.llm import infer_edges
    from cmbagent_batch.spec.model import ModelSpec, Price, TaskSpec

    real_import = builtins.__import__

    def no_openai(name: str, *args: object, **kwargs: object) -> object:
        if name == "openai":
            raise ImportError("No module named 'openai'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setattr(builtins, "__import__", no_openai)
    model = ModelSpec(name="m", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", price=Price(0, 0))
    with pytest.raises(LlmAnalysisError) as info:
        infer_edges([TaskSpec(id="a", kind="shell"), TaskSpec(id="b", kind="shell")], [], model)
    assert str(info.value) == (
        "LLM dependency analysis needs the 'openai' package, which is not installed: "
        "pip install 'cmbagent-batch[agents]'"
    )
