"""The ``ledger report`` page: one self-contained HTML document made from ledger entries.

Pure: no I/O, no clock, standard library only (of the package, only the modules that import nothing else:
``money``, ``verdict`` and ``provenance``). The page fetches nothing (inline CSS, charts as inline SVG, no script; a
Content-Security-Policy says so to the browser too). Every string that comes from the ledger is
HTML-escaped. Figures a test or a script may read carry ``id`` and ``data-value``. Calls sent with no
result recorded (unresolved intents) get a card and a table of their own, marked ``unknown: possibly
billed``. Given the chains' statuses, the page says whether each file verified, with a red banner at the
top when one did not, and its head hash; and it lists the price tables the entries were priced with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cmbagent_batch.ledger.money import Total, usd
from cmbagent_batch.ledger.provenance import banner, chain_section, esc, price_rows, prices_section
from cmbagent_batch.ledger.verdict import ChainStatus

Entry = dict[str, Any]  # a ledger entry as read back: JSON data

MAX_CHART_POINTS = 2000  # the cumulative cost line, whatever the number of calls
MAX_GROUP_ROWS = 200  # rows of a breakdown table; the rest is summed in one line
MAX_FAILED_ROWS = 500  # latest failed calls listed
MAX_ERROR_CHARS = 400  # of one error message
UNKNOWN = "unknown: possibly billed"  # intents.UNKNOWN, spelled out: this module imports only the standard library

_CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--accent:#2f6fdf;--bad:#c62828}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;background:var(--bg);color:var(--fg);
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}
.sub{color:var(--muted);margin:0 0 20px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:12px;margin-bottom:16px}
.card,section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px}
section{margin-bottom:16px;overflow-x:auto}
.label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.value{font-size:24px;font-weight:600;margin:4px 0;font-variant-numeric:tabular-nums}
.detail{color:var(--muted);font-size:12px}
.over{color:var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:16px;margin-bottom:16px}
.grid section{margin:0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{color:var(--muted);font-weight:600;background:#fafbfc;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.err{color:var(--bad);font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-word}
td.nowrap,.kv span{white-space:nowrap}tr.more td{color:var(--muted);font-style:italic}
.kv{display:grid;grid-template-columns:auto auto;gap:0 10px}.kv span:nth-child(even){text-align:right}
.bar{display:inline-block;width:60px;height:8px;background:var(--line);border-radius:4px;margin-left:6px}
.bar span{display:block;height:100%;background:var(--accent);border-radius:4px}
.meter{height:6px;background:var(--line);border-radius:3px;margin-top:6px}
.meter span{display:block;height:100%;background:var(--accent);border-radius:3px}
.meter.over span{background:var(--bad)}
svg{width:100%;height:auto;font-size:11px}
.axis{stroke:#9aa5b1}.gridline{stroke:var(--line)}.tick{fill:var(--muted)}
.cost{fill:none;stroke:var(--accent);stroke-width:2}.area{fill:var(--accent);opacity:.08}
.budget{stroke:var(--bad);stroke-dasharray:6 4}.none{color:var(--muted)}
.banner{background:var(--bad);color:#fff;font-weight:600;border-radius:8px;padding:12px 16px;margin:0 0 16px;
 overflow-wrap:anywhere}
td.ok{color:#2e7d32;font-weight:600}td.ok .note{color:var(--muted);font-weight:400;font-size:12px}
td.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
td.wrap,td.name{overflow-wrap:anywhere}td.name{min-width:9em}
table.groups th{white-space:normal}
table.groups .bar{display:block;width:auto;max-width:60px;margin:3px 0 0 auto}
"""
_FRACTION = re.compile(r"\.(\d+)")
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _int(value: Any) -> int:
    return int(value or 0)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.replace("Z", "+00:00")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:  # Python 3.10 reads only 3 or 6 digits of a second's fraction; entries may have 1 to 9
        try:
            t = datetime.fromisoformat(_FRACTION.sub(lambda m: "." + m[1].ljust(6, "0")[:6], text, count=1))
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _show_time(t: datetime | float | None, raw: Any = None) -> str:
    if t is None:
        return "" if raw is None else str(raw)
    if isinstance(t, float):
        t = datetime.fromtimestamp(t, timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d} d {h} h" if d else f"{h} h {m} min" if h else f"{m} min {s % 60} s"


