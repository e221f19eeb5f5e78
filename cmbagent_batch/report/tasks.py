"""The report's table of tasks: failures first, each with its root cause (an ``upstream_failed`` task names
the task that failed) and its stderr's last lines, then the others, longest first; each with why it ran in
the latest run (the reason ``status --explain`` gave before it). The page sorts, filters and pages it.

At most ``MAX_ROWS`` rows are written (every failure first, up to that many); the totals line is over
every task, and the page says how many rows were left out."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cmbagent_batch.ledger.money import usd
from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.report.figures import STATE_COLOURS, duration, figure, section
from cmbagent_batch.report.gather import Gathered
from cmbagent_batch.report.reasons import Reasons
from cmbagent_batch.rundir.layout import Layout, tail_lines
from cmbagent_batch.states import TaskState

MAX_ROWS = 2000
MAX_TAILS = 200  # stderr tails read
TAIL = 5


@dataclass
class TaskFigures:
    """One task's attempts in the latest run, summed."""

    attempts: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    rss: float = 0.0
    core_s: float = 0.0
    rank: int = 0
    host: str = ""


def task_figures(g: Gathered, run: list[int]) -> dict[int, TaskFigures]:
    a = g.attempts
    out: dict[int, TaskFigures] = {}
    for k in run:
        f = out.get(a.task[k])
        if f is None:
            f = out[a.task[k]] = TaskFigures()
        end = g.now if math.isnan(a.end[k]) else a.end[k]
        f.attempts += 1
        f.wall += end - a.start[k]
        f.cpu += a.cpu[k]
        f.rss = max(f.rss, a.rss[k])
        f.core_s += (end - a.start[k]) * a.cores[k]
        f.rank, f.host = a.rank[k], g.hosts[a.host[k]]
    return out


def costs_by_task(g: Gathered) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in g.entries:
        tid = "(analysis)" if e.get("task") is None else str(e["task"])
        out[tid] = out.get(tid, 0.0) + float(e.get("cost_usd") or 0.0)
    return out


def _why(g: Gathered, tid: str, state: TaskState, reasons: Reasons, ran: bool) -> str:
    if ran:
        return reasons.of(tid) or "ran in this run (the reason was not kept)"
    note = g.planned_note.get(tid)
    if note:
        return f"skipped: {note}"
    return "did not run in this run" if state is not TaskState.PENDING else "not run yet"


def render_tasks(g: Gathered, run: list[int], kinds: Mapping[str, str], figures: dict[int, TaskFigures],
                 costs: Mapping[str, float], reasons: Reasons) -> str:
    layout = Layout.of(os.path.abspath(g.run_dir))
    order = {"failed": 0, "budget_exceeded": 1, "interrupted": 2, "upstream_failed": 3, "cancelled": 4}
    failing = sorted(g.failures, key=lambda tid: (order.get(g.failures[tid].state, 5), tid))
    rest = sorted((tid for tid in g.state if tid not in g.failures),
                  key=lambda tid: (-_fig(g, figures, tid).wall, tid))
    shown = (failing + rest)[:MAX_ROWS]
    rows, tails = [], 0
    for tid in shown:
        state = g.state[tid]
        f = _fig(g, figures, tid)
        ran = g.pos.get(tid) in figures
        detail = ""
        failure = g.failures.get(tid)
        if failure is not None:
            detail = esc(failure.reason)
            if failure.root:
                root = g.failures.get(failure.root)
                detail += (f'<div class="root">root cause: <b>{esc(failure.root)}</b>'
                           + (f" ({esc(root.state)}: {esc(root.reason)})" if root else "") + "</div>")
            if ran and tails < MAX_TAILS:
                tails += 1
                tail = tail_lines(os.path.join(layout.work_dir(failure.rank, tid), "logs", "stderr.log"), TAIL)
                if tail:
                    detail += f'<pre class="tail">{esc(chr(10).join(tail))}</pre>'
        cost = costs.get(tid, 0.0)
        colour = STATE_COLOURS.get(state.value, "#999")
        rows.append(
            f'<tr data-state="{esc(state.value)}"><td class="name">{esc(tid)}</td>'
            f'<td><i class="dot" style="background:{colour}"></i>{esc(state.value)}</td><td>{esc(kinds.get(tid, ""))}</td>'
            f'<td class="why">{esc(_why(g, tid, state, reasons, ran))}</td><td class="n">{f.attempts}</td>'
            f'<td class="nowrap">{esc(f"{f.rank} {f.host}" if ran else "")}</td>'
            f'<td class="n" data-sort="{f.wall:.6f}">{esc(duration(f.wall) if ran else "")}</td>'
            f'<td class="n" data-sort="{f.cpu:.6f}">{esc(duration(f.cpu) if ran else "")}</td>'
            f'<td class="n" data-sort="{f.rss:.3f}">{f"{f.rss:,.1f}" if ran else ""}</td>'
            f'<td class="n" data-sort="{cost!r}">{esc(usd(cost)) if cost else ""}</td><td class="err">{detail}</td></tr>')
    heads = ["task", "state", "kind", "why it ran", "attempts", "rank, host", "wall", "CPU", "peak RSS (MB)",
             "LLM cost", "error, root cause, stderr"]
    numeric = {4, 6, 7, 8, 9}
    head = "".join(f'<th{" class=n" if i in numeric else ""} data-col="{i}">{esc(h)}</th>' for i, h in enumerate(heads))
    all_wall = sum(f.wall for f in figures.values())
    all_cpu = sum(f.cpu for f in figures.values())
    all_cost = math.fsum(costs.values())
    total = (f'<tr class="total"><td colspan="4">all {figure("tasks-listed-of", len(g.state), f"{len(g.state):,}")} '
             f'tasks of the run</td><td class="n">{sum(f.attempts for f in figures.values()):,}</td><td></td>'
             f'<td class="n">{esc(duration(all_wall))}</td><td class="n">{esc(duration(all_cpu))}</td><td></td>'
             f'<td class="n">{esc(usd(all_cost))}</td><td></td></tr>')
    left = len(g.state) - len(shown)
    note = (f"Failures first ({figure('failures', len(g.failures), f'{len(g.failures):,}')}), then the others by "
            "wall time, longest first. Click a heading to sort; type to filter (task, state, kind, reason). "
            f"Figures are of the latest run's attempts; the stderr tail of up to {MAX_TAILS} failures is shown.")
    if left > 0:
        note += (f" {figure('tasks-not-listed', left, f'{left:,}')} more tasks are not listed (only the first "
                 f"{MAX_ROWS:,} rows are written: every failure first); the totals line counts them all.")
    tools = ('<div class="tools"><input id="task-filter" type="search" placeholder="filter tasks" '
             'aria-label="filter tasks"><span id="task-pages"></span></div>')
    table = (f'<table id="tasks-table" data-value="{len(shown)}"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody><tfoot>{total}</tfoot></table>')
    return section("tasks", "Tasks", tools + table, note)


def _fig(g: Gathered, figures: dict[int, TaskFigures], tid: str) -> TaskFigures:
    i = g.pos.get(tid)
    return figures.get(i, _NONE) if i is not None else _NONE


_NONE = TaskFigures()
