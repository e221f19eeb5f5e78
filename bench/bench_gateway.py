"""The metering gateway's cost to a call: the scripted endpoint called directly, and through the gateway.

Run as ``python bench/bench_gateway.py [--quick] [--calls N] [--clients N] [--streams-per-client N]
[--rounds N] [--one-grant]`` with the interpreter of a venv where cmbagent-batch and
its ``agents`` extra (``openai``) are installed, from a checkout (the endpoint is
``tests/helpers/scripted_llm.py``).

Three processes on 127.0.0.1: this one (the clients: the real ``openai`` client over HTTP), the scripted
endpoint (``ScriptedLLM`` in a subprocess, answering every request with the same 20-piece answer), and
a gateway started by the runner's own code (``gateway.client.gateway``), with grants opened as the runner
opens them (``Grant``, ``Route``, ``new_token``) and the real key held away (``hold_keys``). Each call
goes one of three ways, the arms:

- **direct**: the client to the endpoint (the baseline);
- **gateway**: through the gateway, whose grants meter to a run directory on disk (as a run's would);
- **gateway tmpfs**: the same with the run directory under /dev/shm, where an fsync costs nothing; the
  difference between the two is what the ledger's durable writes cost;
- with ``--one-grant``, in the throughput figure only: **gateway, one grant**, on disk, all clients on one
  grant (one attempt making concurrent calls), whose calls are metered under one lock.

1. Added latency per call: after ``WARMUP`` unmeasured calls each way, ``--calls`` sequential non-streaming
   chat completions each way (one ``openai.OpenAI`` per arm, connections kept alive), in blocks that
   alternate the arms (``--rounds`` blocks; the order reversed every other round), so a change in the
   machine's load hits every arm. p50 and p99 of each arm, and the gateway's minus direct's (of each
   percentile); target at most 2 ms added at p50. The cpu column is the gateway process's CPU per call.
2. Throughput at ``--clients`` concurrent streaming clients: asyncio, one ``openai.AsyncOpenAI`` per client
   (each with its own grant through the gateway, as concurrent tasks have; one connection pool), each making
   ``--streams-per-client`` streamed chat completions (20 content pieces, no pause) one after another,
   after one unmeasured call each that opens its connection; ``--rounds`` rounds alternating the arms.
   Calls per second of each arm (all calls / summed wall), the gateway's over direct's; target at least
   90%. asyncio rather than 64 threads (one ``openai.OpenAI`` each): it costs the client less CPU per call
   (~8 ms against 9 to 10 ms per streamed call, measured here), and the client is the largest user of the
   2 cores the three processes share.
   So the CPU seconds of each process per call are reported too (``psutil``), the gateway's being the
   figure that matters on a node where the tasks and the endpoint are elsewhere: the calls per second
   one core of gateway could carry is printed beside it. And the ratio CPU alone would give (all three
   processes' CPU per call, direct's over the arm's): with the cores shared, and other work on the
   machine, wall-clock ratios move from round to round (printed), CPU per call much less.
3. Metering: once the grants are closed, every gateway run directory's ``ledger/rank-0000.jsonl`` must
   hold exactly one result per call made through it (warm-ups included), each ``ok``, with distinct ids,
   and ``intents-0000.jsonl`` one intent per call; and the endpoint must have served every call of every
   arm. A mismatch is an ERROR (exit status 1): figures of a gateway that did not meter everything.

The endpoint is ``ScriptedLLM`` itself, in a subprocess. Its handler sets TCP_NODELAY (without it, an
answer's headers and body, two writes, wait for the client's delayed ACK: ~40 ms a call, which would hide
the gateway entirely) and it listens with a backlog of 1,024 (64 clients connect at once); its threads
use about a tenth of a core at the rates measured here: the endpoint is not what caps them (its busy
share of a core is printed).

``--quick``: 60 calls each way after 5 warm-ups, 2 blocks; 64 clients x 3 streams, one round: a smoke
run (well under 30 s), whose figures mean little. Exit status 0 whatever the figures (benchmarks report,
they do not gate); 1 only when a call failed or the metering check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab
import openai
import psutil
import specgen
from openai.types.chat import ChatCompletionMessageParam
from specgen import CommandFailed, Row, verdict

from cmbagent_batch.gateway import client as gateway_client
from cmbagent_batch.gateway.client import GatewayProcess
from cmbagent_batch.gateway.grants import Grant, Route, Spent, new_token
from cmbagent_batch.gateway.keys import hold_keys
from cmbagent_batch.ledger.files import intents_journal_path, journal_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: tests.helpers
ADDED_P50_TARGET_MS = 2.0  # gateway minus direct, p50, at most
THROUGHPUT_TARGET = 0.9  # gateway calls/s over direct calls/s, at least
WARMUP = 20
PIECES = 20
CONTENT = "".join(f"piece-{i:02d} " for i in range(PIECES))  # 20 pieces of 9 characters
MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say twenty things."}]
KEY_ENV = "CMBAGENT_BENCH_GATEWAY_KEY"  # the "real" key: the gateway sends it on, the clients never see it
PRICE = {"prompt_per_1m": 0.15, "cached_prompt_per_1m": 0.075, "completion_per_1m": 0.6}
CLIENT_TIMEOUT_S = 120.0

UPSTREAM = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.helpers.scripted_llm import ScriptedLLM, Stream

item = Stream(sys.argv[2], chunks=int(sys.argv[3]))
with ScriptedLLM(lambda body: item) as srv:
    print(json.dumps({"port": srv.port}), flush=True)
    sys.stdin.read()  # until the benchmark is done
    served = srv.served
    print(json.dumps({"served": len(served), "complete": sum(s.status == 200 and s.complete for s in served),
                      "failures": srv.failures[:3]}), flush=True)
"""


