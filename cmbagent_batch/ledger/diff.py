"""``ledger diff A B``: which calls one ledger has and the other not, and which differ.

A call is known by its id and timestamp (a process id reused within a run can give two calls one id);
its content is the sha256 of its fields, so two 10^6-entry ledgers compare without holding the entries.
The order of the lines and the chain do not count: two ledgers with the same calls are identical, and their
costs, summed compensated (``money.Total``), are equal to the last digit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cmbagent_batch.ledger.entry import FIELDS, OPTIONAL_FIELDS, entry_fields
from cmbagent_batch.ledger.money import Total
from cmbagent_batch.ledger.tables import text_table

SHOWN = 20  # calls listed per kind of difference
_ABSENT = object()  # an optional field an entry lacks


def call_key(entry: dict[str, Any]) -> str:
    return f"{entry['id']} @ {entry['timestamp']}"


@dataclass
class Side:
    """One ledger as diff sees it: each call's content digest, and calls and cost per model."""

    digests: dict[str, bytes] = field(default_factory=dict)
    models: dict[str, list[Any]] = field(default_factory=dict)  # requested_model -> [calls, cost (a Total)]

    def add_all(self, entries: Iterable[dict[str, Any]]) -> None:
        dumps, sha256 = orjson.dumps, hashlib.sha256
        for entry in entries:
            self.digests[call_key(entry)] = sha256(dumps(entry_fields(entry))).digest()
            acc = self.models.setdefault(entry["requested_model"], [0, Total()])
            acc[0] += 1
            acc[1].add(entry["cost_usd"])

    def calls_and_cost(self, model: str) -> tuple[int, float]:
        acc = self.models.get(model)
        return (0, 0.0) if acc is None else (acc[0], acc[1].value)

    @property
    def cost_usd(self) -> float:
        return Total.of(acc[1] for acc in self.models.values())


@dataclass(frozen=True)
class Difference:
    only_a: list[str]
    only_b: list[str]
    changed: list[str]

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.changed)


def compare(a: Side, b: Side) -> Difference:
    return Difference(
        only_a=sorted(k for k in a.digests if k not in b.digests),
        only_b=sorted(k for k in b.digests if k not in a.digests),
        changed=sorted(k for k, d in a.digests.items() if k in b.digests and b.digests[k] != d),
    )


class Picker:
    """Keeps the entries of the given calls (to say how they differ)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.wanted = set(keys)
        self.found: dict[str, dict[str, Any]] = {}

    def add_all(self, entries: Iterable[dict[str, Any]]) -> None:
        for entry in entries:
            if self.wanted and call_key(entry) in self.wanted:
                self.found[call_key(entry)] = entry


def changed_fields(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``field a -> b`` for every field that differs, in file order (an optional field one lacks: absent)."""
    parts = [f"{f} {_show(a, f)} -> {_show(b, f)}" for f in FIELDS + OPTIONAL_FIELDS
             if a.get(f, _ABSENT) != b.get(f, _ABSENT)]
    return "; ".join(parts)


def _show(entry: dict[str, Any], name: str) -> str:
    return orjson.dumps(entry[name]).decode("utf-8") if name in entry else "(absent)"


def model_table(a: Side, b: Side) -> str:
    """Calls and cost per model in A and B, and the change in cost."""
    rows: list[list[Any]] = []
    for model in sorted(set(a.models) | set(b.models)):
        (calls_a, cost_a), (calls_b, cost_b) = a.calls_and_cost(model), b.calls_and_cost(model)
        rows.append([model, calls_a, calls_b, cost_a, cost_b, cost_b - cost_a])
    cost_a, cost_b = a.cost_usd, b.cost_usd
    rows.append(["TOTAL", sum(r[1] for r in rows), sum(r[2] for r in rows), cost_a, cost_b, cost_b - cost_a])
    return text_table(("model", "calls_a", "calls_b", "cost_a_usd", "cost_b_usd", "change_usd"), rows, 1)


def listing(title: str, keys: list[str], describe: dict[str, str] | None = None) -> str:
    """``title: N calls`` and the first ``SHOWN`` of them, one a line."""
    if not keys:
        return ""
    lines = [f"{title}: {len(keys)} call{'s' if len(keys) != 1 else ''}"]
    for key in keys[:SHOWN]:
        lines.append(f"  {key}" + (f": {describe[key]}" if describe and key in describe else ""))
    if len(keys) > SHOWN:
        lines.append(f"  ... and {len(keys) - SHOWN} more")
    return "\n".join(lines) + "\n"
