"""``ledger export``: the entries as CSV (price flattened into three columns) or as one JSON array.

Only the entry's own fields are exported (``FIELDS``, then ``OPTIONAL_FIELDS``: CSV has a column for each,
empty where an older entry lacks it); the chain's ``seq``, ``prev`` and ``hash`` are not.
Both writers stream: one entry in memory at a time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import IO, Any

import orjson

from cmbagent_batch.ledger.entry import FIELDS, OPTIONAL_FIELDS, PRICE_FIELDS, entry_fields

CSV_COLUMNS: tuple[str, ...] = tuple(
    c for f in FIELDS + OPTIONAL_FIELDS for c in ([f"price_{p}" for p in PRICE_FIELDS] if f == "price" else [f])
)


def csv_row(entry: dict[str, Any]) -> list[Any]:
    """An entry's CSV cells, in ``CSV_COLUMNS`` order; null is an empty cell."""
    row: list[Any] = []
    for field in FIELDS:
        if field == "price":
            row.extend(entry["price"][p] for p in PRICE_FIELDS)
        else:
            row.append(entry[field])
    row.extend(entry.get(field) for field in OPTIONAL_FIELDS)
    return ["" if v is None else v for v in row]


class Exporter:
    """Writes the entries it is given to ``out`` in ``fmt`` (csv or json); ``close`` ends the document."""

    def __init__(self, out: IO[bytes], fmt: str) -> None:
        self.fmt = fmt
        self.count = 0
        self._out = out
        if fmt == "csv":
            self._text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
            self._csv = csv.writer(self._text, lineterminator="\n")
            self._csv.writerow(CSV_COLUMNS)
        else:
            out.write(b"[")

    def add_all(self, entries: Iterable[dict[str, Any]]) -> None:
        if self.fmt == "csv":
            for entry in entries:
                self._csv.writerow(csv_row(entry))
                self.count += 1
            return
        dumps, out = orjson.dumps, self._out
        for entry in entries:
            out.write(b"\n" if self.count == 0 else b",\n")
            out.write(dumps(entry_fields(entry)))
            self.count += 1

    def close(self) -> None:
        if self.fmt == "csv":
            self._text.flush()
            self._text.detach()  # leaves ``out`` open for its owner
        else:
            self._out.write(b"\n]\n" if self.count else b"]\n")