@dataclass
class _Group:
    calls: int = 0
    errors: int = 0
    prompt: int = 0
    completion: int = 0
    total: Total = field(default_factory=Total)

    @property
    def cost(self) -> float:
        return self.total.value


def _groups(entries: list[Entry], key: Callable[[Entry], str]) -> dict[str, _Group]:
    out: dict[str, _Group] = {}
    for e in entries:
        g = out.setdefault(key(e), _Group())
        g.calls += 1
        g.errors += e.get("status") == "error"
        g.prompt += _int(e.get("prompt_tokens"))
        g.completion += _int(e.get("completion_tokens"))
        g.total.add(float(e.get("cost_usd") or 0.0))
    return out


def _group_table(ident: str, heading: str, groups: dict[str, _Group], total_cost: float) -> str:
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1].cost, kv[0]))
    rows = []
    for name, g in ranked[:MAX_GROUP_ROWS]:
        share = 100 * g.cost / total_cost if total_cost > 0 else 0.0
        rows.append(
            f'<tr><td class="name">{esc(name)}</td><td class="n">{g.calls:,}</td><td class="n">{g.errors:,}</td>'
            f'<td class="n">{g.prompt:,}</td><td class="n">{g.completion:,}</td>'
            f'<td class="n" data-value="{g.cost!r}">{usd(g.cost)}</td>'
            f'<td class="n">{share:.1f}%<span class="bar"><span style="width:{min(share, 100):.1f}%">'
            f'</span></span></td></tr>')
    rest = ranked[MAX_GROUP_ROWS:]
    if rest:
        cost = Total.of(g.total for _, g in rest)
        rows.append(f'<tr class="more"><td colspan="5">and {len(rest):,} more</td>'
                    f'<td class="n">{usd(cost)}</td><td></td></tr>')
    if not rows:
        rows.append('<tr class="more"><td colspan="7">no calls recorded</td></tr>')
    head = "".join(f'<th class="n">{h}</th>' for h in ("calls", "errors", "prompt tokens",
                                                        "completion tokens", "cost", "share"))
    return (f'<section id="{ident}"><h2>{esc(heading)}</h2><table class="groups">'
            f'<thead><tr><th>name</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _axis_usd(y: float, step: float) -> str:
    decimals = 0 if step == round(step) else max(0, math.ceil(-math.log10(step))) + 1
    return f"${y:,.{decimals}f}"


_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _time_ticks(t0: float, t1: float) -> tuple[list[float], str]:
    """Round UTC times (whole minutes, hours, days) between ``t0`` and ``t1``, and their strftime format."""
    step = next((s for s in _TIME_STEPS if (t1 - t0) / s <= 6), 86400 * math.ceil((t1 - t0) / 86400 / 6))
    days = t0 // 86400 != t1 // 86400
    fmt = "%Y-%m-%d" if step >= 86400 else "%m-%d %H:%M" if days else "%H:%M" if step >= 60 else "%H:%M:%S"
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) // step) + 1)], fmt


