"""The report's timeline of the latest run (a Gantt of its attempts per rank and slot, coloured by state and
kind, the critical path marked, each attempt's detail on hover) and its utilisation over time (busy cores
and GPUs against capacity, idle time shaded). Inline SVG.

Up to ``MAX_BARS`` attempts each is a bar; beyond, each rank's row is drawn as the share of its slots busy
in each of ``BINS`` time bins, and only the attempts on the critical path and the first ``MAX_MARKS`` failed
ones are drawn one by one: the page says so."""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence

from cmbagent_batch.ledger.money import usd
from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.report.figures import KIND_COLOURS, STATE_COLOURS, duration, figure, section, time_axis
from cmbagent_batch.report.gather import STATES, Gathered
from cmbagent_batch.report.summary import Totals

MAX_BARS = 2500
BINS = 400
MAX_MARKS = 500
W, LEFT, RIGHT = 1100, 110, 16
_FAILED = {"failed", "retrying", "budget_exceeded"}
_FAILED_CODES = frozenset(i for i, s in enumerate(STATES) if s.value in _FAILED)


def critical_path(g: Gathered, run: list[int], dag: Dag | None) -> list[str]:
    """The tasks the latest run waited on, last first: from the task that ended last, each step to the
    dependency (that ran in the run) that ended last. Without the DAG, the task that ended last alone."""
    a = g.attempts
    last: dict[int, float] = {}
    for k in run:
        end = a.end[k]
        if not math.isnan(end) and end > last.get(a.task[k], -math.inf):
            last[a.task[k]] = end
    if not last:
        return []
    cur = max(last, key=lambda i: (last[i], g.ids[i]))
    path = [g.ids[cur]]
    while dag is not None and g.ids[cur] in dag:
        deps = [g.pos[d] for d in dag.dependencies(g.ids[cur]) if g.pos.get(d) in last]
        if not deps:
            break
        cur = max(deps, key=lambda i: (last[i], g.ids[i]))
        path.append(g.ids[cur])
    return path


def _span(g: Gathered, run: list[int]) -> tuple[float, float]:
    """The time the charts show: the run's window, widened to every attempt of ``run`` (not empty)."""
    a = g.attempts
    t0, t1 = g.window()
    t0 = min(t0, min(a.start[k] for k in run))
    return t0, max(t0 + 1e-3, t1, max(g.now if math.isnan(a.end[k]) else a.end[k] for k in run))


def _hover(g: Gathered, k: int, kinds: Mapping[str, str]) -> str:
    a = g.attempts
    tid = g.ids[a.task[k]]
    end = a.end[k]
    wall = (g.now if math.isnan(end) else end) - a.start[k]
    state = "running" if math.isnan(end) else STATES[a.state[k]].value
    cost = g.attempt_cost.get((g.runs[a.run[k]], tid, a.number[k]))
    return (f"{tid} (attempt {a.number[k]}, {kinds.get(tid, 'kind unknown')}): {state}\nwall {duration(wall)}, "
            f"CPU {duration(a.cpu[k])}, peak RSS {a.rss[k]:,.1f} MB\nrank {a.rank[k]} on {g.hosts[a.host[k]]}"
            + (f", {a.cores[k]} cores" if a.cores[k] > 1 else "") + (f", {a.gpus[k]} GPUs" if a.gpus[k] else "")
            + (f"\ncost {usd(cost)}" if cost else ""))


