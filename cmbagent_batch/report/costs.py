"""The report's costs: LLM dollars and core-hours per task, per model and per matrix value, with a link to
the ledger's own report (written beside the run report when the job has a ledger). Each table lists at most
``MAX_ROWS`` groups, the largest first, and sums the others in one line."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping

from cmbagent_batch.ledger.money import usd
from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.report.figures import figure, section
from cmbagent_batch.report.gather import Gathered
from cmbagent_batch.report.job import JobView
from cmbagent_batch.report.tasks import TaskFigures

MAX_ROWS = 200


def _table(ident: str, title: str, rows: Iterable[tuple[str, int, float, float]], unit: str) -> str:
    """Rows of (name, count, dollars, core-hours), the costliest first."""
    listed = list(rows)
    ranked = heapq.nsmallest(MAX_ROWS, listed, key=lambda r: (-r[2], -r[3], r[0]))
    shown = set(ranked)
    rest = [r for r in listed if r not in shown] if len(listed) > MAX_ROWS else []
    body = [f'<tr><td class="name">{esc(name)}</td><td class="n">{n:,}</td>'
            f'<td class="n" data-value="{cost!r}">{esc(usd(cost))}</td><td class="n">{hours:,.4f}</td></tr>'
            for name, n, cost, hours in ranked]
    if rest:
        body.append(f'<tr class="more"><td>and {len(rest):,} more</td><td class="n">{sum(r[1] for r in rest):,}</td>'
                    f'<td class="n">{esc(usd(math.fsum(r[2] for r in rest)))}</td>'
                    f'<td class="n">{sum(r[3] for r in rest):,.4f}</td></tr>')
    if not body:
        body.append('<tr class="more"><td colspan="4">none</td></tr>')
    return (f'<div id="{ident}" data-value="{len(listed)}"><h3>{esc(title)}</h3><table class="groups"><thead><tr><th>name</th>'
            f'<th class="n">{esc(unit)}</th><th class="n">LLM cost</th><th class="n">core-hours</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def render_costs(g: Gathered, job: JobView, figures: Mapping[int, TaskFigures], costs: Mapping[str, float],
                 ledger_page: str | None) -> str:
    calls: dict[str, int] = {}
    models: dict[str, list[float]] = {}
    for e in g.entries:
        tid = "(analysis)" if e.get("task") is None else str(e["task"])
        calls[tid] = calls.get(tid, 0) + 1
        m = models.setdefault(str(e.get("requested_model") or e.get("model") or "(unknown)"), [0, 0.0])
        m[0] += 1
        m[1] += float(e.get("cost_usd") or 0.0)
    hours = {g.ids[i]: f.core_s / 3600 for i, f in figures.items()}
    per_task = [(tid, calls.get(tid, 0), costs.get(tid, 0.0), hours.get(tid, 0.0))
                for tid in hours.keys() | costs.keys()]
    per_model = [(name, int(n), cost, 0.0) for name, (n, cost) in models.items()]
    groups: dict[str, list[float]] = {}
    for tid, values in job.matrix_values():
        if tid not in hours and tid not in costs:
            continue
        for name, value in values.items():
            grp = groups.setdefault(f"{name}={value}", [0, 0.0, 0.0])
            grp[0] += 1
            grp[1] += costs.get(tid, 0.0)
            grp[2] += hours.get(tid, 0.0)
    per_value = [(name, int(n), cost, h) for name, (n, cost, h) in groups.items()]
    total = math.fsum(float(e.get("cost_usd") or 0.0) for e in g.entries)
    link = (f'<p>The ledger\'s own report, with every call, tokens, prices and the chain: '
            f'<a id="ledger-report-link" href="{esc(ledger_page)}">{esc(ledger_page)}</a></p>' if ledger_page else
            '<p class="none">No model call is in the ledger.</p>')
    body = (link + '<div class="grid3">' + _table("cost-by-task", "By task", per_task, "calls")
            + _table("cost-by-model", "By model", per_model, "calls")
            + _table("cost-by-matrix", "By matrix value", per_value, "tasks") + "</div>")
    note = (f'LLM dollars of the whole ledger ({figure("costs-total", repr(total), usd(total))}) and core-hours of '
            f"the latest run's attempts, each table the costliest first (at most {MAX_ROWS} rows, the others "
            "summed in one line). A task of a matrix entry counts once under each of its values.")
    return section("costs", "Costs", body, note)
