"""The report's summary: tasks by state, makespan, core-hours used against allocated, LLM tokens and
dollars, cost per succeeded task, and one line per run of the job (a resumed job has several)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from cmbagent_batch.ledger.money import usd
from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.report.figures import STATE_COLOURS, capacity, card, duration, figure, section
from cmbagent_batch.report.gather import Gathered
from cmbagent_batch.rundir.runview import UP_TO_DATE
from cmbagent_batch.states import Tally, TaskState


@dataclass(frozen=True)
class Totals:
    """The summary's figures (the other sections use some)."""

    tally: Tally
    makespan: float
    cores: int
    gpus: int
    capacity_from: str
    core_hours: float  # used by the run's attempts
    allocated: float  # capacity x makespan
    cost: float  # LLM dollars, the whole ledger
    tokens: int
    done: int  # tasks that have succeeded, in this run or an earlier one

    @property
    def utilisation(self) -> float:
        return self.core_hours / self.allocated if self.allocated > 0 else 0.0


def totals(g: Gathered) -> Totals:
    tally = Tally.of(g.state.values())
    cores, gpus, source = capacity(g.manifest)
    line = g.lines.get(g.run_id)
    used = line.core_s / 3600 if line else 0.0
    cost = math.fsum(float(e.get("cost_usd") or 0.0) for e in g.entries)
    tokens = sum(int(e.get("prompt_tokens") or 0) + int(e.get("completion_tokens") or 0) for e in g.entries)
    earlier = sum(1 for s in g.planned_note.values() if s == UP_TO_DATE)
    return Totals(tally, g.makespan, cores, gpus, source, used, cores * g.makespan / 3600, cost, tokens,
                  tally[TaskState.SUCCEEDED] + earlier)


def _clock(t: float | None) -> str:
    return "-" if t is None or not math.isfinite(t) else \
        datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render_summary(g: Gathered, t: Totals) -> str:
    states = "".join(
        f'<span class="chip"><i style="background:{STATE_COLOURS.get(s.value, "#999")}"></i>{esc(s.value)} '
        f'{figure("count-" + s.value, t.tally[s], f"{t.tally[s]:,}")}</span>' for s in TaskState if t.tally[s])
    status = str(g.manifest.get("status") or "")
    if g.runner_gone:
        status = "interrupted (runner gone)"
    code = g.manifest.get("exit_code")
    pct = 100 * t.utilisation
    per_task = t.cost / t.done if t.done else 0.0
    cards = [
        card("tasks", "tasks-total", t.tally.total, f"{t.tally.total:,}", states),
        card("makespan", "makespan", round(t.makespan, 6), duration(t.makespan),
             f"from the run's first task start to its last task end; run.json: {esc(_clock(g.started))} to "
             f"{esc(_clock(g.ended) if g.ended else 'now (running)')} UTC"),
        card("core-hours used / allocated", "utilisation", round(t.utilisation, 6), f"{pct:.1f}%",
             f'{figure("core-hours-used", round(t.core_hours, 6), f"{t.core_hours:,.3f}")} of '
             f'{figure("core-hours-allocated", round(t.allocated, 6), f"{t.allocated:,.3f}")} core-hours '
             f'({figure("capacity-cores", t.cores, f"{t.cores:,}")} cores: {esc(t.capacity_from)}, over the makespan)'),
        card("LLM cost", "llm-cost", repr(t.cost), usd(t.cost),
             f'{figure("llm-tokens", t.tokens, f"{t.tokens:,}")} tokens in '
             f'{figure("llm-calls", len(g.entries), f"{len(g.entries):,}")} calls (the whole ledger)'),
        card("per succeeded task", "cost-per-success", repr(per_task), usd(per_task),
             f'LLM dollars over the {figure("tasks-done", t.done, f"{t.done:,}")} tasks that have succeeded; '
             f'{esc(f"{t.core_hours / max(1, t.tally[TaskState.SUCCEEDED]):.4f}")} core-hours per task '
             "succeeded in this run"),
    ]
    head = (f'<p class="sub">Job <b>{esc(g.manifest.get("job"))}</b> in {esc(g.run_dir)} \u00b7 '
            f'{figure("run-status", status, status)}'
            + (f' \u00b7 exit code {figure("exit-code", code, str(code))}' if code is not None else "")
            + f' \u00b7 backend {esc(g.manifest.get("backend"))}, {esc(g.manifest.get("ranks"))} rank(s), '
            f'{esc(g.manifest.get("workers"))} workers'
            + (f' \u00b7 inventory {esc(g.manifest.get("inventory"))}' if g.manifest.get("inventory") else "")
            + "</p>")
    return head + f'<div class="cards">{"".join(cards)}</div>\n' + _runs(g)


def _runs(g: Gathered) -> str:
    rows = []
    for run in g.runs:
        line = g.lines[run]
        this = run == g.run_id
        first, last = g.window() if this else (line.first, line.last)  # its records' times (run.json's: whole seconds)
        ended = ", ".join(f"{n:,} {s}" for s, n in sorted(line.ended.items())) or "-"
        rows.append(f'<tr id="run-{esc(run)}"{" class=this" if this else ""}><td class="hash">{esc(run)}'
                    f'{" (this run)" if this else ""}</td><td class="nowrap">{esc(_clock(first))}</td>'
                    f'<td class="n">{esc(duration(max(0.0, last - first)))}</td><td class="n">{line.attempts:,}</td>'
                    f"<td>{esc(ended)}</td><td class=\"n\">{line.core_s / 3600:,.3f}</td>"
                    f'<td class="n" data-value="{line.cost!r}">{esc(usd(line.cost))}</td></tr>')
    head = ("<th>run</th><th>started (UTC)</th><th class=n>span</th><th class=n>attempts</th>"
            "<th>tasks it ended</th><th class=n>core-hours</th><th class=n>LLM cost</th>")
    body = (f'<table id="runs" data-value="{len(g.runs)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
    return section("run-lines", f"Runs of this job ({len(g.runs):,})", body,
                   "One line per run of the run directory (a job resumed, requeued or rerun); the other figures "
                   "of this page are of the latest run, run.json's, unless they say otherwise.")