def render_timeline(g: Gathered, run: list[int], kinds: Mapping[str, str], path: Sequence[str]) -> str:
    a = g.attempts
    if not run:
        return section("timeline", "Timeline", '<p class="none">no attempt in this run</p>')
    t0, t1 = _span(g, run)
    on_path = {g.pos[t] for t in path}
    rows = sorted({(a.rank[k], a.lane[k]) for k in run})
    detail = len(run) <= MAX_BARS
    if not detail and len(rows) > 60:  # one row a rank
        lanes: dict[int, int] = {}
        for rank, lane in rows:
            lanes[rank] = max(lanes.get(rank, 0), lane + 1)
        rows = [(rank, -1) for rank in sorted(lanes)]
    row_of = {r: i for i, r in enumerate(rows)}
    h = max(3.0, min(16.0, 640 / len(rows)))
    top, plot_h = 10, h * len(rows)
    bottom = top + plot_h + 14  # the critical path row
    pw = W - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + pw * (t - t0) / (t1 - t0)

    parts = [f'<svg id="gantt" viewBox="0 0 {W} {bottom + 30:.0f}" role="img" aria-label="attempts over time" '
             f'data-value="{len(run)}" data-mode="{"bars" if detail else "density"}">',
             time_axis(t0, t1, x, top, bottom)]
    step = max(1, math.ceil(len(rows) / 40))
    for i, (rank, lane) in enumerate(rows):
        if i % step == 0:
            label = f"rank {rank}" + (f" \u00b7 {lane}" if lane >= 0 else "")
            parts.append(f'<text class="tick" x="{LEFT - 6}" y="{top + h * i + h / 2 + 4:.1f}" text-anchor="end">'
                         f"{esc(label)}</text>")
    marked = 0
    if detail:
        for k in run:
            parts.append(_bar(g, k, kinds, x, top + h * row_of[(a.rank[k], a.lane[k])], h, a.task[k] in on_path))
    else:
        parts.append(_density(g, run, rows, row_of, x, t0, t1, top, h))
        for k in run:
            failed = a.state[k] in _FAILED_CODES
            if a.task[k] in on_path or (failed and marked < MAX_MARKS):
                marked += failed
                row = row_of[(a.rank[k], -1)] if (a.rank[k], -1) in row_of else row_of[(a.rank[k], a.lane[k])]
                parts.append(_bar(g, k, kinds, x, top + h * row, h, a.task[k] in on_path))
    # the critical path again, on a row of its own under the ranks
    for k in run:
        if a.task[k] in on_path:
            parts.append(_bar(g, k, kinds, x, top + plot_h + 3, 9, True))
    parts.append(f'<text class="tick" x="{LEFT - 6}" y="{top + plot_h + 11:.1f}" text-anchor="end">critical path</text>'
                 "</svg>")
    failures = sum(1 for k in run if a.state[k] in _FAILED_CODES)
    note = ("Each bar is an attempt of the latest run on its rank and slot (slot: the first free among those "
            "the rank ran at once); hover for its detail. Fill: the kind's colour for a success, the state's "
            "otherwise; a dark outline marks the critical path (from the task that ended last, back through "
            "the dependency that ended last), repeated on the last row.")
    if not detail:
        note = (f"{len(run):,} attempts are more than the {MAX_BARS:,} drawn one by one: each row is "
                f"{'a rank' if rows[0][1] < 0 else 'a slot of a rank'}, shaded by the share of its slots busy in "
                f"each of {BINS} time bins (hover a bin for its figures). Drawn one by one: the attempts on the "
                f"critical path and {min(failures, MAX_MARKS):,} of the {failures:,} failed attempts"
                + (" (the first by time)" if failures > MAX_MARKS else "") + ".")
    legend = "".join(f'<span class="chip"><i style="background:{c}"></i>{esc(k or "kind unknown")}</span>'
                     for k, c in KIND_COLOURS.items())
    legend += "".join(f'<span class="chip"><i style="background:{STATE_COLOURS[s]}"></i>{s}</span>'
                      for s in ("failed", "retrying", "interrupted", "cancelled", "running"))
    legend += f'<span class="chip"><i class="crit"></i>critical path ({figure("critical-path", len(path), str(len(path)))} tasks)</span>'
    return section("timeline", "Timeline", f'<div class="legend">{legend}</div>' + "".join(parts), esc(note))


def _bar(g: Gathered, k: int, kinds: Mapping[str, str], x: object, y: float, h: float, crit: bool) -> str:
    a = g.attempts
    end = a.end[k]
    state = "running" if math.isnan(end) else STATES[a.state[k]].value
    tid = g.ids[a.task[k]]
    fill = KIND_COLOURS.get(kinds.get(tid, ""), KIND_COLOURS[""]) if state == "succeeded" else STATE_COLOURS.get(state, "#999")
    x0 = x(a.start[k])  # type: ignore[operator]
    x1 = x(g.now if math.isnan(end) else end)  # type: ignore[operator]
    return (f'<rect class="bar{" crit" if crit else ""}" x="{x0:.1f}" y="{y + 0.5:.1f}" width="{max(0.8, x1 - x0):.1f}" '
            f'height="{max(1.0, h - 1):.1f}" fill="{fill}"><title>{esc(_hover(g, k, kinds))}</title></rect>')


