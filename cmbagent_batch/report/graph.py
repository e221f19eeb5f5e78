"""The report's DAG: a job of up to ``MAX_NODES`` tasks drawn as it is (levels left to right, each task by
its state, the critical path outlined); a bigger one by level (a bar per level, its tasks by state), at most
``MAX_LEVELS`` levels drawn and the others summed in one line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.report.figures import STATE_COLOURS, figure, section
from cmbagent_batch.states import TaskState

MAX_NODES = 150
MAX_EDGES = 600
MAX_LEVELS = 200


def render_graph(dag: Dag | None, states: Mapping[str, TaskState], path: Sequence[str], note: str) -> str:
    if dag is None:
        return section("dag", "DAG", f'<p class="none">{esc(note)}</p>')
    levels = dag.levels()
    counts = (f'{figure("dag-nodes", len(dag.nodes), f"{len(dag.nodes):,}")} tasks, '
              f'{figure("dag-edges", len(dag.edges), f"{len(dag.edges):,}")} edges, '
              f'{figure("dag-levels", len(levels), f"{len(levels):,}")} levels')
    small = len(dag.nodes) <= MAX_NODES and len(dag.edges) <= MAX_EDGES
    body = _drawn(dag, levels, states, set(path)) if small else _by_level(levels, states)
    how = ("Each task is a box, by its state now; levels left to right; the critical path outlined." if small else
           f"More than {MAX_NODES} tasks or {MAX_EDGES} edges: drawn by level, each level a bar of its tasks by "
           f"state (at most {MAX_LEVELS} levels; the others summed on the last line).")
    return section("dag", "DAG", f"<p>{counts}.</p>" + body, esc(how + (" " + note if note else "")))


def _colour(states: Mapping[str, TaskState], tid: str) -> str:
    state = states.get(tid)
    return STATE_COLOURS.get(state.value if state else "pending", "#999")


def _drawn(dag: Dag, levels: Sequence[Sequence[str]], states: Mapping[str, TaskState], crit: set[str]) -> str:
    bw, bh, gx, gy = 150, 22, 60, 10
    tallest = max((len(level) for level in levels), default=1)
    w, h = len(levels) * (bw + gx) + 20, tallest * (bh + gy) + 20
    at = {tid: (10 + i * (bw + gx), 10 + j * (bh + gy)) for i, level in enumerate(levels) for j, tid in enumerate(level)}
    parts = [f'<svg id="dag-drawing" viewBox="0 0 {w} {h}" style="max-width:{w}px" role="img" aria-label="the DAG">']
    for e in dag.edges:
        (x0, y0), (x1, y1) = at[e.src], at[e.dst]
        on = e.src in crit and e.dst in crit
        parts.append(f'<path class="edge{" crit" if on else ""}" d="M{x0 + bw},{y0 + bh / 2} C{x0 + bw + gx / 2},'
                     f'{y0 + bh / 2} {x1 - gx / 2},{y1 + bh / 2} {x1},{y1 + bh / 2}"><title>{esc(e.src)} \u2192 '
                     f"{esc(e.dst)} ({esc(e.source)}: {esc(e.reason)})</title></path>")
    for tid, (x, y) in at.items():
        state = states.get(tid)
        label = tid if len(tid) <= 22 else tid[:21] + "\u2026"
        parts.append(f'<g class="node{" crit" if tid in crit else ""}"><title>{esc(tid)}: '
                     f'{esc(state.value if state else "not in this run")}</title><rect x="{x}" y="{y}" width="{bw}" '
                     f'height="{bh}" rx="4" fill="{_colour(states, tid)}"/><text x="{x + 6}" y="{y + 15}">{esc(label)}'
                     "</text></g>")
    return "".join(parts) + "</svg>"


def _by_level(levels: Sequence[Sequence[str]], states: Mapping[str, TaskState]) -> str:
    widest = max(len(level) for level in levels)
    rows = []
    for i, level in enumerate(levels[:MAX_LEVELS]):
        by: dict[str, int] = {}
        for tid in level:
            state = states.get(tid)
            key = state.value if state else "pending"
            by[key] = by.get(key, 0) + 1
        bar = "".join(f'<span style="width:{100 * n / widest:.2f}%;background:{STATE_COLOURS.get(s, "#999")}" '
                      f'title="{esc(s)}: {n:,}"></span>' for s, n in sorted(by.items()))
        rows.append(f'<tr><td class="n">{i}</td><td class="n">{len(level):,}</td><td class="levelbar">{bar}</td>'
                    f'<td>{esc(", ".join(f"{n:,} {s}" for s, n in sorted(by.items())))}</td></tr>')
    rest = levels[MAX_LEVELS:]
    if rest:
        rows.append(f'<tr class="more"><td colspan="4">and {len(rest):,} more levels of '
                    f"{sum(map(len, rest)):,} tasks</td></tr>")
    return ('<table id="dag-levels-table"><thead><tr><th class="n">level</th><th class="n">tasks</th>'
            f'<th>by state</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
