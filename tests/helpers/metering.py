"""What the metering gateway's tests read: a run directory's ledger and intents, the tokens they add up
to against what the scripted endpoint served, and the key the runner holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers.scripted_llm import ScriptedLLM

KEY = "sk-real-SECRET-0123456789abcdef"  # the real key: the endpoint must get it, no task or file ever


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def intents(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ledger.intents.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tokens(entries: list[dict[str, Any]]) -> dict[str, int]:
    return {"prompt": sum(e["prompt_tokens"] for e in entries),
            "cached": sum(e["cached_prompt_tokens"] for e in entries),
            "completion": sum(e["completion_tokens"] for e in entries),
            "reasoning": sum(e["reasoning_tokens"] for e in entries)}


def served(srv: ScriptedLLM) -> dict[str, int]:
    totals = srv.served_totals()
    return {"prompt": totals.prompt_tokens, "cached": totals.cached_tokens, "completion": totals.completion_tokens,
            "reasoning": totals.reasoning_tokens}


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}
