"""The metering gateway end to end: tasks that declare ``models`` run scripts with the real ``openai``
client, through their rank's gateway, to a scripted OpenAI-compatible endpoint on 127.0.0.1; the CLI
in a subprocess, as users run it. What the ledger says is held against what the endpoint served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env, cli
from tests.helpers.metering import KEY, intents, ledger, served, tokens, usage
from tests.helpers.runs import read_run
from tests.helpers.scripted_llm import HttpError, Reply, ScriptedLLM, Stream

pytest.importorskip("openai", reason="the task scripts use the openai client (the 'agents' extra)")

pytestmark = pytest.mark.slow  # runs of the CLI, each with a gateway process

PRICE = {"prompt_per_1m": 2.0, "cached_prompt_per_1m": 0.5, "completion_per_1m": 8.0}


def write_spec(tmp_path: Path, url: str, tasks: str, *, budget: str = "", workers: int = 2, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"version: 1\njob:\n  name: gw\n{budget}"
        f"execution:\n  max_workers: {workers}\n  keep_going: true\n  retries: 0\n{extra}"
        "llm:\n  models:\n"
        f"    mini:\n      model: gpt-4o-mini\n      base_url: {url}\n      api_key_env: TEST_REAL_KEY\n"
        f"      timeout: 5\n      price: {json.dumps(PRICE)}\n"
        f"    other:\n      model: other-model\n      base_url: {url}\n      api_key_env: TEST_REAL_KEY\n"
        f"      price: {json.dumps(PRICE)}\n"
        f"tasks:\n{textwrap.indent(textwrap.dedent(tasks), '  ')}")
    return path


def script(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / name).write_text("import json, os, sys\nimport openai\n" + textwrap.dedent(body))


def run(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = clean_env(tmp_path, TEST_REAL_KEY=KEY)
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return cli(tmp_path, "run", str(tmp_path / "job.yaml"), *args, env=env, timeout=timeout)


CALLS = """\
    client = openai.OpenAI()
    model = os.environ["CMBAGENT_MODEL"]
    out = {"key_is_token": os.environ["OPENAI_API_KEY"].startswith("cbk-")}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    out["chat"] = [r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens]
    pieces, usage_chunks = [], 0
    for chunk in client.chat.completions.create(model=model, stream=True,
                                                messages=[{"role": "user", "content": "stream please"}]):
        usage_chunks += chunk.usage is not None
        pieces += [c.delta.content or "" for c in chunk.choices]
    out["stream"] = ["".join(pieces), usage_chunks]
    seen = None
    for chunk in client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "with usage"}]):
        seen = chunk.usage or seen
    out["stream_usage"] = [seen.prompt_tokens, seen.completion_tokens]
    e = client.embeddings.create(model=model, input=["a", "b"])
    out["embeddings"] = [len(e.data), e.usage.prompt_tokens]
    t = client.completions.create(model=model, prompt="say hi")
    out["completion"] = t.usage.completion_tokens
    resp = client.responses.create(model=model, input="respond")
    out["responses"] = [resp.output_text, resp.usage.input_tokens, resp.usage.output_tokens]
    json.dump(out, open("calls.json", "w"))
