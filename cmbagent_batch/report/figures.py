"""Small pieces every section of the run report uses: a figure with its id and exact value, durations,
the run's capacity, and the time axis of a chart (the ledger report's ticks)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.ledger.report import _time_ticks

# Colours of the states and kinds (the page's legend says them).
STATE_COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "retrying": "#ef6c00", "interrupted": "#8e24aa",
                 "cancelled": "#9aa5b1", "budget_exceeded": "#6d4c41", "running": "#1565c0",
                 "upstream_failed": "#e57373", "skipped": "#cfd8dc", "pending": "#eceff1", "queued": "#b0bec5"}
KIND_COLOURS = {"shell": "#3f7fbf", "python": "#2e9d6b", "agent": "#b5651d", "": "#7b8794"}
_NODES = re.compile(r"(?:(\d[\d,]*) nodes?|([\w.,-]+)): ([\d,]+) CPUs(?:, GPUs ([\d,]+))?")


def figure(ident: str, value: object, shown: str, tag: str = "span") -> str:
    """``shown`` as text, with the exact ``value`` a test or a script reads (``id``, ``data-value``)."""
    return f'<{tag} id="{esc(ident)}" data-value="{esc(value)}">{esc(shown)}</{tag}>'


def card(label: str, ident: str, value: object, shown: str, detail: str = "") -> str:
    """A summary card; ``detail`` is HTML, already escaped."""
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value" id="{esc(ident)}" '
            f'data-value="{esc(value)}">{esc(shown)}</div><div class="detail">{detail}</div></div>')


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``3 min 07 s``, ``4.2 s``, ``35 ms``."""
    if seconds != seconds:  # nan
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def capacity(manifest: dict[str, Any]) -> tuple[int, int, str]:
    """The run's cores and GPUs, and where the figure comes from: its booked inventory, else its task
    slots (run.json ``workers``: the attempts that may run at once, one core each)."""
    inventory = manifest.get("inventory")
    if isinstance(inventory, str):
        cores = gpus = 0
        for nodes, _name, cpus, ids in _NODES.findall(inventory):
            n = int(nodes.replace(",", "")) if nodes else 1
            cores += n * int(cpus.replace(",", ""))
            gpus += n * len([x for x in ids.split(",") if x]) if ids else 0
        if cores:
            return cores, gpus, f"the inventory: {inventory}"
    workers = int(manifest.get("workers") or 1)
    return workers, 0, f"{workers} task slots (run.json workers), one core each"


def time_axis(t0: float, t1: float, x: Callable[[float], float], top: float, bottom: float) -> str:
    """Ticks and grid lines of round UTC times between ``t0`` and ``t1``; ``x`` maps a time to the chart."""
    if t1 <= t0:
        return ""
    ticks, fmt = _time_ticks(t0, t1)
    if len(ticks) < 2:  # a run of a few seconds: seconds from its start
        step = max(0.001, (t1 - t0) / 5)
        return "".join(f'<line class="gridline" x1="{x(t0 + i * step):.1f}" x2="{x(t0 + i * step):.1f}" y1="{top}" '
                       f'y2="{bottom}"/><text class="tick" x="{x(t0 + i * step):.1f}" y="{bottom + 14}" '
                       f'text-anchor="middle">+{i * step:.2f} s</text>' for i in range(6))
    return "".join(f'<line class="gridline" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{bottom}"/>'
                   f'<text class="tick" x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">'
                   f"{esc(datetime.fromtimestamp(t, timezone.utc).strftime(fmt))}</text>" for t in ticks)


def section(ident: str, title: str, body: str, note: str = "") -> str:
    """A section of the page; ``note`` (HTML) says what was aggregated or left out, and why."""
    return (f'<section id="{ident}"><h2>{esc(title)}</h2>'
            + (f'<p class="note" id="{ident}-note">{note}</p>' if note else "") + body + "</section>\n")