def _cost_chart(times: list[float], cumulative: list[float], budget: float | None) -> str:
    """Cumulative cost against time (seconds since the epoch), at most ``MAX_CHART_POINTS`` points."""
    if not times:
        return '<p class="none">no calls with a timestamp recorded</p>'
    n = len(times)
    step = max(1, math.ceil(n / (MAX_CHART_POINTS - 2)))  # room for the origin and the last call
    keep = list(range(0, n, step))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    xs = [times[0]] + [times[i] for i in keep]
    ys = [0.0] + [cumulative[i] for i in keep]
    t0, t1 = xs[0], max(xs[-1], xs[0] + 1)
    top = max(ys[-1], budget if budget and budget <= 1.25 * ys[-1] else 0.0)
    ystep = _nice_step(top) if top > 0 else 1.0
    ymax = ystep * max(1, math.ceil(top / ystep - 1e-9))
    w, h, left, right, up, down = 960, 300, 84, 24, 14, 44
    pw, ph = w - left - right, h - up - down

    def px(t: float) -> float:
        return left + pw * (t - t0) / (t1 - t0)

    def py(c: float) -> float:
        return up + ph * (1 - c / ymax)

    parts = [f'<svg id="cost-chart" viewBox="0 0 {w} {h}" role="img" aria-label="cumulative cost over time">']
    k = 0
    while (y := k * ystep) <= ymax * (1 + 1e-9):
        parts.append(f'<line class="gridline" x1="{left}" x2="{w - right}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
                     f"{esc(_axis_usd(y, ystep))}</text>")
        k += 1
    ticks, fmt = _time_ticks(t0, t1)
    for t in ticks:
        label = datetime.fromtimestamp(t, timezone.utc).strftime(fmt)
        parts.append(f'<line class="axis" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{h - down}" y2="{h - down + 5}"/>'
                     f'<text class="tick" x="{px(t):.1f}" y="{h - down + 18}" text-anchor="middle">'
                     f"{esc(label)}</text>")
    line = " ".join(f"{px(t):.1f},{py(c):.1f}" for t, c in zip(xs, ys))
    parts.append(f'<polygon class="area" points="{px(xs[0]):.1f},{h - down} {line} {px(xs[-1]):.1f},{h - down}"/>'
                 f'<polyline id="cost-line" class="cost" points="{line}" data-points="{len(xs)}"/>')
    if budget and budget <= ymax:
        parts.append(f'<line class="budget" x1="{left}" x2="{w - right}" y1="{py(budget):.1f}" y2="{py(budget):.1f}"/>'
                     f'<text class="tick" x="{w - right}" y="{py(budget) - 5:.1f}" text-anchor="end">'
                     f"budget {esc(usd(budget))}</text>")
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{up}" y2="{h - down}"/>'
                 f'<line class="axis" x1="{left}" x2="{w - right}" y1="{h - down}" y2="{h - down}"/>'
                 f'<text class="tick" x="{left + pw / 2:.0f}" y="{h - 6}" text-anchor="middle">time (UTC)</text>'
                 f'<text class="tick" transform="rotate(-90)" x="{-(up + ph / 2):.0f}" y="16" text-anchor="middle">'
                 "cumulative cost (USD)</text></svg>")
    return "".join(parts)