# ---------------------------------------------------------------------------------------------------
# The three processes


class Upstream:
    """The scripted endpoint, in its own process."""

    def __init__(self, log: IO[bytes]) -> None:
        cmd = [sys.executable, "-c", UPSTREAM, ROOT, CONTENT, str(PIECES)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench_gateway: the scripted endpoint did not start (exit code {self.proc.wait()})")
        self.url = f"http://127.0.0.1:{json.loads(line)['port']}/v1"

    def stop(self) -> dict[str, object]:
        """Stop it; what it served."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(30)
        return json.loads(line) if line else {}


@dataclass
class Arm:
    """One way to the endpoint: direct (``run_dir`` None) or through the gateway, metering to ``run_dir``."""

    name: str
    url: str
    run_dir: str | None = None
    route: Route | None = None
    gateway: GatewayProcess | None = None
    one_grant: bool = False  # throughput: all its clients on one grant (one attempt's concurrent calls)
    tokens: list[str] = field(default_factory=list)
    calls: int = 0  # calls answered whole, warm-ups included
    spent: list[Spent] = field(default_factory=list)

    def key(self) -> str:
        """A key for one client: through the gateway, the token of a grant opened for it now."""
        if self.gateway is None or self.route is None or self.run_dir is None:
            return "sk-direct-bench"
        n = len(self.tokens)
        grant = Grant(task=f"bench-{n:03d}", attempt=1, rank=0, host="localhost", run_dir=self.run_dir,
                      job="bench-gateway", run_id="bench", source="task", agent=None, routes=(self.route,))
        token = new_token()
        self.gateway.open(token, grant)
        self.tokens.append(token)
        return token

    def close(self) -> None:
        """Close its grants, as the runner does at the end of each attempt; what their calls came to is kept."""
        while self.gateway is not None and self.tokens:
            self.spent.append(self.gateway.close(self.tokens.pop()))


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@dataclass
class Procs:
    """The processes whose CPU is counted: the clients (this one), the endpoint, the gateway."""

    client: psutil.Process
    upstream: psutil.Process
    gateway: psutil.Process

    def snapshot(self) -> tuple[float, float, float]:
        return cpu_s(self.client), cpu_s(self.upstream), cpu_s(self.gateway)


def fs_type(path: str) -> str:
    """The type of the file system ``path`` is on (``/proc/mounts``), or ``?``."""
    path, best, kind = os.path.realpath(path), "", "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


# ---------------------------------------------------------------------------------------------------
# Figure 1: added latency, sequential non-streaming calls


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (p99 of 300 values: the 297th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def one_call(client: openai.OpenAI) -> None:
    try:
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    except openai.OpenAIError as exc:
        raise CommandFailed(f"{client.base_url}: a call failed: {type(exc).__name__}: {exc}") from exc
    if answer.choices[0].message.content != CONTENT:
        raise CommandFailed(f"{client.base_url}: unexpected answer {answer.choices[0].message.content!r}")


def latency(rows: list[Row], notes: list[str], arms: Sequence[Arm], procs: Procs, calls: int, warmup: int,
            blocks: int) -> None:
    clients = {arm.name: openai.OpenAI(base_url=arm.url, api_key=arm.key(), max_retries=0, timeout=CLIENT_TIMEOUT_S)
               for arm in arms}
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    per_block: dict[str, list[float]] = {arm.name: [] for arm in arms}
    gw_cpu = dict.fromkeys(times, 0.0)
    for arm in arms:
        for _ in range(warmup):
            one_call(clients[arm.name])
        arm.calls += warmup
    size = -(-calls // blocks)
    for block in range(blocks):
        n = min(size, calls - block * size)
        print(f"bench_gateway: latency block {block + 1}/{blocks}: {n} calls each way", file=sys.stderr)
        for arm in ab.in_turn(arms, block):
            client, got = clients[arm.name], []
            before = cpu_s(procs.gateway)
            for _ in range(n):
                t0 = time.perf_counter()
                one_call(client)
                got.append(time.perf_counter() - t0)
            gw_cpu[arm.name] += cpu_s(procs.gateway) - before
            arm.calls += n
            times[arm.name].extend(got)
            per_block[arm.name].append(pct(got, 0.5))
    for c in clients.values():
        c.close()
    direct = arms[0]
    d50, d99 = pct(times[direct.name], 0.5), pct(times[direct.name], 0.99)
    rows.append(Row(f"{direct.name}: p50 | p99 (baseline, {calls} calls)", f"{ms(d50)} | {ms(d99)}"))
    for arm in arms[1:]:
        a = times[arm.name]
        g50, g99 = pct(a, 0.5), pct(a, 0.99)
        cpu = f"gateway {gw_cpu[arm.name] / len(a) * 1000:.2f} ms/call"
        rows.append(Row(f"{arm.name}: p50 | p99", f"{ms(g50)} | {ms(g99)}", f"{ms(d50)} | {ms(d99)}",
                        f"{g50 / d50:.2f}x | {g99 / d99:.2f}x", cpu=cpu))
        rows.append(Row(f"  added at p50 ({arm.name} - direct)", ms(g50 - d50), target=f"<= {ADDED_P50_TARGET_MS:g} ms",
                        verdict=verdict((g50 - d50) * 1000 <= ADDED_P50_TARGET_MS)))
        rows.append(Row(f"  added at p99 ({arm.name} - direct)", ms(g99 - d99)))
        steps = (f"{(g - d) * 1000:.2f}" for g, d in zip(per_block[arm.name], per_block[direct.name]))
        rows.append(Row("  added at p50, block by block (ms)", ", ".join(steps)))
    if len(arms) == 3:
        disk, tmpfs = times[arms[1].name], times[arms[2].name]
        rows.append(Row("  durable ledger writes (gateway - gateway tmpfs), p50 | p99",
                        f"{ms(pct(disk, 0.5) - pct(tmpfs, 0.5))} | {ms(pct(disk, 0.99) - pct(tmpfs, 0.99))}"))
    notes.append(f"{warmup} unmeasured calls each way first; then {blocks} blocks of ~{size} calls each way, "
                 "arms alternating (order reversed every other block); a call is the whole "
                 "client.chat.completions.create (request, answer, parsing)")
    notes.append("through the gateway each call writes an intent before it is forwarded and a result before its "
                 "answer reaches the client; their fsyncs are grouped every 50 ms")


# ---------------------------------------------------------------------------------------------------
# Figure 2: throughput at many concurrent streaming clients


@dataclass
class Rate:
    calls: int = 0
    wall: float = 0.0
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # client, endpoint, gateway
    rounds: list[float] = field(default_factory=list)  # calls/s of each round


async def stream_once(client: openai.AsyncOpenAI) -> None:
    pieces = []
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    except openai.OpenAIError as exc:
        raise CommandFailed(f"{client.base_url}: a streamed call failed: {type(exc).__name__}: {exc}") from exc
    if "".join(pieces) != CONTENT or len(pieces) != PIECES:
        raise CommandFailed(f"{client.base_url}: a stream of {len(pieces)} pieces, not the {PIECES} sent")


async def streams(arm: Arm, keys: Sequence[str], per_client: int, procs: Procs, rate: Rate) -> None:
    # One connection pool for the arm's clients (an httpx client each costs ~50 ms to make, for its TLS
    # context); the clients still have a connection each, since they call at once.
    pool = openai.DefaultAsyncHttpxClient()
    clients = [openai.AsyncOpenAI(base_url=arm.url, api_key=k, max_retries=0, timeout=CLIENT_TIMEOUT_S,
                                  http_client=pool) for k in keys]

    async def calls(client: openai.AsyncOpenAI) -> None:
        for _ in range(per_client):
            await stream_once(client)

    try:
        await asyncio.gather(*(stream_once(c) for c in clients))  # connections opened: not measured
        arm.calls += len(clients)
        before = procs.snapshot()
        t0 = time.perf_counter()
        await asyncio.gather(*(calls(c) for c in clients))
        wall = time.perf_counter() - t0
        rate.wall += wall
        rate.rounds.append(len(clients) * per_client / wall)
        rate.cpu = [total + after - b for total, after, b in zip(rate.cpu, procs.snapshot(), before)]
        rate.calls += len(clients) * per_client
        arm.calls += len(clients) * per_client
    finally:
        await pool.aclose()


def throughput(rows: list[Row], notes: list[str], arms: Sequence[Arm], procs: Procs, n_clients: int,
               per_client: int, rounds: int) -> None:
    keys = {arm.name: [arm.key()] * n_clients if arm.one_grant else [arm.key() for _ in range(n_clients)]
            for arm in arms}
    rates = {arm.name: Rate() for arm in arms}
    for r in range(rounds):
        for arm in ab.in_turn(arms, r):
            print(f"bench_gateway: round {r + 1}/{rounds}, {arm.name}: {n_clients} clients x {per_client} streams",
                  file=sys.stderr)
            asyncio.run(streams(arm, keys[arm.name], per_client, procs, rates[arm.name]))
    direct = rates[arms[0].name]
    base = direct.calls / direct.wall

    def per_call(rate: Rate) -> str:
        client, upstream, gw = (c / rate.calls * 1000 for c in rate.cpu)
        return f"client {client:.2f} | endpoint {upstream:.2f} | gateway {gw:.2f} ms/call"

    rows.append(Row(f"{arms[0].name}: {direct.calls:,} streams (baseline)", f"{base:,.0f} calls/s",
                    cpu=per_call(direct)))
    for arm in arms[1:]:
        rate = rates[arm.name]
        got = rate.calls / rate.wall
        rows.append(Row(f"{arm.name}: {rate.calls:,} streams", f"{got:,.0f} calls/s", f"{base:,.0f} calls/s",
                        f"{got / base:.1%}", f">= {THROUGHPUT_TARGET:.0%}", verdict(got >= THROUGHPUT_TARGET * base),
                        per_call(rate)))
        gw_per_call = rate.cpu[2] / rate.calls
        rows.append(Row("  gateway CPU per call | calls/s one core of it carries",
                        f"{gw_per_call * 1000:.2f} ms | {1 / gw_per_call:,.0f} calls/s", f"{base:,.0f} calls/s",
                        f"{1 / gw_per_call / base:.1f}x"))
        if rounds > 1:
            rows.append(Row("  round by round, this / direct", ", ".join(
                f"{mine / theirs:.0%}" for mine, theirs in zip(rate.rounds, direct.rounds))))
        rows.append(Row("  the ratio if CPU alone decided: CPU per call of all three, direct / this",
                        f"{sum(direct.cpu) / direct.calls * 1000:.2f} / {sum(rate.cpu) / rate.calls * 1000:.2f} ms",
                        ratio=f"{sum(direct.cpu) / direct.calls / (sum(rate.cpu) / rate.calls):.1%}"))
    busy = ", ".join(f"{name} {r.cpu[1] / r.wall:.0%}" for name, r in rates.items())
    rows.append(Row("  endpoint busy (share of one core)", busy))
    rows.append(Row("  clients busy (share of one core)", ", ".join(f"{name} {r.cpu[0] / r.wall:.0%}"
                                                                   for name, r in rates.items())))
    notes.append(f"{n_clients} asyncio clients (one openai.AsyncOpenAI each; through the gateway each on a grant "
                 f"of its own, but in the 'one grant' arm) x {per_client} streamed chat completions of {PIECES} "
                 f"pieces, {rounds} round(s) alternating the arms; calls/s = calls / summed wall; cpu: user + "
                 "system seconds of each process (psutil) over the measured calls")
    notes.append(f"clients, endpoint and gateway share {os.cpu_count()} cores: a gateway's CPU is taken from the "
                 "clients here, not on a node where the tasks' CPU is their own and the endpoint is remote; "
                 "'calls/s one core of it carries' is 1 / gateway CPU per call")


# ---------------------------------------------------------------------------------------------------
# Check 3: the ledger has every call made through the gateway


def read_lines(path: str) -> list[dict[str, object]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def metering(rows: list[Row], notes: list[str], arms: Sequence[Arm], served: dict[str, object]) -> None:
    problems: list[str] = []
    for arm in arms:
        arm.close()
        if arm.run_dir is None:
            continue
        results = read_lines(journal_path(arm.run_dir, 0))
        intents = read_lines(intents_journal_path(arm.run_dir, 0))
        statuses = Counter(str(e.get("status")) for e in results)
        ids = {e.get("id") for e in results}
        cut = sum(s.calls for s in arm.spent), sum(s.cut for s in arm.spent)
        good = (len(results) == arm.calls == len(ids) == len(intents) == cut[0] and statuses["ok"] == arm.calls
                and cut[1] == 0)
        rows.append(Row(f"{arm.name}: results in ledger/rank-0000.jsonl | calls made",
                        f"{len(results):,} | {arm.calls:,}", target="equal", verdict="PASS" if good else "ERROR"))
        rows.append(Row("  ok | distinct ids | intents | grants' calls | cut",
                        f"{statuses['ok']:,} | {len(ids):,} | {len(intents):,} | {cut[0]:,} | {cut[1]:,}",
                        target="= calls, cut 0"))
        if not good:
            problems.append(f"{arm.run_dir}: {len(results)} results ({dict(statuses)}), {len(ids)} distinct ids, "
                            f"{len(intents)} intents, grants say {cut[0]} calls and {cut[1]} cut, "
                            f"for {arm.calls} calls")
    total = sum(arm.calls for arm in arms)
    complete = served.get("complete")
    shown = f"{complete:,}" if isinstance(complete, int) else str(complete)
    rows.append(Row("endpoint: answers served whole | calls made, all arms", f"{shown} | {total:,}",
                    target="equal", verdict="PASS" if complete == total else "ERROR"))
    if complete != total:
        problems.append(f"the endpoint served {served} for {total} calls")
    notes.append("read after every grant is closed; warm-up calls included")
    if problems:
        raise CommandFailed("the gateway did not meter every call: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, metavar="N", help="sequential calls each way (default 300, quick 60)")
    parser.add_argument("--clients", type=int, metavar="N", help="concurrent streaming clients (default 64)")
    parser.add_argument("--streams-per-client", type=int, metavar="N",
                        help="streamed calls of each client per round (default 10, quick 3)")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="latency blocks and throughput rounds alternating the arms "
                             "(default 5 and 3; quick 2 and 1)")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--one-grant", action="store_true",
                        help="throughput: also an arm whose clients all share one grant (one attempt's concurrent "
                             "calls), metering to a run directory of its own on disk")
    args = parser.parse_args()
    quick = args.quick
    calls = args.calls or (60 if quick else 300)
    warmup = 5 if quick else WARMUP
    n_clients = args.clients or 64
    per_client = args.streams_per_client or (3 if quick else 10)
    blocks, rounds = (args.rounds, args.rounds) if args.rounds else ((2, 1) if quick else (5, 3))
    load_at_start = os.getloadavg()[0]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    disk = tempfile.mkdtemp(prefix="cmbagent-bench-gw-")
    tmpfs = tempfile.mkdtemp(prefix="cmbagent-bench-gw-", dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    where = f"run directories: gateway on {fs_type(disk)} ({disk}), gateway tmpfs on " + (
        f"{fs_type(tmpfs)} ({tmpfs})" if tmpfs else "- (no /dev/shm: arm skipped)")
    os.environ[KEY_ENV] = "sk-bench-0123456789"
    hold_keys([KEY_ENV])  # as the runner does: the gateway gets it on its stdin
    served: dict[str, object] = {}
    try:
        with open(os.path.join(disk, "upstream.log"), "wb") as upstream_log:
            upstream = Upstream(upstream_log)
            try:
                gw = gateway_client.gateway(os.path.join(disk, "gateway", "rank-0000.log"))
                route = Route(key="mini", model=MODEL, base_url=upstream.url, api_key_env=KEY_ENV, price=PRICE,
                              price_table="spec", timeout=60.0)
                arms = [Arm("direct", upstream.url), Arm("gateway", gw.url, disk, route, gw)]
                if tmpfs is not None:
                    arms.append(Arm("gateway tmpfs", gw.url, tmpfs, route, gw))
                shared = [Arm("gateway, one grant", gw.url, os.path.join(disk, "one-grant"), route, gw, True)
                          ] if args.one_grant else []
                procs = Procs(psutil.Process(), psutil.Process(upstream.proc.pid), psutil.Process(gw.proc.pid))

                done: list[str] = []

                def measure_latency(rows: list[Row], notes: list[str]) -> None:
                    latency(rows, notes, arms, procs, calls, warmup, blocks)
                    done.append("latency")

                def measure_throughput(rows: list[Row], notes: list[str]) -> None:
                    throughput(rows, notes, arms + shared, procs, n_clients, per_client, rounds)
                    done.append("throughput")

                def check(rows: list[Row], notes: list[str]) -> None:
                    served.update(upstream.stop())  # every answer it sent is counted
                    if len(done) < 2:  # calls cut by the failure would count against the gateway
                        rows.append(Row("not checked: a measured part failed", "-"))
                        return
                    metering(rows, notes, arms + shared, served)

                steps: dict[str, tuple[str, specgen.Step]] = {
                    "latency": (f"1. added latency: {calls} sequential non-streaming chat completions each way",
                                measure_latency),
                    "throughput": (f"2. throughput: {n_clients} concurrent streaming clients x {per_client} calls "
                                   f"x {rounds} round(s) each way", measure_throughput),
                    "metering": ("3. metering: one ledger result per call through the gateway", check),
                }
                sections, failed = specgen.run_sections(steps, None, settled=not quick)
            finally:
                gateway_client.stop()
                if upstream.proc.poll() is None:
                    upstream.stop()
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        if tmpfs is not None:
            shutil.rmtree(tmpfs, ignore_errors=True)
    endpoint = "with TCP_NODELAY and a backlog of 1,024"
    notes = [where, f"endpoint: ScriptedLLM (tests/helpers/scripted_llm.py) in a subprocess, {endpoint}",
             f"openai {openai.__version__}; {specgen.load_note()}; {load_at_start:.2f} (1 min) at the start",
             f"command: {command}"]
    if quick:
        notes.append("--quick: small numbers, a smoke run; the figures mean little")
    return specgen.report(f"cmbagent-batch metering gateway ({sys.executable})", sections, failed, notes)


if __name__ == "__main__":
    sys.exit(main())