"""


def test_a_shell_task_s_openai_calls_are_metered_to_the_token_and_the_ledger_verifies(tmp_path: Path) -> None:
    script(tmp_path, "calls.py", CALLS)
    replies = [Reply("hi there", usage=usage(11, 3)), Reply("a streamed answer", usage=usage(20, 4, cached=8)),
               Reply("again", usage=usage(30, 5, reasoning=2)), Reply(None, usage=usage(7, 0)),
               Reply("hi", usage=usage(9, 2)), Reply("responded", usage=usage(13, 6, cached=4, reasoning=1))]
    with ScriptedLLM(replies) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: ask
              kind: shell
              models: [mini]
              run: {sys.executable} {tmp_path / 'calls.py'}
              outputs: [calls.json]
            """)
        result = run(tmp_path)
        assert result.returncode == 0, result.stderr
        got = json.loads((tmp_path / "runs/gw/outputs").rglob("calls.json").__next__().read_text())
        assert got["key_is_token"] is True
        assert got["chat"] == ["hi there", 11, 3]
        assert got["stream"] == ["a streamed answer", 0]  # the usage chunk it did not ask for is not shown
        assert got["stream_usage"] == [30, 5]
        assert got["embeddings"] == [2, 7]
        assert got["responses"][1:] == [13, 6]
        assert {r.headers.get("authorization") for r in srv.requests} == {f"Bearer {KEY}"}  # the real key, upstream
        entries = ledger(tmp_path / "runs/gw")
        assert len(entries) == 6 and {e["status"] for e in entries} == {"ok"}
        assert {(e["source"], e["task"], e["attempt"], e["model"]) for e in entries} == {("task", "ask", 1, "mini")}
        assert tokens(entries) == served(srv)
        assert sorted(e["call"] for e in entries) == [1, 2, 3, 4, 5, 6]
    cost = sum(e["cost_usd"] for e in entries)
    manifest = read_run(tmp_path / "runs/gw")
    assert manifest["tasks"]["ask"]["state"] == "succeeded"
    verified = cli(tmp_path, "ledger", "verify", str(tmp_path / "runs/gw"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = cli(tmp_path, "ledger", "summarize", str(tmp_path / "runs/gw"), "--by", "task", check=True).stdout
    assert "ask" in summary and f"{cost:.6f}"[:6] in summary.replace("$", "")


def test_the_real_key_is_in_no_task_environment_and_no_file_of_the_run(tmp_path: Path) -> None:
    watch = """\
        import time
        open(f"pid-{os.environ['CMBAGENT_TASK_ID']}", "w").write(str(os.getpid()))
        client = openai.OpenAI()
        client.chat.completions.create(model=os.environ["CMBAGENT_MODEL"], messages=[{"role": "user", "content": "x"}])
        deadline = time.time() + 20
        while not os.path.exists("release") and time.time() < deadline:
            time.sleep(0.05)
        print(open(f"/proc/{os.getpid()}/environ", "rb").read().replace(b"\\0", b"\\n").decode())
    """
    script(tmp_path, "watch.py", watch)
    with ScriptedLLM([Reply("x"), Reply("y")]) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: shelly
              kind: shell
              models: [mini]
              run: cd {tmp_path} && {sys.executable} watch.py
            - id: plain
              kind: shell
              run: env > env.txt; tr '\\0' '\\n' < /proc/$$/environ >> env.txt; tr '\\0' '\\n' < /proc/$PPID/environ > runner.txt
              outputs: [env.txt, runner.txt]
            - id: pyth
              kind: python
              models: [mini]
              call: pytask:main
            """)
        (tmp_path / "pytask.py").write_text(textwrap.dedent("""\
            import os
            def main():
                open("environ.txt", "w").write(open(f"/proc/{os.getpid()}/environ", "rb").read().decode("latin-1"))
                return dict(os.environ)
            """))
        env = clean_env(tmp_path, TEST_REAL_KEY=KEY)
        proc = subprocess.Popen([sys.executable, "-m", "cmbagent_batch", "run", str(tmp_path / "job.yaml")],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pid_file = tmp_path / "pid-shelly"
            for _ in range(400):
                if pid_file.exists() and pid_file.read_text():
                    break
                subprocess.run(["sleep", "0.05"])
            pid = int(pid_file.read_text())
            seen = Path(f"/proc/{pid}/environ").read_bytes()
            assert KEY.encode() not in seen and b"OPENAI_API_KEY=cbk-" in seen
            (tmp_path / "release").touch()
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
    run_dir = tmp_path / "runs/gw"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert "TEST_REAL_KEY" not in next(run_dir.rglob("env.txt")).read_text()
    runner = next(run_dir.rglob("runner.txt")).read_text()  # the runner's own initial environment, overwritten
    assert "CMBAGENT_RUN_DIR" not in runner and f"TEST_REAL_KEY={'*' * len(KEY)}" in runner.splitlines()
    returned = json.loads(next(run_dir.rglob("return.json")).read_text())
    assert returned["OPENAI_API_KEY"].startswith("cbk-") and "TEST_REAL_KEY" not in returned


def test_a_task_over_its_budget_is_refused_its_next_call_and_the_run_says_why(tmp_path: Path) -> None:
    script(tmp_path, "spend.py", """\
        client = openai.OpenAI()
        for n in range(3):
            try:
                client.chat.completions.create(model="mini", messages=[{"role": "user", "content": str(n)}])
            except openai.APIStatusError as exc:
                print(exc.status_code, exc.body, file=sys.stderr)
                sys.exit(1)
    """)
    with ScriptedLLM([Reply("a", usage=usage(1_000_000, 0)), Reply("b", usage=usage(10, 1))]) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: spender
              kind: shell
              models: [mini]
              budget_usd: 1.5
              run: {sys.executable} {tmp_path / 'spend.py'}
            """)
        result = run(tmp_path)
        assert len(srv.completions) == 1  # the second call never reached the endpoint
    assert result.returncode != 0
    task = read_run(tmp_path / "runs/gw")["tasks"]["spender"]
    assert task["state"] == "budget_exceeded"
    assert "a model call was refused: the task's LLM budget is spent: $2.00 of budget_usd $1.50" in task["reason"]
    assert len(ledger(tmp_path / "runs/gw")) == 1


def test_eight_tasks_of_25_calls_each_at_once_are_counted_once_each(tmp_path: Path) -> None:
    script(tmp_path, "many.py", """\
        from concurrent.futures import ThreadPoolExecutor
        client = openai.OpenAI(max_retries=0)
        def one(n):
            if n % 2:
                chunks = client.chat.completions.create(model="mini", stream=True, messages=[{"role": "user", "content": str(n)}])
                return sum(1 for _ in chunks)
            return client.chat.completions.create(model="mini", messages=[{"role": "user", "content": str(n)}]).usage.total_tokens
        with ThreadPoolExecutor(5) as pool:
            print(list(pool.map(one, range(25))))
    """)
    with ScriptedLLM(lambda body: Reply("counted " * 3, usage=usage(len(str(body)), 7, cached=1))) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: "w{{n}}"
              kind: shell
              models: [mini]
              matrix: {{n: [0, 1, 2, 3, 4, 5, 6, 7]}}
              run: {sys.executable} {tmp_path / 'many.py'}
            """, workers=8)
        result = run(tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(srv.completions) == 200
        entries = ledger(tmp_path / "runs/gw")
        assert len(entries) == 200 and len({e["id"] for e in entries}) == 200
        assert tokens(entries) == served(srv)
        assert {e["task"]: 0 for e in entries}.keys() == {f"w{n}" for n in range(8)}
        assert all(sum(1 for e in entries if e["task"] == f"w{n}") == 25 for n in range(8))
    assert not [i for i in intents(tmp_path / "runs/gw") if not i["paired"]]


def test_faults_a_stale_token_an_undeclared_model_an_endpoint_error_and_a_kill_mid_stream(tmp_path: Path) -> None:
    script(tmp_path, "first.py", """\
        open("token", "w").write(os.environ["OPENAI_API_KEY"])
        open("base", "w").write(os.environ["OPENAI_BASE_URL"])
    """)
    script(tmp_path, "second.py", """\
        client = openai.OpenAI(max_retries=0)
        out = {}
        stale = openai.OpenAI(api_key=open(sys.argv[1]).read(), max_retries=0)
        for name, call in [("stale", lambda: stale.chat.completions.create(model="mini", messages=[])),
                           ("undeclared", lambda: client.chat.completions.create(model="other", messages=[])),
                           ("error", lambda: client.chat.completions.create(model="mini", messages=[]))]:
            try:
                call()
                out[name] = "answered"
            except openai.APIStatusError as exc:
                out[name] = [exc.status_code, exc.body.get("code") if isinstance(exc.body, dict) else exc.body]
        json.dump(out, open("faults.json", "w"))
    """)
    script(tmp_path, "slow.py", """\
        client = openai.OpenAI(max_retries=0)
        for chunk in client.chat.completions.create(model="mini", stream=True, messages=[{"role": "user", "content": "long"}]):
            print(chunk.choices[0].delta.content if chunk.choices else "", flush=True)
    """)
    replies = [HttpError(500, f"the model had a bad day with key {KEY}"),
               Stream("one two three four five six seven eight nine ten " * 12, pause_s=0.2)]
    with ScriptedLLM(replies) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: first
              kind: shell
              models: [mini]
              run: {sys.executable} {tmp_path / 'first.py'}
              outputs: [token]
            - id: second
              kind: shell
              models: [mini]
              depends_on: [first]
              inputs: [token]
              run: {sys.executable} {tmp_path / 'second.py'} token
              outputs: [faults.json]
            - id: slow
              kind: shell
              models: [mini]
              depends_on: [second]
              timeout: 6  # python and openai start within it on a loaded machine; the stream lasts 24 s
              run: {sys.executable} {tmp_path / 'slow.py'}
            """, extra="  kill_grace: 0.5\n")
        result = run(tmp_path)
    run_dir = tmp_path / "runs/gw"
    faults = json.loads(next((run_dir / "outputs").rglob("faults.json")).read_text())
    assert faults["stale"] == [401, "token_expired"]
    assert faults["undeclared"] == [403, "model_not_declared"]
    assert faults["error"][0] == 500 and KEY not in json.dumps(faults)
    entries = ledger(run_dir)
    assert [(e["task"], e["status"], e["error"]) for e in entries] == [
        ("second", "error", "500: the model had a bad day with key [redacted]")]
    assert read_run(run_dir)["tasks"]["slow"]["state"] == "failed"
    cut = [i for i in intents(run_dir) if not i["paired"]]
    assert [(i["task"], i["model"]) for i in cut] == [("slow", "mini")] and cut[0]["prompt_chars"] == len("long")
    assert "possibly billed" in result.stderr
    summary = cli(tmp_path, "ledger", "summarize", str(run_dir), "--by", "task").stdout
    assert "possibly billed" in summary