def _density(g: Gathered, run: list[int], rows: list[tuple[int, int]], row_of: dict[tuple[int, int], int],
             x: object, t0: float, t1: float, top: float, h: float) -> str:
    a = g.attempts
    width = (t1 - t0) / BINS
    busy = array("d", bytes(8 * BINS * len(rows)))
    count = array("i", bytes(4 * BINS * len(rows)))
    slots = [0] * len(rows)
    for k in run:
        key = (a.rank[k], -1) if (a.rank[k], -1) in row_of else (a.rank[k], a.lane[k])
        r = row_of[key]
        slots[r] = max(slots[r], a.lane[k] + 1 if key[1] < 0 else 1)
        s, e = a.start[k], g.now if math.isnan(a.end[k]) else a.end[k]
        first, last = int((s - t0) / width), min(BINS - 1, int((e - t0) / width))
        count[r * BINS + max(0, min(first, BINS - 1))] += 1
        for b in range(max(0, first), last + 1):
            lo, hi = t0 + b * width, t0 + (b + 1) * width
            busy[r * BINS + b] += max(0.0, min(e, hi) - max(s, lo))
    out = []
    for r, (rank, _lane) in enumerate(rows):
        for b in range(BINS):
            v = busy[r * BINS + b]
            if v <= 0:
                continue
            share = min(1.0, v / (width * max(1, slots[r])))
            x0 = x(t0 + b * width)  # type: ignore[operator]
            out.append(f'<rect x="{x0:.1f}" y="{top + h * r:.1f}" width="{x(t0 + (b + 1) * width) - x0 + 0.2:.1f}" '  # type: ignore[operator]
                       f'height="{h:.1f}" fill="#2e7d32" fill-opacity="{0.15 + 0.85 * share:.2f}"><title>rank {rank}: '
                       f'{share:.0%} of {slots[r]} slots busy, {count[r * BINS + b]:,} attempts started</title></rect>')
    return "".join(out)


def render_utilisation(g: Gathered, run: list[int], t: Totals) -> str:
    """Busy cores (and GPUs) against capacity over the run, averaged per bin; bins with nothing running
    shaded as idle."""
    a = g.attempts
    if not run:
        return section("utilisation", "Utilisation over time", '<p class="none">no attempt in this run</p>')
    t0, t1 = _span(g, run)
    n = min(BINS * 2, 600)
    width = (t1 - t0) / n
    cores = array("d", bytes(8 * n))
    gpus = array("d", bytes(8 * n))
    for k in run:
        s, e = a.start[k], g.now if math.isnan(a.end[k]) else a.end[k]
        for b in range(max(0, int((s - t0) / width)), min(n - 1, int((e - t0) / width)) + 1):
            part = max(0.0, min(e, t0 + (b + 1) * width) - max(s, t0 + b * width)) / width
            cores[b] += part * a.cores[k]
            gpus[b] += part * a.gpus[k]
    top_value = max(t.cores, max(cores), 1)
    ph, top = 220, 10
    pw = W - LEFT - RIGHT

    def x(tt: float) -> float:
        return LEFT + pw * (tt - t0) / (t1 - t0)

    def y(v: float) -> float:
        return top + ph * (1 - v / top_value)

    idle = [b for b in range(n) if cores[b] <= 1e-9]
    parts = [f'<svg id="utilisation-chart" viewBox="0 0 {W} {top + ph + 34}" role="img" aria-label="busy cores over time">',
             time_axis(t0, t1, x, top, top + ph)]
    parts += [f'<rect class="idle" x="{x(t0 + b * width):.1f}" y="{top}" width="{pw / n + 0.3:.1f}" height="{ph}">'
              "<title>idle: nothing running</title></rect>" for b in idle]
    for label, series, css in (("cores", cores, "busy"), ("GPUs", gpus, "gpu")):
        if label == "GPUs" and not (t.gpus or max(gpus) > 0):
            continue
        points = " ".join(f"{x(t0 + b * width):.1f},{y(series[b]):.1f} {x(t0 + (b + 1) * width):.1f},{y(series[b]):.1f}"
                          for b in range(n))
        parts.append(f'<polyline class="{css}" points="{x(t0):.1f},{y(0):.1f} {points} {x(t1):.1f},{y(0):.1f}"/>')
    parts.append(f'<line class="budget" x1="{LEFT}" x2="{W - RIGHT}" y1="{y(t.cores):.1f}" y2="{y(t.cores):.1f}"/>'
                 f'<text class="tick" x="{W - RIGHT}" y="{y(t.cores) - 4:.1f}" text-anchor="end">capacity {t.cores:,} cores'
                 + (f", {t.gpus:,} GPUs" if t.gpus else "") + "</text>"
                 f'<text class="tick" x="{LEFT - 6}" y="{y(top_value) + 4:.1f}" text-anchor="end">{top_value:,.0f}</text>'
                 f'<text class="tick" x="{LEFT - 6}" y="{y(0) + 4:.1f}" text-anchor="end">0</text></svg>')
    idle_s = len(idle) * width
    note = (f"Busy cores (green; GPUs in purple when the run has some), averaged over {n} bins of "
            f"{esc(duration(width))}, against the capacity (dashed: {esc(t.capacity_from)}). Shaded: bins with "
            f'nothing running, {figure("idle-seconds", round(idle_s, 3), duration(idle_s))} in all.')
    return section("utilisation", "Utilisation over time", "".join(parts), note)
