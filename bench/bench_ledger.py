"""Time ``cmbagent-batch ledger summarize`` and ``ledger verify`` on a 10^6-entry chained ledger.

Run as ``python bench/bench_ledger.py [--entries N] [--repeat N]`` with the interpreter of a venv where
cmbagent-batch is installed. It writes a realistic ledger (tasks with several attempts and calls,
six models priced from the shipped table with dated reported names, five agents, 64 ranks, 30 days,
2% failed calls) into a temporary directory with the package's own chain writer, then times whole
commands, start-up included:

* ``ledger summarize FILE --by model --format json``; target 5 s for 10^6 entries. Baseline: a
  Python loop that ``orjson.loads`` every line and does nothing else (the floor for any command that
  reads every entry);
* ``ledger verify FILE``; target 10 s. Baseline: a Python loop that sha256es every line.

Each figure is the median of ``--repeat`` runs (default 3) after one unmeasured run that fills the
page cache. The summarize output is checked against the totals the generator wrote, and verify must
say "intact". Exit status 0 whatever the figures; 1 only when a command did not run as expected.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import orjson
import specgen
from specgen import CommandFailed, Row, cpu_cell, measure, secs, verdict

from cmbagent_batch.ledger.chain import GENESIS, chain_line
from cmbagent_batch.ledger.entry import price_dict, utc_timestamp
from cmbagent_batch.spec.pricing import builtin_table, call_cost

SUMMARIZE_TARGET = 5.0  # seconds, for 10^6 entries
VERIFY_TARGET = 10.0

MODELS = [  # (spec key, requested, reported)
    ("fast", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("smart", "gpt-4.1", "gpt-4.1-2025-04-14"),
    ("reasoner", "o4-mini", "o4-mini-2025-04-16"),
    ("claude", "claude-sonnet-4", "claude-sonnet-4-20250514"),
    ("flash", "gemini-2.5-flash", "gemini-2.5-flash"),
    ("big", "gpt-5", "gpt-5-2025-08-07"),
]
AGENTS = ["engineer", "researcher", "planner", "critic"]
DAY0 = 1_790_000_000.0  # 2026-09-22

LOADS_FLOOR = "import orjson, sys\nfor line in open(sys.argv[1], 'rb'):\n    orjson.loads(line)"
SHA_FLOOR = "import hashlib, sys\nfor line in open(sys.argv[1], 'rb'):\n    hashlib.sha256(line).hexdigest()"


def generate(path: str, n: int, seed: int = 1) -> tuple[int, float]:
    """Write an ``n``-entry chained ledger; return its call count and total cost (as summed in order)."""
    rng = random.Random(seed)
    table = builtin_table()
    prices = {requested: table.models[requested] for _, requested, _ in MODELS}
    seq, prev, total = 0, GENESIS, 0.0
    task = attempt = call = 0
    t = DAY0
    with open(path, "wb") as fh:
        buffer = []
        while seq < n:
            if call == 0 or rng.random() < 0.08:  # next attempt, or next task
                if attempt == 0 or rng.random() < 0.7:
                    task, attempt = task + 1, 1
                else:
                    attempt += 1
                call = 0
                key, requested, reported = MODELS[task % len(MODELS) if rng.random() < 0.9 else rng.randrange(6)]
            call += 1
            seq += 1
            t += 30 * 86400 / n * rng.uniform(0.5, 1.5)
            failed = rng.random() < 0.02
            prompt = 0 if failed else rng.randrange(200, 30_000)
            cached = prompt * rng.randrange(0, 80) // 100
            completion = 0 if failed else rng.randrange(20, 4_000)
            reasoning = completion // 2 if requested in ("o4-mini", "gpt-5") else 0
            price = prices[requested]
            cost = call_cost(price, prompt, cached, completion)
            total += cost
            rank = task % 64
            entry = {
                "id": f"run-{seq // 200_000:02d}/{rank}/{40_000 + task % 5000}-a1b2c3/{seq}", "job": "cmb-maps",
                "run_id": f"run-{seq // 200_000:02d}", "source": "agent", "task": f"sim-{task:06d}",
                "attempt": attempt, "call": call, "rank": rank, "host": f"nid{rank // 4:05d}",
                "pid": 40_000 + task % 5000, "agent": AGENTS[call % len(AGENTS)], "model": key,
                "requested_model": requested, "reported_model": None if failed else reported,
                "prompt_tokens": prompt, "cached_prompt_tokens": cached, "completion_tokens": completion,
                "reasoning_tokens": reasoning, "cost_usd": cost, "price_table": table.id,
                "price": price_dict(price), "status": "error" if failed else "ok",
                "error": "HTTP 429: rate limit reached for requests per minute; retry after 2 s" if failed else None,
                "latency_s": round(rng.uniform(0.4, 40.0), 3), "timestamp": utc_timestamp(t),
            }
            line, prev = chain_line(seq, prev, entry)
            buffer.append(line)
            if len(buffer) >= 10_000:
                fh.write(b"".join(buffer))
                buffer.clear()
        fh.write(b"".join(buffer))
    return seq, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, metavar="N", help="ledger size (default 10^6)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per figure (default 3)")
    args = parser.parse_args()
    n, repeat = max(1, args.entries), max(1, args.repeat)
    env = specgen.bench_env()
    rows: list[Row] = []
    failed: list[str] = []
    with specgen.TempDir() as tmp:
        path = os.path.join(tmp, "ledger.jsonl")
        calls, total = generate(path, n)
        size = os.path.getsize(path)
        try:
            summarize = [*specgen.cli(), "ledger", "summarize", path, "--by", "model", "--format", "json"]
            out = os.path.join(tmp, "summary.json")
            specgen.run_once(summarize, cwd=tmp, env=env, stdout_path=out)  # fills the page cache
            with open(out, "rb") as fh:
                printed = orjson.loads(fh.read())["total"]
            if printed["calls"] != calls or not math.isclose(printed["cost_usd"], total, rel_tol=1e-9):  # its += drifts
                raise CommandFailed(f"summarize says {printed}, the generator wrote {calls} calls, {total} USD")
            verify_out = os.path.join(tmp, "verify.txt")
            specgen.run_once([*specgen.cli(), "ledger", "verify", path], cwd=tmp, env=env, stdout_path=verify_out)
            with open(verify_out, encoding="utf-8") as fh:
                if not fh.read().startswith(f"intact: {n} entries"):
                    raise CommandFailed("verify did not find the generated ledger intact")
            figure(rows, "summarize --by model --format json", summarize, LOADS_FLOOR, "orjson.loads per line",
                   path, SUMMARIZE_TARGET, repeat, tmp, env)
            figure(rows, "verify", [*specgen.cli(), "ledger", "verify", path], SHA_FLOOR, "sha256 per line",
                   path, VERIFY_TARGET, repeat, tmp, env)
        except CommandFailed as exc:
            rows.append(Row("ledger command failed", "-", verdict="ERROR"))
            failed.append(str(exc))
    notes = [specgen.load_note(), f"ledger: {n:,} entries, {size / 1e6:.0f} MB ({size / n:.0f} bytes a line)"]
    if n != 1_000_000:
        notes.append(f"--entries {n:,}: the targets are for 10^6 entries; only the ratios compare")
    specgen.print_table(f"cmbagent-batch ledger ({sys.executable})", rows, notes)
    for message in failed:
        print(f"\nERROR: {message}", file=sys.stderr)
    return 1 if failed else 0


def figure(rows: list[Row], name: str, cmd: list[str], floor_code: str, floor_name: str, path: str,
           target: float, repeat: int, cwd: str, env: dict[str, str]) -> None:
    floor = measure([sys.executable, "-c", floor_code, path], repeat=repeat, cwd=cwd, env=env)
    measured = measure(cmd, repeat=repeat, cwd=cwd, env=env)
    rows.append(Row(f"{floor_name} (floor, {floor.runs()})", secs(floor.wall), cpu=cpu_cell(floor)))
    rows.append(Row(f"ledger {name} ({measured.runs()})", secs(measured.wall), secs(floor.wall),
                    f"{measured.wall / floor.wall:.2f}x", f"<= {target:.3g} s", verdict(measured.wall <= target),
                    cpu_cell(measured, floor)))


if __name__ == "__main__":
    sys.exit(main())
