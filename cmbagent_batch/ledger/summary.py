"""``ledger summarize``: calls, tokens and cost per model, task, agent, rank, attempt or day.

One pass over the entries, a few dict operations each; nothing but the groups is kept. Costs are summed
compensated (``money.Total``), so the order of the entries does not show in the figures. Calls sent with no
result recorded (unresolved intents, ``intents.py``) are not in the groups, whose cost they would make
look known: they are counted apart, as ``unknown: possibly billed``, when the ledgers have intents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

from cmbagent_batch.ledger.intents import INTENT_FIELDS, UNKNOWN, Intents, describe
from cmbagent_batch.ledger.money import Total
from cmbagent_batch.ledger.tables import csv_text, text_table

# --by -> the key's field names in the output, and how an entry gives its key
GROUPINGS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Any]]] = {
    "model": (("model",), itemgetter("requested_model")),
    "task": (("task",), itemgetter("task")),
    "agent": (("agent",), itemgetter("agent")),
    "rank": (("rank",), itemgetter("rank")),
    "attempt": (("task", "attempt"), itemgetter("task", "attempt")),
    "day": (("day",), lambda e: e["timestamp"][:10]),
}
COUNTS = ("calls", "errors", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")
SHORT = ("calls", "errors", "prompt", "cached", "completion", "reasoning")  # table headers: tokens understood
LISTED = 20  # unresolved calls listed one a line in the text output


class Summary:
    """Sums per group of entries; feed it with ``add_all`` (several files add up)."""

    def __init__(self, by: str) -> None:
        self.by = by
        self.names, self._key = GROUPINGS[by]
        self.groups: dict[Any, list[Any]] = {}  # key -> [*COUNTS, cost (a Total)]

    def add_all(self, entries: Iterable[dict[str, Any]]) -> None:
        key_of, groups = self._key, self.groups
        for e in entries:
            key = key_of(e)
            acc = groups.get(key)
            if acc is None:
                acc = groups[key] = [0, 0, 0, 0, 0, 0, Total()]
            acc[0] += 1
            acc[1] += e["status"] == "error"
            acc[2] += e["prompt_tokens"]
            acc[3] += e["cached_prompt_tokens"]
            acc[4] += e["completion_tokens"]
            acc[5] += e["reasoning_tokens"]
            acc[6].add(e["cost_usd"])

    def ordered(self) -> list[tuple[tuple[Any, ...], list[Any]]]:
        """``(key values, sums)`` per group (the cost a float), most expensive first, then by key."""
        keyed = [(k if isinstance(k, tuple) else (k,), [*v[:-1], v[-1].value]) for k, v in self.groups.items()]
        return sorted(keyed, key=lambda kv: (-kv[1][-1], [_order(v) for v in kv[0]]))

    def totals(self) -> list[Any]:
        sums = [sum(acc[i] for acc in self.groups.values()) for i in range(len(COUNTS))]
        return [*sums, Total.of(acc[-1] for acc in self.groups.values())]

    def to_json(self) -> dict[str, Any]:
        """``{"total": {...}, "groups": [{"key": {...}, ...}]}`` with every count (``COUNTS``) and the cost."""

        def sums(acc: list[Any]) -> dict[str, Any]:
            return {**dict(zip(COUNTS, acc)), "cost_usd": acc[-1]}

        groups = [{"key": dict(zip(self.names, key)), **sums(acc)} for key, acc in self.ordered()]
        return {"total": sums(self.totals()), "groups": groups}

    def rows(self) -> list[list[Any]]:
        """Rows for a table or CSV: the key, every count, cost; the total last."""
        rows = [[*key, *acc] for key, acc in self.ordered()]
        rows.append(["TOTAL", *[""] * (len(self.names) - 1), *self.totals()])
        return rows

    def table(self) -> str:
        return text_table([*self.names, *SHORT, "cost_usd"], self.rows(), numeric_from=len(self.names))

    def csv(self) -> str:
        return csv_text([*self.names, *COUNTS, "cost_usd"], self.rows()[:-1])


def unresolved_json(intents: Intents) -> dict[str, Any]:
    """What the JSON output adds when the ledgers have intents: how many, how many have no result, and those."""
    unresolved = intents.unresolved
    return {"intents": intents.count, "unresolved": len(unresolved), "unresolved_cost": UNKNOWN if unresolved else None,
            "unresolved_calls": [{k: i[k] for k in INTENT_FIELDS} for i in unresolved]}


def unresolved_text(intents: Intents, after_table: bool = True) -> str:
    """What the table output (and ``verify``, ``after_table`` false) adds when the ledgers have intents: the
    unresolved count, then those calls."""
    unresolved = intents.unresolved
    if not unresolved:
        return f"unresolved: 0 (every one of {intents.count:,} calls sent has its result)\n"
    chars = sum(i["prompt_chars"] for i in unresolved)
    lines = [f"unresolved: {len(unresolved):,} call{'s' if len(unresolved) != 1 else ''} sent with no result "
             f"recorded, {UNKNOWN} ({chars:,} prompt characters{'; not in the table above' if after_table else ''})"]
    lines.extend(f"  {describe(i)}" for i in unresolved[:LISTED])
    if len(unresolved) > LISTED:
        lines.append(f"  ... and {len(unresolved) - LISTED:,} more (--format json lists them all)")
    return "\n".join(lines) + "\n"


def _order(value: Any) -> tuple[bool, str, Any]:
    """Sort key of a key value: None last, and ints and strings apart, so any mix sorts."""
    return (value is None, type(value).__name__, value)
