"""The scripted endpoint itself, driven by the real ``openai`` client over real HTTP: every route, plain and
streamed, and the record of what it served (which the gateway tests compare ledgers with)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.helpers.scripted_llm import (
    CHAT,
    COMPLETIONS,
    EMBEDDING_SIZE,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    HttpError,
    Reply,
    ScriptedLLM,
    Served,
    Stream,
    Tokens,
)

MODEL = "gpt-4o-mini-2024-07-18"


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def client(srv: ScriptedLLM, **kwargs: Any) -> Any:
    return openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, **kwargs)


def chat_tokens(u: Any) -> Tokens:
    """A chat or legacy completions usage, as the client parsed it."""
    return Tokens(u.prompt_tokens, u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0,
                  u.completion_tokens,
                  u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0)


def responses_tokens(u: Any) -> Tokens:
    return Tokens(u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens,
                  u.output_tokens_details.reasoning_tokens)


def post(srv: ScriptedLLM, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST with urllib (for the Anthropic route, which the openai client does not speak)."""
    request = urllib.request.Request(f"{srv.base_url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields.get("event"), fields["data"]))
    return events


# -- chat completions ---------------------------------------------------------------------------------------
def test_chat_completion_usage_seen_by_the_client_is_what_was_served() -> None:
    with ScriptedLLM([Reply("hello there", usage=usage(100, 20, cached=40, reasoning=5))]) as srv:
        answer = client(srv).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hello there"
    assert [s.usage for s in srv.served] == [chat_tokens(answer.usage)] == [Tokens(100, 40, 20, 5)]
    assert srv.served == [Served(1, CHAT, 200, MODEL, Tokens(100, 40, 20, 5), False, True, "Bearer k")]
    assert srv.served_totals() == Tokens(100, 40, 20, 5)


def test_chat_stream_without_include_usage_sends_no_usage_chunk() -> None:
    with ScriptedLLM([Reply("one two three four", usage=usage(50, 4))]) as srv:
        chunks = list(client(srv).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == ["one ", "two ", "three ", "four"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the endpoint still served (and would bill) the tokens
    assert srv.served == [Served(1, CHAT, 200, MODEL, Tokens(50, 0, 4, 0), True, True, "Bearer k")]
    assert srv.requests[0].body["stream"] is True


def test_chat_stream_with_include_usage_ends_with_one_usage_chunk() -> None:
    with ScriptedLLM([Reply("a b c", usage=usage(70, 3, cached=10, reasoning=1))]) as srv:
        chunks = list(client(srv).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
    assert [c.choices for c in chunks].count([]) == 1
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert [chat_tokens(chunks[-1].usage)] == [s.usage for s in srv.served] == [Tokens(70, 10, 3, 1)]
    assert srv.served_totals() == Tokens(70, 10, 3, 1)


def test_streamed_tool_calls_reach_the_client() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    with ScriptedLLM([Reply(None, tool_calls=[call])]) as srv:
        chunks = list(client(srv).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.id, tc.function.name, tc.function.arguments) for tc in calls] == [("call_1", "f", '{"x": 1}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- legacy completions ----------------------------------------------------------------------------------------
def test_legacy_completions_plain_and_streamed() -> None:
    script = [Reply("once upon", usage=usage(9, 2)), Reply("a time", usage=usage(8, 2)), Reply("x", usage=usage(7, 1))]
    with ScriptedLLM(script) as srv:
        c = client(srv)
        plain = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="tell")
        streamed = list(c.completions.create(model="gpt-3.5-turbo-instruct", prompt="tell", stream=True))
        counted = list(c.completions.create(model="gpt-3.5-turbo-instruct", prompt="tell", stream=True,
                                            stream_options={"include_usage": True}))
    assert plain.object == "text_completion" and plain.choices[0].text == "once upon"
    assert "".join(ch.choices[0].text for ch in streamed) == "a time"
    assert len(streamed) == 3 and all(ch.usage is None for ch in streamed)
    assert counted[-1].choices == [] and chat_tokens(counted[-1].usage) == Tokens(7, 0, 1, 0)
    assert [s.usage for s in srv.served] == [chat_tokens(plain.usage), Tokens(8, 0, 2, 0), Tokens(7, 0, 1, 0)]
    assert [(s.route, s.stream, s.complete) for s in srv.served] == [(COMPLETIONS, False, True),
                                                                     (COMPLETIONS, True, True),
                                                                     (COMPLETIONS, True, True)]
    assert srv.served_totals(COMPLETIONS) == Tokens(24, 0, 5, 0)


# -- embeddings ------------------------------------------------------------------------------------------------
def test_embeddings_one_vector_per_input_and_prompt_tokens_only() -> None:
    script = [Reply(None, model="text-embedding-3-small", usage=usage(12, 0)),
              Reply(None, model="text-embedding-3-small", usage=usage(5, 99, cached=3, reasoning=2)),
              Reply(None, usage=usage(4, 0))]
    with ScriptedLLM(script) as srv:
        c = client(srv)
        many = c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta", "gamma"])
        one = c.embeddings.create(model="text-embedding-3-small", input="alpha")
        floats = c.embeddings.create(model="text-embedding-3-small", input="alpha", encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    assert all(len(d.embedding) == EMBEDDING_SIZE and all(isinstance(x, float) for x in d.embedding)
               for d in many.data)
    assert many.data[0].embedding == one.data[0].embedding == floats.data[0].embedding  # deterministic
    assert many.data[0].embedding != many.data[1].embedding
    assert (one.usage.prompt_tokens, one.usage.total_tokens) == (5, 5)
    assert srv.served[1] == Served(2, EMBEDDINGS, 200, "text-embedding-3-small", Tokens(prompt_tokens=5),
                                   False, True, "Bearer k")
    assert [s.usage for s in srv.served] == [Tokens(u.prompt_tokens) for u in (many.usage, one.usage, floats.usage)]


# -- responses -------------------------------------------------------------------------------------------------
def test_responses_plain() -> None:
    with ScriptedLLM([Reply("the answer", usage=usage(300, 40, cached=200, reasoning=16))]) as srv:
        answer = client(srv).responses.create(model="gpt-4o-mini", input="question")
    assert answer.object == "response" and answer.output_text == "the answer"
    assert answer.output[0].type == "message" and answer.output[0].content[0].type == "output_text"
    assert answer.usage.total_tokens == 340
    assert [responses_tokens(answer.usage)] == [s.usage for s in srv.served] == [Tokens(300, 200, 40, 16)]
    assert srv.served[0].route == RESPONSES and not srv.served[0].stream


def test_responses_streamed_usage_in_response_completed() -> None:
    with ScriptedLLM([Reply("streamed words here", usage=usage(30, 3, cached=10, reasoning=1))]) as srv:
        events = list(client(srv).responses.create(model="gpt-4o-mini", input="q", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 3
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "streamed words here"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.output_text == "streamed words here"
    assert [responses_tokens(done.usage)] == [s.usage for s in srv.served] == [Tokens(30, 10, 3, 1)]
    assert srv.served[0].stream and srv.served[0].complete


# -- Anthropic messages ----------------------------------------------------------------------------------------
def test_messages_plain_reports_cache_reads_apart_from_input() -> None:
    with ScriptedLLM([Reply("bonjour", model="claude-x", usage=usage(100, 20, cached=60, reasoning=4))]) as srv:
        status, text = post(srv, "/messages", {"model": "claude-x", "max_tokens": 10, "messages": []},
                            {"x-api-key": "anthropic-key"})
    answer = json.loads(text)
    assert status == 200 and answer["type"] == "message" and answer["content"] == [{"type": "text", "text": "bonjour"}]
    assert answer["stop_reason"] == "end_turn"
    u = answer["usage"]
    assert (u["input_tokens"], u["cache_read_input_tokens"], u["output_tokens"]) == (40, 60, 20)
    # reasoning is not reported by this API: it is part of the output tokens
    assert srv.served == [Served(1, MESSAGES, 200, "claude-x", Tokens(100, 60, 20, 0), False, True, None)]
    assert srv.requests[0].api_key == "anthropic-key" and srv.requests[0].authorization is None


def test_messages_streamed_events() -> None:
    with ScriptedLLM([Reply("un deux trois", usage=usage(50, 7, cached=5))]) as srv:
        status, text = post(srv, "/messages", {"model": "claude-x", "stream": True, "messages": []})
    events = sse_events(text)
    kinds = [k for k, _ in events]
    assert status == 200
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == k for k, d in zip(kinds, data))
    assert "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta") == "un deux trois"
    start, delta = data[0]["message"]["usage"], data[-2]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"], delta["output_tokens"]) == (45, 5, 7)
    assert "[DONE]" not in text
    assert srv.served_totals() == Tokens(50, 5, 7, 0)


def test_messages_errors_are_anthropic_shaped() -> None:
    with ScriptedLLM([HttpError(429, "slow down")]) as srv:
        status, text = post(srv, "/messages", {"model": "claude-x", "messages": []})
    assert status == 429
    assert json.loads(text) == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert srv.served == [Served(1, MESSAGES, 429, None, None, False, True, None)]


# -- slow streams, cut streams ---------------------------------------------------------------------------------
def test_stream_item_pieces_and_plain_answer() -> None:
    assert Stream("ab cd ef", chunks=3).pieces() == ["ab ", "cd ", "ef"]
    assert Stream("abcdef", chunks=["ab", "cdef"]).pieces() == ["ab", "cdef"]
    assert Stream("one  two").pieces() == ["one  ", "two"]
    with pytest.raises(ValueError, match="must join to the content"):
        Stream("abc", chunks=["a", "b"])
    with ScriptedLLM([Stream("not streamed after all", pause_s=5)]) as srv:
        answer = client(srv).chat.completions.create(model="m", messages=[])  # no stream: answered at once
    assert answer.choices[0].message.content == "not streamed after all"
    assert srv.served[0].complete and not srv.served[0].stream


def test_a_client_that_goes_away_mid_stream_leaves_an_incomplete_record() -> None:
    script = [Stream("w " * 40, pause_s=0.05, usage=usage(11, 40)), Reply("next", usage=usage(3, 1))]
    with ScriptedLLM(script) as srv:
        c = client(srv)
        stream = c.chat.completions.create(model="m", messages=[], stream=True, stream_options={"include_usage": True})
        first = [next(stream), next(stream)]
        stream.close()
        (cut,) = srv.wait_served(1)
        c.chat.completions.create(model="m", messages=[])
    assert first[1].choices[0].delta.content == "w "
    assert (cut.status, cut.stream, cut.complete, cut.usage) == (200, True, False, Tokens(11, 0, 40, 0))
    assert srv.served_totals() == Tokens(3, 0, 1, 0)  # only what was sent completely


def test_stopping_the_server_cuts_a_stream_the_client_sees_it() -> None:
    srv = ScriptedLLM([Stream("slow " * 20, pause_s=30)]).start()
    try:
        stream = client(srv, timeout=20).chat.completions.create(model="m", messages=[], stream=True)
        assert next(stream).choices[0].delta.role == "assistant"
        outcome: list[BaseException] = []
        reader = threading.Thread(target=lambda: outcome.extend(_drain(stream)))
        reader.start()
    finally:
        srv.stop()
    reader.join(10)
    assert not reader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], openai.APIConnectionError)
    assert [(s.complete, s.stream) for s in srv.served] == [(False, True)]


def _drain(stream: Any) -> list[BaseException]:
    try:
        list(stream)
    except Exception as exc:  # noqa: BLE001 - the test checks which error it was
        return [exc]
    return []


KILLED_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="task-token", max_retries=0)
for chunk in c.chat.completions.create(model="m", messages=[], stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, flush=True)
"""


@pytest.mark.slow
def test_killing_a_client_process_mid_stream() -> None:
    with ScriptedLLM([Stream("x " * 200, pause_s=0.05)]) as srv:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, srv.base_url], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        with proc.stdout:
            try:
                assert proc.stdout.readline() == "x \n"
            finally:
                proc.kill()
                proc.wait()
        (cut,) = srv.wait_served(1)
    assert (cut.complete, cut.authorization) == (False, "Bearer task-token")
    assert srv.requests[0].api_key == "task-token"


# -- errors, records, concurrency ------------------------------------------------------------------------------
def test_errors_on_stream_requests_and_unknown_routes_are_recorded() -> None:
    with ScriptedLLM([HttpError(429, retry_after=0), HttpError(500)]) as srv:
        c = client(srv)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="m", messages=[], stream=True)
        with pytest.raises(openai.InternalServerError):
            c.responses.create(model="m", input="q", stream=True)
        status, _ = post(srv, "/nowhere", {})
    assert status == 404
    assert [(s.route, s.status, s.usage, s.model) for s in srv.served] == [
        (CHAT, 429, None, None), (RESPONSES, 500, None, None), ("/v1/nowhere", 404, None, None)]
    assert srv.served_totals() == Tokens()
    assert srv.remaining == 0


def test_every_request_records_the_key_it_came_with() -> None:
    with ScriptedLLM([Reply("a"), Reply("b")]) as srv:
        openai.OpenAI(base_url=srv.base_url, api_key="first").chat.completions.create(model="m", messages=[])
        openai.OpenAI(base_url=srv.base_url, api_key="second").embeddings.create(model="e", input="x")
    assert [r.authorization for r in srv.requests] == ["Bearer first", "Bearer second"]
    assert [r.api_key for r in srv.requests] == ["first", "second"]
    assert [s.authorization for s in srv.served] == ["Bearer first", "Bearer second"]


def test_concurrent_streams_are_each_served_once() -> None:
    def answer(body: Any) -> Reply:
        return Reply(f"answer for {body['messages'][0]['content']}", usage=usage(10, 2, cached=1))

    seen: list[str] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        c = openai.OpenAI(base_url=srv.base_url, api_key=f"t{n}", max_retries=0)
        for i in range(3):
            chunks = c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"{n}.{i}"}],
                                               stream=True, stream_options={"include_usage": True})
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            with lock:
                seen.append(text)

    with ScriptedLLM(answer) as srv:
        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(seen) == sorted(f"answer for {n}.{i}" for n in range(8) for i in range(3))
    assert len(srv.served) == 24 and all(s.complete for s in srv.served)
    assert sorted({s.number for s in srv.served}) == list(range(1, 25))
    assert srv.served_totals() == Tokens(240, 24, 48, 0)
