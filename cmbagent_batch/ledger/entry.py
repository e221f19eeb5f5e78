"""One ledger entry: one model call (one HTTP attempt, successful or failed) as a flat dict.

``FIELDS`` is the order every file writes them in, then those of ``OPTIONAL_FIELDS`` an entry has (fields
added since the first ledgers, which older entries lack); ``schemas/ledger-entry.schema.json`` documents each.
``make_entry`` builds an entry and checks it cheaply (ValueError naming the field); ``entry_problem``
says what is wrong with a dict read back from a file, or None. Both are pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from cmbagent_batch.spec.pricing import Price

FIELDS: tuple[str, ...] = (
    "id", "job", "run_id", "source", "task", "attempt", "call", "rank", "host", "pid", "agent",
    "model", "requested_model", "reported_model",
    "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens",
    "cost_usd", "price_table", "price", "status", "error", "latency_s", "timestamp",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("price_table_date",)
PRICE_FIELDS: tuple[str, ...] = ("prompt_per_1m", "cached_prompt_per_1m", "completion_per_1m")
SOURCES = ("agent", "analysis", "task")
STATUSES = ("ok", "error")
ANALYSIS_AGENT = "dependency-analysis"  # the agent name of dependency-analysis calls

_FIELD_SET = frozenset(FIELDS + OPTIONAL_FIELDS)
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:\+00:00|Z)")

# field -> (allowed types, may be null, smallest value for numbers)
_STR, _INT, _NUM = (str,), (int,), (int, float)
_RULES: dict[str, tuple[tuple[type, ...], bool, float | None]] = {
    "id": (_STR, False, None), "job": (_STR, False, None), "run_id": (_STR, False, None),
    "task": (_STR, True, None), "attempt": (_INT, True, 1), "call": (_INT, False, 1),
    "rank": (_INT, False, 0), "host": (_STR, False, None), "pid": (_INT, False, 0),
    "agent": (_STR, True, None), "model": (_STR, False, None), "requested_model": (_STR, False, None),
    "reported_model": (_STR, True, None),
    "prompt_tokens": (_INT, False, 0), "cached_prompt_tokens": (_INT, False, 0),
    "completion_tokens": (_INT, False, 0), "reasoning_tokens": (_INT, False, 0),
    "cost_usd": (_NUM, False, 0), "price_table": (_STR, False, None), "error": (_STR, True, None),
    "latency_s": (_NUM, False, 0), "timestamp": (_STR, False, None),
}


def call_id(run_id: str, rank: int, pid: int, n: int) -> str:
    """The unique id of a call: the ``n``-th call (from 1) made by process ``pid`` of ``rank``."""
    return f"{run_id}/{rank}/{pid}/{n}"


def utc_timestamp(epoch_s: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-27T23:00:00.123+00:00`` (what ``timestamp`` holds)."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


def price_dict(price: Price) -> dict[str, float | None]:
    """The ``price`` field of an entry priced with ``price``."""
    return {"prompt_per_1m": price.prompt_per_1m, "cached_prompt_per_1m": price.cached_prompt_per_1m,
            "completion_per_1m": price.completion_per_1m}


def entry_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's own fields, in the order files write them: ``FIELDS``, then the optional ones it has."""
    return {**{k: entry[k] for k in FIELDS}, **{k: entry[k] for k in OPTIONAL_FIELDS if k in entry}}


def make_entry(**fields: Any) -> dict[str, Any]:
    """A ledger entry with exactly the ``FIELDS`` (and the ``OPTIONAL_FIELDS`` given), in their order;
    ValueError saying what is wrong.

    ``price`` may be a ``Price``. Integers given for ``cost_usd`` and ``latency_s`` become floats, so
    every file spells them alike.
    """
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise ValueError(f"ledger entry lacks {', '.join(missing)}")
    unknown = sorted(set(fields) - _FIELD_SET)
    if unknown:
        raise ValueError(f"unknown ledger entry field(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(FIELDS + OPTIONAL_FIELDS)}")
    entry = entry_fields(fields)
    for key in ("cost_usd", "latency_s"):
        if type(entry[key]) is int:
            entry[key] = float(entry[key])
    price = entry["price"]
    if isinstance(price, Price):
        entry["price"] = price_dict(price)
    elif isinstance(price, Mapping) and set(price) == set(PRICE_FIELDS):
        entry["price"] = {k: price[k] for k in PRICE_FIELDS}
    problem = entry_problem(entry)
    if problem is not None:
        raise ValueError(problem)
    return entry


def entry_problem(entry: Any) -> str | None:
    """What makes ``entry`` not a ledger entry (first problem, in field order), or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    missing = [f for f in FIELDS if f not in entry]
    if missing:
        more = f" and {len(missing) - 3} more fields" if len(missing) > 3 else ""
        return f"lacks {', '.join(missing[:3])}{more}"
    for name, (types, nullable, minimum) in _RULES.items():
        problem = _value_problem(entry[name], types, nullable, minimum)
        if problem:
            return f"{name}: {problem}"
    if "price_table_date" in entry and (problem := _value_problem(entry["price_table_date"], _STR, True, None)):
        return f"price_table_date: {problem}"
    return _price_problem(entry["price"]) or _enum_problem(entry) or _shape_problem(entry)


def _value_problem(value: Any, types: tuple[type, ...], nullable: bool, minimum: float | None) -> str | None:
    if value is None:
        return None if nullable else "must not be null"
    if isinstance(value, bool) or not isinstance(value, types):
        kind = "a string" if types == _STR else "an integer" if types == _INT else "a number"
        return f"expected {kind}{' or null' if nullable else ''}, got {value!r}"
    if minimum is not None and isinstance(value, (int, float)):
        if not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if value < minimum:
            return f"must be at least {minimum:g}, got {value!r}"
    return None


def _price_problem(price: Any) -> str | None:
    if not isinstance(price, dict) or set(price) != set(PRICE_FIELDS):
        return f"price: expected an object with {', '.join(PRICE_FIELDS)}, got {price!r}"
    for key in PRICE_FIELDS:
        problem = _value_problem(price[key], _NUM, key == "cached_prompt_per_1m", 0)
        if problem:
            return f"price.{key}: {problem}"
    return None


def _enum_problem(entry: dict[str, Any]) -> str | None:
    if entry["source"] not in SOURCES:
        return f"source: expected one of {', '.join(SOURCES)}, got {entry['source']!r}"
    if entry["status"] not in STATUSES:
        return f"status: expected one of {', '.join(STATUSES)}, got {entry['status']!r}"
    return None


def _shape_problem(entry: dict[str, Any]) -> str | None:
    if entry["source"] == "analysis" and (entry["task"] is not None or entry["attempt"] is not None):
        return "an analysis call has task and attempt null"
    if entry["source"] in ("agent", "task") and (entry["task"] is None or entry["attempt"] is None):
        return f"{'an agent' if entry['source'] == 'agent' else 'a task'}'s call names its task and attempt"
    if entry["cached_prompt_tokens"] > entry["prompt_tokens"]:
        return "cached_prompt_tokens: more than prompt_tokens (which include them)"
    if entry["reasoning_tokens"] > entry["completion_tokens"]:
        return "reasoning_tokens: more than completion_tokens (which include them)"
    if not _TIMESTAMP.fullmatch(entry["timestamp"]):
        return f"timestamp: expected ISO-8601 UTC like 2026-11-27T23:00:00.123+00:00, got {entry['timestamp']!r}"
    return None
