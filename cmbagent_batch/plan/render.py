"""Plans as text for people, and as Graphviz dot and Mermaid for pictures: pure functions of the plan dict
(``text`` takes either form; ``dot`` and ``mermaid`` the schema's, ``build.schema_form``)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from cmbagent_batch.ledger.money import usd
from cmbagent_batch.plan.build import task_count

SHOW_IDS = 12  # ids listed per level in text; the rest are counted
SHOW_EDGES = 40
SOURCE_STYLE = {"explicit": "solid", "files": "dashed", "llm": "bold", "fallback": "dotted"}
SOURCE_COLOR = {"explicit": "black", "files": "blue4", "llm": "darkgreen", "fallback": "red"}


def _num(x: float) -> str:
    return f"{x:g}"


def text(plan: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """``notes``: lines said after the summary (the inventory the job's tasks are placed on)."""
    a = plan["analysis"]
    cp = plan["critical_path"]
    lines = [
        f"Job {plan['job']}: {task_count(plan):,} tasks, {len(plan['edges']):,} edges, "
        f"{len(plan['levels']):,} levels",
        f"Critical path: {_num(cp['length'])} ({' -> '.join(cp['tasks'][:8])}"
        + (f" -> ... {len(cp['tasks']) - 8} more" if len(cp["tasks"]) > 8 else "")
        + ")",
        f"Parallelism: at most {plan['parallelism']['max_width']:,} "
        f"task{'s' if plan['parallelism']['max_width'] != 1 else ''} at once, "
        f"{plan['parallelism']['average']:.2f} on average (total work / critical path)",
        _analysis_line(a),
    ]
    if a.get("cache_reason"):
        lines.append(f"  cache: {a['cache_reason']}")
    if a.get("fallback_used"):
        lines.append(f"  WARNING: LLM analysis failed, fallback '{a['fallback_used']}' used: {a.get('fallback_reason', '')}")
    lines.extend(notes)
    lines.append("")
    for i, ids in enumerate(plan["levels"]):
        shown = ", ".join(ids[:SHOW_IDS]) + (f", ... ({len(ids) - SHOW_IDS:,} more)" if len(ids) > SHOW_IDS else "")
        lines.append(f"Level {i} ({len(ids):,}): {shown}")
    if plan["edges"]:
        lines.append("")
        lines.append("Edges (from -> to [type, source]: reason):")
        for e in plan["edges"][:SHOW_EDGES]:
            lines.append(f"  {e['from']} -> {e['to']} [{e['type']}, {e['source']}]: {e['reason']}")
        if len(plan["edges"]) > SHOW_EDGES:
            lines.append(f"  ... {len(plan['edges']) - SHOW_EDGES:,} more (--format json lists them all)")
    return "\n".join(lines) + "\n"


def _analysis_line(a: dict[str, Any]) -> str:
    parts = [f"Analysis: sources {', '.join(a['sources'])}"]
    if a.get("model"):
        parts.append(f"model {a['model']}")
        parts.append(f"cache {a['cache']}")
        parts.append(f"{a['requests']} request{'s' if a['requests'] != 1 else ''}")
        if a.get("cost_usd"):
            parts.append(usd(a["cost_usd"]))
    return "; ".join(parts)


def _dot_id(value: str) -> str:
    return json.dumps(value)  # a double-quoted string with escapes, valid dot


def dot(plan: dict[str, Any]) -> str:
    lines = [f"digraph {_dot_id(plan['job'])} {{", "  rankdir=LR;", "  node [shape=box, fontname=Helvetica];"]
    for t in plan["tasks"]:
        lines.append(f"  {_dot_id(t['id'])} [label={_dot_id(t['id'] + chr(10) + t['kind'])}];")
    for e in plan["edges"]:
        style = SOURCE_STYLE.get(e["source"], "solid")
        color = SOURCE_COLOR.get(e["source"], "black")
        lines.append(
            f"  {_dot_id(e['from'])} -> {_dot_id(e['to'])} [label={_dot_id(e['type'] + ' (' + e['source'] + ')')}, "
            f"style={style}, color={color}, tooltip={_dot_id(e['reason'])}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_label(value: str) -> str:
    return '"' + re.sub(r'["<>]', lambda m: f"#{ord(m.group())};", value) + '"'


def mermaid(plan: dict[str, Any]) -> str:
    node = {t["id"]: f"t{i}" for i, t in enumerate(plan["tasks"])}
    lines = ["flowchart LR"]
    for t in plan["tasks"]:
        lines.append(f"  {node[t['id']]}[{_mermaid_label(t['id'])}]")
    arrows = {"explicit": "-->", "files": "-.->", "llm": "==>", "fallback": "-.->"}
    for e in plan["edges"]:
        arrow = arrows.get(e["source"], "-->")
        lines.append(f"  {node[e['from']]} {arrow}|{_mermaid_label(e['type'] + ' (' + e['source'] + ')')}| {node[e['to']]}")
    return "\n".join(lines) + "\n"
