"""Rows of cells as an aligned text table or as CSV (what the ledger commands print)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from cmbagent_batch.ledger.money import usd


def cell(value: Any) -> str:
    """How a value reads in a table: null is "-", a float is money (``money.usd``), counts get separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return usd(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int) -> str:
    """Columns left-aligned up to ``numeric_from``, right-aligned after it; a rule under the headers."""
    cells = [list(headers), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < numeric_from else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out) + "\n"


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """RFC 4180 CSV; null is an empty field, numbers as Python writes them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buffer.getvalue()