def _failed_table(failed: list[tuple[datetime | None, Entry]]) -> str:
    latest = sorted(failed, key=lambda te: te[0].timestamp() if te[0] else -math.inf, reverse=True)
    rows = []
    for t, e in latest[:MAX_FAILED_ROWS]:
        error = str(e.get("error") or "")
        if len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + "\u2026"
        task = "(analysis)" if e.get("task") is None else e["task"]
        attempt = "" if e.get("attempt") is None else e["attempt"]
        cells = (_show_time(t, e.get("timestamp")), task, attempt, e.get("agent") or "", e.get("requested_model") or "")
        rows.append(f'<tr><td class="nowrap">{esc(cells[0])}</td>' + "".join(f"<td>{esc(c)}</td>" for c in cells[1:])
                    + f'<td class="err">{esc(error)}</td></tr>')
    if len(latest) > MAX_FAILED_ROWS:
        rows.append(f'<tr class="more"><td colspan="6">and {len(latest) - MAX_FAILED_ROWS:,} more</td></tr>')
    if not rows:
        rows.append('<tr class="more"><td colspan="6">no failed calls</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("time (UTC)", "task", "attempt", "agent", "model", "error"))
    return (f'<section id="failed"><h2>Failed calls ({len(latest):,})</h2><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def _unresolved_table(unresolved: list[Entry]) -> str:
    rows = []
    for i in unresolved[:MAX_FAILED_ROWS]:
        task = "(analysis)" if i.get("task") is None else i["task"]
        cells = (_show_time(_time(i.get("timestamp")), i.get("timestamp")), task, i.get("attempt") or "",
                 i.get("agent") or "", i.get("requested_model") or "", i.get("endpoint") or "")
        rows.append("".join(f"<td>{esc(c)}</td>" for c in cells)
                    + f'<td class="n">{_int(i.get("prompt_chars")):,}</td>'
                    f'<td class="n">{_int(i.get("prompt_tokens_estimate")):,}</td><td class="err">{esc(UNKNOWN)}</td>')
    if len(unresolved) > MAX_FAILED_ROWS:
        rows.append(f'<td colspan="9">and {len(unresolved) - MAX_FAILED_ROWS:,} more</td>')
    if not rows:
        rows.append('<td colspan="9">every call sent has its result</td>')
    head = "".join(f"<th>{h}</th>" for h in ("time (UTC)", "task", "attempt", "agent", "model", "endpoint"))
    head += '<th class="n">prompt characters</th><th class="n">~prompt tokens</th><th>cost</th>'
    return (f'<section id="unresolved-calls"><h2>Sent with no result ({len(unresolved):,}): {esc(UNKNOWN)}</h2>'
            f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(f"<tr>{r}</tr>" for r in rows)}</tbody>'
            "</table></section>")


def _card(label: str, ident: str, data_value: object, shown: str, detail: str = "", css: str = "") -> str:
    """``detail`` is HTML, already escaped."""
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value {css}" id="{ident}" '
            f'data-value="{esc(data_value)}">{esc(shown)}</div><div class="detail">{detail}</div></div>')


def _num(ident: str, n: int) -> str:
    return f'<span id="{ident}" data-value="{n}">{n:,}</span>'