def test_under_mpi_each_worker_rank_meters_its_tasks_calls_in_its_own_journal(tmp_path: Path) -> None:
    from tests.helpers.mpi_run import MPIEXEC

    if MPIEXEC is None:
        pytest.skip("mpiexec is not installed (the 'mpi' extra)")
    script(tmp_path, "one.py", """\
        r = openai.OpenAI().chat.completions.create(model="mini", messages=[{"role": "user", "content": "x"}])
        open("rank.txt", "w").write(os.environ["CMBAGENT_RANK"])
    """)
    (tmp_path / "pycall.py").write_text(textwrap.dedent("""\
        import os
        import openai
        def ask(n):
            reply = openai.OpenAI().embeddings.create(model=os.environ["CMBAGENT_MODEL"], input=[str(n)])
            return {"rank": int(os.environ["CMBAGENT_RANK"]), "tokens": reply.usage.prompt_tokens}
        """))
    with ScriptedLLM(lambda body: Reply("x", usage=usage(5, 1))) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: "sh{{n}}"
              kind: shell
              models: [mini]
              matrix: {{n: [1, 2, 3, 4]}}
              run: {sys.executable} {tmp_path / 'one.py'}
              outputs: [rank.txt]
            - id: "py{{n}}"
              kind: python
              models: [mini]
              matrix: {{n: [1, 2, 3, 4]}}
              call: pycall:ask
              args: {{n: "{{n}}"}}
            """, extra="  backend: mpi\n")
        env = clean_env(tmp_path, TEST_REAL_KEY=KEY)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        result = cli(tmp_path, "run", "job.yaml", env=env, timeout=240, launcher=(MPIEXEC, "-n", "3"))
        assert result.returncode == 0, result.stderr
        run_dir = tmp_path / "runs/gw"
        entries = ledger(run_dir)
        assert len(entries) == 8 and tokens(entries) == served(srv)
    ranks = {e["task"]: e["rank"] for e in entries}
    assert set(ranks.values()) <= {1, 2} and len(set(ranks.values())) == 2, ranks  # both workers, never rank 0
    for n in range(1, 5):
        assert read_run(run_dir)["tasks"][f"sh{n}"]["rank"] == ranks[f"sh{n}"]
    assert sorted(p.name for p in (run_dir / "gateway").iterdir()) == ["rank-0001.log", "rank-0002.log"]


def test_a_runner_killed_mid_stream_leaves_the_call_possibly_billed_and_the_next_run_says_so(tmp_path: Path) -> None:
    script(tmp_path, "slow.py", """\
        client = openai.OpenAI(max_retries=0)
        for chunk in client.chat.completions.create(model="mini", stream=True, messages=[{"role": "user", "content": "long"}]):
            open("streaming", "w").write("yes")
    """)
    with ScriptedLLM([Stream("word " * 200, pause_s=0.1), Stream("again " * 3)]) as srv:
        write_spec(tmp_path, srv.base_url, f"""\
            - id: slow
              kind: shell
              models: [mini]
              run: {sys.executable} {tmp_path / 'slow.py'}
            """)
        env = clean_env(tmp_path, TEST_REAL_KEY=KEY)
        runner = subprocess.Popen([sys.executable, "-m", "cmbagent_batch", "run", "job.yaml"], cwd=tmp_path,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _ in range(600):
                if list((tmp_path / "runs/gw").rglob("streaming")):
                    break
                subprocess.run(["sleep", "0.05"])
            else:
                pytest.fail("the task never started streaming")
        finally:
            os.killpg(runner.pid, 9)  # the runner, its gateway and its task, at once
            runner.wait()
        srv.wait_served(1)
        again = run(tmp_path)  # the next run merges what the killed one journaled
        assert again.returncode == 0, again.stderr
    run_dir = tmp_path / "runs/gw"
    cut = [i for i in intents(run_dir) if not i["paired"]]
    assert [(i["task"], i["attempt"], i["prompt_chars"]) for i in cut] == [("slow", 1, 4)]
    assert "possibly billed" in again.stderr
    assert [(e["task"], e["attempt"], e["status"]) for e in ledger(run_dir)] == [("slow", 2, "ok")]

