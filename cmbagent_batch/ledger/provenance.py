"""What the report's figures rest on, as HTML for its page: whether each ledger file's chain verified (and
its head hash), and the price tables the entries were priced with, with their dates.

Pure, standard library only (and ``verdict``); every string from the ledger is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cmbagent_batch.ledger.verdict import ChainStatus

OLDER_LEDGER = "unknown (older ledger)"  # the date of a table no longer known, of an entry that did not keep it
IN_THE_SPEC = "priced in the spec (no table)"  # the "date" of the prices set in a job spec
NO_TABLE_DATE = "none given by the table"
SPEC_TABLE = "spec"  # pricing.SPEC_TABLE, spelled out: this module imports only the standard library
MAX_PRICE_ROWS = 200

PriceKey = tuple[str, str, str, tuple[Any, Any, Any]]  # table, its date as shown, model, unit prices


def esc(value: object) -> str:
    """``value`` as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def banner(chains: Sequence[ChainStatus]) -> str:
    """A red banner naming each file whose chain did not verify; "" when all did."""
    lines = "".join(f"<div>UNVERIFIED: {esc(c.problem)}</div>" for c in chains if c.problem is not None)
    return f'<div class="banner" id="unverified" role="alert">{lines}</div>\n' if lines else ""


def chain_section(chains: Sequence[ChainStatus]) -> str:
    """One row a ledger file: verified (and what its end matched) or UNVERIFIED and why; entries; head hash."""
    rows = []
    for i, c in enumerate(chains):
        if c.problem is None:
            status = (f'<td class="ok" id="chain-status-{i}" data-value="verified">verified'
                      f'<div class="note">{esc(c.anchor)}</div></td>')
        else:
            status = (f'<td class="err" id="chain-status-{i}" data-value="unverified">'
                      f"UNVERIFIED: {esc(c.problem)}</td>")
        rows.append(f'<tr><td class="wrap">{esc(c.path)}</td>{status}<td class="n">{c.entries:,}</td>'
                    f'<td class="hash" id="chain-head-{i}">{esc(c.head) or "-"}</td></tr>')
    head = '<th>file</th><th>chain</th><th class="n">entries verified</th><th>head hash</th>'
    return (f'<section id="chain"><h2>Ledger chain</h2><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def table_date(entry: dict[str, Any], known: Mapping[str, str]) -> str:
    """The date of the price table ``entry`` was priced with, as the page shows it: the one the entry kept,
    else the one ``known`` (table id -> date, e.g. the shipped table's) has for its table."""
    table = entry.get("price_table")
    if table == SPEC_TABLE:
        return IN_THE_SPEC
    if "price_table_date" not in entry:
        return known.get(str(table), OLDER_LEDGER)
    date = entry["price_table_date"]
    return NO_TABLE_DATE if date is None else str(date)


def price_rows(entries: Iterable[dict[str, Any]], known: Mapping[str, str]) -> dict[PriceKey, int]:
    """Calls per price table, date, model and unit prices; ``known`` as for ``table_date``."""
    out: dict[PriceKey, int] = {}
    for e in entries:
        price = e.get("price")
        p: dict[str, Any] = price if isinstance(price, dict) else {}
        key = (str(e.get("price_table")), table_date(e, known), str(e.get("requested_model")),
               (p.get("prompt_per_1m"), p.get("cached_prompt_per_1m"), p.get("completion_per_1m")))
        out[key] = out.get(key, 0) + 1
    return out


def _per_1m(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def prices_section(rows: dict[PriceKey, int]) -> str:
    """The price tables used: table, date, model, USD per 1M prompt / cached prompt / completion tokens, calls."""
    ordered = sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], str(kv[0][3])))
    cells = []
    for (table, date, model, (prompt, cached, completion)), calls in ordered[:MAX_PRICE_ROWS]:
        cached_shown = "prompt price" if cached is None else _per_1m(cached)
        cells.append(f'<tr><td class="wrap">{esc(table)}</td><td class="price-date">{esc(date)}</td>'
                     f'<td class="wrap">{esc(model)}</td><td class="n">{esc(_per_1m(prompt))}</td>'
                     f'<td class="n">{esc(cached_shown)}</td><td class="n">{esc(_per_1m(completion))}</td>'
                     f'<td class="n">{calls:,}</td></tr>')
    if len(ordered) > MAX_PRICE_ROWS:
        cells.append(f'<tr class="more"><td colspan="7">and {len(ordered) - MAX_PRICE_ROWS:,} more</td></tr>')
    if not cells:
        cells.append('<tr class="more"><td colspan="7">no calls recorded</td></tr>')
    head = ("<th>price table</th><th>date</th><th>model</th><th class=\"n\">prompt</th>"
            "<th class=\"n\">cached prompt</th><th class=\"n\">completion</th><th class=\"n\">calls</th>")
    return (f'<section id="prices"><h2>Price tables (USD per 1M tokens)</h2><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(cells)}</tbody></table></section>')