def render_report(entries: list[Entry], *, title: str, budget_usd: float | None,
                  unresolved: list[Entry] | None = None, chains: Sequence[ChainStatus] | None = None,
                  table_dates: Mapping[str, str] | None = None) -> str:
    """A complete HTML document summing up ``entries`` (ledger records, in any order): totals, breakdowns
    by requested model, agent and task, cumulative cost over time, the price tables used and the latest
    failed calls.

    ``budget_usd`` is the job's budget, or ``None`` for "no budget set". ``unresolved`` are the intents with
    no result, or ``None`` when the ledgers have no intents (then the page has no part about them).
    ``chains`` are the statuses of the files the entries were read from (a red banner at the top when one
    did not verify), or ``None`` when they were not checked. ``table_dates`` (price table id -> date, e.g. the
    shipped table's) dates the tables of entries written before entries kept the date. Nothing in the page
    is fetched.
    """
    costs = [float(e.get("cost_usd") or 0.0) for e in entries]
    total_cost = math.fsum(costs)
    errors = sum(e.get("status") == "error" for e in entries)
    tokens = {k: sum(_int(e.get(f"{k}_tokens")) for e in entries)
              for k in ("prompt", "cached_prompt", "completion", "reasoning")}
    times = [_time(e.get("timestamp")) for e in entries]
    timed = sorted((t.timestamp(), c) for t, c in zip(times, costs) if t is not None)
    cumulative, running = [], 0.0
    for _, c in timed:
        running += c
        cumulative.append(running)

    cards = [
        _card("total cost", "total-cost", repr(total_cost), usd(total_cost), f"{len(entries):,} ledger entries"),
        _card("tokens", "total-tokens", tokens["prompt"] + tokens["completion"],
              f"{tokens['prompt'] + tokens['completion']:,}",
              f'<div class="kv"><span>prompt</span>{_num("prompt-tokens", tokens["prompt"])}'
              f'<span>\u2003cached</span>{_num("cached-tokens", tokens["cached_prompt"])}'
              f'<span>completion</span>{_num("completion-tokens", tokens["completion"])}'
              f'<span>\u2003reasoning</span>{_num("reasoning-tokens", tokens["reasoning"])}</div>'),
        _card("calls", "total-calls", len(entries), f"{len(entries):,}",
              f'<div class="kv"><span>ok</span>{_num("calls-ok", len(entries) - errors)}'
              f'<span>error</span>{_num("calls-error", errors)}</div>'),
    ]
    if unresolved is not None:
        chars = sum(_int(i.get("prompt_chars")) for i in unresolved)
        cards.append(_card("sent, no result", "unresolved", len(unresolved), f"{len(unresolved):,}",
                           f"{esc(UNKNOWN)}: not in the total cost; {chars:,} prompt characters"
                           if unresolved else "every call sent has its result", "over" if unresolved else ""))
    if budget_usd is None:
        cards.append(_card("budget used", "budget-used", "", "no budget set"))
    else:
        pct = 100 * total_cost / budget_usd if budget_usd > 0 else math.inf
        over = " over" if pct > 100 else ""
        meter = f'<div class="meter{over}"><span style="width:{min(pct, 100):.1f}%"></span></div>'
        cards.append(_card("budget used", "budget-used", repr(pct), f"{pct:.1f}%",
                           f'{usd(total_cost)} of <span id="budget" data-value="{budget_usd!r}">'
                           f"{usd(budget_usd)}</span>{meter}", "over" if over else ""))
    if timed:
        first, last = timed[0][0], timed[-1][0]
        span = (f'<div class="kv"><span>first</span><span id="time-first">{esc(_show_time(first))}</span>'
                f'<span>last</span><span id="time-last">{esc(_show_time(last))}</span></div>')
        cards.append(_card("time span (UTC)", "time-span", last - first, _duration(last - first), span))
    else:
        cards.append(_card("time span", "time-span", "", "\u2014", "no timestamps"))

    jobs = sorted({str(e.get("job")) for e in entries if e.get("job") is not None})
    runs = len({e.get("run_id") for e in entries if e.get("run_id") is not None})
    shown_jobs = ", ".join(jobs[:5]) + (f" and {len(jobs) - 5} more" if len(jobs) > 5 else "")
    sub = f"{len(entries):,} ledger entries \u00b7 {runs:,} run(s)" + (f" \u00b7 job {shown_jobs}" if jobs else "")
    by_model = _groups(entries, lambda e: str(e.get("requested_model") or e.get("model") or "(unknown)"))
    by_agent = _groups(entries, lambda e: str(e.get("agent") or "(none)"))
    by_task = _groups(entries, lambda e: "(analysis)" if e.get("task") is None else str(e["task"]))
    failed = [(t, e) for t, e in zip(times, entries) if e.get("status") == "error"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>"
        + ("" if chains is None else banner(chains))
        + f'<h1 id="title">{esc(title)}</h1><p class="sub">{esc(sub)}</p>'
        f'<div class="cards">{"".join(cards)}</div>\n'
        + ("" if chains is None else chain_section(chains) + "\n")
        + f"<section><h2>Cumulative cost</h2>{_cost_chart([t for t, _ in timed], cumulative, budget_usd)}</section>\n"
        f'<div class="grid">{_group_table("by-model", "By model", by_model, total_cost)}'
        f'{_group_table("by-agent", "By agent", by_agent, total_cost)}</div>\n'
        f'{_group_table("by-task", "By task", by_task, total_cost)}\n'
        f"{prices_section(price_rows(entries, table_dates or {}))}\n"
        f"{_failed_table(failed)}\n"
        + ("" if unresolved is None else _unresolved_table(unresolved) + "\n")
        + "</body></html>\n"
    )
