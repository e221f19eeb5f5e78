"""``ledger reprice``: what the same calls cost under another price table.

An entry is priced by its ``requested_model`` (a dated variant resolves to its base model, see
``pricing.lookup``), else by the ``reported_model`` the endpoint named. The new entries keep every
field but ``cost_usd``, ``price_table``, ``price_table_date`` and ``price``; written out, they make a new,
freshly chained ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

from cmbagent_batch.ledger.chain import GENESIS, chain_line
from cmbagent_batch.ledger.entry import price_dict
from cmbagent_batch.ledger.money import Total
from cmbagent_batch.ledger.tables import csv_text, text_table
from cmbagent_batch.spec.pricing import Price, PriceTable, call_cost, lookup

HEADERS = ("model", "priced_as", "calls", "old_cost_usd", "new_cost_usd", "change_usd")


class Repricer:
    """Reprices the entries it is given; sums old and new cost per model; can write a new chain."""

    def __init__(self, table: PriceTable, out: IO[bytes] | None = None) -> None:
        self.table = table
        self.missing: set[str] = set()
        self.groups: dict[str, list[Any]] = {}  # requested_model -> [priced_as, calls, old, new] (costs: Totals)
        self._found: dict[tuple[str, str | None], tuple[str, Price] | None] = {}
        self._out = out
        self._seq, self._prev = 0, GENESIS

    def _price(self, entry: dict[str, Any]) -> tuple[str, Price] | None:
        names = (entry["requested_model"], entry["reported_model"])
        if names not in self._found:
            self._found[names] = lookup(self.table, names[0]) or (
                lookup(self.table, names[1]) if isinstance(names[1], str) else None)
        return self._found[names]

    def add_all(self, entries: Iterable[dict[str, Any]]) -> None:
        for entry in entries:
            found = self._price(entry)
            if found is None:
                self.missing.add(entry["requested_model"])
                continue
            name, price = found
            new_cost = call_cost(price, entry["prompt_tokens"], entry["cached_prompt_tokens"],
                                 entry["completion_tokens"])
            acc = self.groups.setdefault(entry["requested_model"], [name, 0, Total(), Total()])
            acc[1] += 1
            acc[2].add(entry["cost_usd"])
            acc[3].add(new_cost)
            if self._out is not None and not self.missing:
                self._seq += 1
                repriced = {**entry, "cost_usd": new_cost, "price_table": self.table.id,
                            "price_table_date": self.table.date or None, "price": price_dict(price)}
                line, self._prev = chain_line(self._seq, self._prev, repriced)
                self._out.write(line)

    def ordered(self) -> list[tuple[str, list[Any]]]:
        """``(model, [priced_as, calls, old cost, new cost])`` per model, the most expensive now first."""
        rows = [(model, [name, n, old.value, new.value]) for model, (name, n, old, new) in self.groups.items()]
        return sorted(rows, key=lambda kv: (-kv[1][3], kv[0]))

    def totals(self) -> tuple[int, float, float]:
        rows = self.groups.values()
        return sum(r[1] for r in rows), Total.of(r[2] for r in rows), Total.of(r[3] for r in rows)

    def to_json(self) -> dict[str, Any]:
        calls, old, new = self.totals()
        return {
            "prices": self.table.id,
            "total": {"calls": calls, "old_cost_usd": old, "new_cost_usd": new},
            "groups": [{"model": model, "priced_as": name, "calls": n, "old_cost_usd": o, "new_cost_usd": c}
                       for model, (name, n, o, c) in self.ordered()],
        }

    def rows(self) -> list[list[Any]]:
        rows = [[model, name, n, o, c, c - o] for model, (name, n, o, c) in self.ordered()]
        calls, old, new = self.totals()
        return [*rows, ["TOTAL", "", calls, old, new, new - old]]

    def table_text(self) -> str:
        return text_table(HEADERS, self.rows(), numeric_from=2)

    def csv(self) -> str:
        return csv_text(HEADERS, self.rows()[:-1])

    @property
    def entries_written(self) -> int:
        return self._seq
