"""Ledger entries of a made-up run, and chained ledgers holding them: what the ledger storage tests and
the ledger command tests write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from cmbagent_batch.ledger.chain import GENESIS, chain_lines
from cmbagent_batch.ledger.entry import make_entry, utc_timestamp

PRICE = {"prompt_per_1m": 0.15, "cached_prompt_per_1m": 0.075, "completion_per_1m": 0.6}


def entry(n: int, *, task: str | None = "sim-1", model: str = "gpt-4o-mini", cost: float = 0.001, rank: int = 0,
          attempt: int | None = 1, agent: str | None = "engineer", status: str = "ok", day: int = 0,
          **changes: Any) -> dict[str, Any]:
    """Call ``n`` of a made-up run: every field set, timestamps ``n`` seconds into 2026-11-27 (+ ``day``)."""
    return make_entry(**{
        "id": f"run-1/{rank}/4242/{n}", "job": "demo", "run_id": "run-1", "source": "agent" if task else "analysis",
        "task": task, "attempt": attempt if task else None, "call": n, "rank": rank, "host": "node1", "pid": 4242,
        "agent": agent if task else "dependency-analysis", "model": "fast", "requested_model": model,
        "reported_model": f"{model}-2024-07-18", "prompt_tokens": 1000 + n, "cached_prompt_tokens": 100,
        "completion_tokens": 200 + n, "reasoning_tokens": n % 7, "cost_usd": cost, "price_table": "builtin-2025-08",
        "price": dict(PRICE), "status": status, "error": "HTTP 500: boom" if status == "error" else None,
        "latency_s": 1.25, "timestamp": utc_timestamp(1_795_824_000 + day * 86_400 + n), **changes,
    })


def write_chain(path: Path, entries: list[dict[str, Any]]) -> list[bytes]:
    """A chained ledger holding ``entries``; its lines (newline included)."""
    lines = list(chain_lines(entries))
    path.write_bytes(b"".join(lines))
    return lines


def head_of(lines: list[bytes]) -> str:
    return orjson.loads(lines[-1])["hash"] if lines else GENESIS
