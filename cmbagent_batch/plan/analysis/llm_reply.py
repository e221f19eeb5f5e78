"""What LLM dependency analysis says to the model, and how its reply is checked: pure functions, no I/O.

A reply is accepted only when every edge in it is well formed, names known tasks, stays within the tasks
asked about and makes no cycle together with the known edges. Anything else is a *problem*, reported back
to the model word for word in a fix round (see ``fix_messages``), never silently repaired.
"""

from __future__ import annotations

import difflib
import json
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.plan.dag import EDGE_TYPES, Edge
from cmbagent_batch.spec.model import TaskSpec

# Bump whenever the text or the schema sent to the model changes: it is part of analysis cache keys.
PROMPT_VERSION = "1"

TEXT_LIMIT = 2000  # characters of one task text sent to the model
_EDGE_KEYS = ("from", "to", "type", "reason")
_ENUM_LIMIT = 500  # above this many tasks the schema lists no id enum (endpoints cap enum sizes)

SYSTEM_PROMPT = f"""\
You find the dependencies between the tasks of a batch job, so that independent tasks can run in parallel.
Task B depends on task A when B cannot start before A has finished. Dependency types:
- data: B uses results that A computes;
- file: B reads a file that A writes;
- api: B uses a service, database or other resource that A sets up or changes;
- logic: B's work builds on A's conclusions or decisions;
- order: B must come after A for another reason the tasks state.
Propose a dependency only when the task texts justify it, and give that justification in one sentence as the
reason. A missing dependency gives wrong results; an unneeded one makes the job slower. A dependency already
implied by a chain of others need not be listed.
Do not repeat the known dependencies, and propose nothing that would make a cycle.
Texts longer than {TEXT_LIMIT} characters are cut and end with a [truncated ...] mark.
Reply with a JSON object only, no other text:
{{"edges": [{{"from": "<id of the task that finishes first>", "to": "<id of the task that depends on it>", \
"type": "data|file|api|logic|order", "reason": "<why>"}}]}}
Reply {{"edges": []}} when no dependency is missing."""


@dataclass(frozen=True)
class ReplyCheck:
    """The verdict on one reply: accepted edges, or the problems that make it unusable."""

    edges: tuple[Edge, ...]  # sorted by (src, dst); empty when there are problems
    problems: tuple[str, ...]
    notes: tuple[str, ...]  # harmless things dropped or ignored

    @property
    def ok(self) -> bool:
        return not self.problems


def _cut(text: str) -> str:
    if len(text) <= TEXT_LIMIT:
        return text
    return f"{text[:TEXT_LIMIT]} [truncated: {len(text)} characters in full]"


def task_facts(task: TaskSpec) -> dict[str, Any]:
    """What the model is told about one task; hash this (with PROMPT_VERSION) for a cache key."""
    facts: dict[str, Any] = {"id": task.id, "kind": task.kind}
    for name in ("agent", "description", "instructions", "run", "call"):
        value = getattr(task, name)
        if value:
            facts[name] = _cut(str(value))
    if task.inputs:
        facts["inputs"] = list(task.inputs)
    if task.outputs:
        facts["outputs"] = list(task.outputs)
    return facts


def build_messages(tasks: Sequence[TaskSpec], known: Iterable[tuple[str, str]],
                   ask_about: Collection[str] | None = None) -> list[dict[str, str]]:
    """The first request's messages."""
    known_list = [{"from": a, "to": b} for a, b in sorted(set(known))]
    parts = [
        "Tasks:",
        json.dumps([task_facts(t) for t in tasks], indent=1, ensure_ascii=False),
        "Known dependencies (already decided; do not repeat them):",
        json.dumps(known_list, ensure_ascii=False) if known_list else "none",
    ]
    if ask_about is not None:
        parts.append("Only propose dependencies with at least one end among these tasks; "
                     "the others are already decided: " + json.dumps(sorted(ask_about), ensure_ascii=False))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(parts)}]


def fix_messages(first: Sequence[Mapping[str, str]], reply: str | None,
                 problems: Sequence[str]) -> list[dict[str, str]]:
    """A follow-up request: the first messages, the unusable reply, and what was wrong with it."""
    text = "Your reply has these problems:\n" + "\n".join(f"- {p}" for p in problems) + (
        "\nSend the corrected reply: the complete JSON object with every missing dependency, "
        "not only the changed ones.")
    return [dict(m) for m in first] + [{"role": "assistant", "content": reply or ""},
                                       {"role": "user", "content": text}]


def reply_schema(task_ids: Collection[str]) -> dict[str, Any]:
    """The strict JSON schema of a reply (for ``response_format`` type ``json_schema``)."""
    id_schema: dict[str, Any] = {"type": "string"}
    if len(task_ids) <= _ENUM_LIMIT:
        id_schema["enum"] = sorted(task_ids)
    edge = {
        "type": "object",
        "properties": {"from": id_schema, "to": id_schema,
                       "type": {"type": "string", "enum": list(EDGE_TYPES)}, "reason": {"type": "string"}},
        "required": list(_EDGE_KEYS),
        "additionalProperties": False,
    }
    return {"type": "object", "properties": {"edges": {"type": "array", "items": edge}},
            "required": ["edges"], "additionalProperties": False}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _keys(names: Iterable[str]) -> str:
    return ", ".join(json.dumps(n) for n in sorted(names))


def check_reply(content: str | None, task_ids: Collection[str], known: Collection[tuple[str, str]],
                ask_about: Collection[str] | None = None) -> ReplyCheck:
    """Check one reply: its edges (source "llm") when usable, else every problem found."""
    if content is None or not content.strip():
        return ReplyCheck((), ("the reply is empty; send the JSON object",), ())
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        return ReplyCheck((), (f"the reply is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                               "send only the JSON object",), ())
    if not isinstance(data, dict):
        return ReplyCheck((), (f'the reply must be a JSON object with the key "edges", not {_json_type(data)}',), ())
    if "edges" not in data:
        return ReplyCheck((), ('the reply has no "edges" key',), ())
    if not isinstance(data["edges"], list):
        return ReplyCheck((), (f'"edges" must be an array, not {_json_type(data["edges"])}',), ())

    ids = set(task_ids)
    known_set = set(known)
    problems: list[str] = []
    notes: list[str] = []
    if extra := set(data) - {"edges"}:
        notes.append(f"ignored unexpected key(s) {_keys(extra)} in the reply")
    seen: dict[tuple[str, str], int] = {}
    candidates: list[tuple[int, Edge]] = []
    for i, item in enumerate(data["edges"]):
        where = f"edges[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object with from, to, type and reason, not {_json_type(item)}")
            continue
        before = len(problems)
        if missing := [k for k in _EDGE_KEYS if k not in item]:
            problems.append(f"{where} lacks {_keys(missing)}")
        if extra := set(item) - set(_EDGE_KEYS):
            notes.append(f"ignored unexpected key(s) {_keys(extra)} in {where}")
        for key in ("from", "to", "type", "reason"):
            if key in item and not isinstance(item[key], str):
                problems.append(f"{where}.{key} must be a string, not {_json_type(item[key])}")
        for key in ("from", "to"):
            value = item.get(key)
            if isinstance(value, str) and value not in ids:
                hint = difflib.get_close_matches(value, sorted(ids), n=1)
                problems.append(f"{where}.{key}: unknown task id {json.dumps(value)}"
                                + (f" (did you mean {json.dumps(hint[0])}?)" if hint else ""))
        kind = item.get("type")
        if isinstance(kind, str) and kind not in EDGE_TYPES:
            problems.append(f"{where}.type must be one of {', '.join(EDGE_TYPES)}, not {json.dumps(kind)}")
        reason = item.get("reason")
        if isinstance(reason, str) and not reason.strip():
            problems.append(f"{where}.reason is empty")
        if len(problems) > before:
            continue
        src, dst, reason = str(item["from"]), str(item["to"]), str(item["reason"])
        pair = f"({json.dumps(src)} -> {json.dumps(dst)})"
        if src == dst:
            problems.append(f"{where}: task {json.dumps(src)} cannot depend on itself")
        elif (src, dst) in seen:
            problems.append(f"{where} repeats edges[{seen[src, dst]}] {pair}")
        elif (src, dst) in known_set:
            seen[src, dst] = i
            notes.append(f"dropped edges[{i}] {pair}: already a known dependency")
        elif ask_about is not None and src not in ask_about and dst not in ask_about:
            seen[src, dst] = i
            problems.append(f"{where} {pair} involves none of the tasks asked about")
        else:
            seen[src, dst] = i
            candidates.append((i, Edge(src=src, dst=dst, type=str(kind), source="llm", reason=reason.strip())))
    for i, edge, cycle in find_cycles(known_set, candidates):
        problems.append(f"edges[{i}] ({json.dumps(edge.src)} -> {json.dumps(edge.dst)}) closes a cycle: "
                        + " -> ".join(cycle))
    if problems:
        return ReplyCheck((), tuple(problems), tuple(notes))
    return ReplyCheck(tuple(sorted((e for _, e in candidates), key=lambda e: (e.src, e.dst))), (), tuple(notes))


def find_cycles(known: Collection[tuple[str, str]],
                proposed: Sequence[tuple[int, Edge]]) -> list[tuple[int, Edge, list[str]]]:
    """Each distinct cycle through a proposed edge, once, as (index, edge, [src, dst, ..., src]).

    Iterative breadth-first search (no recursion limit on long chains); neighbours in sorted order so the
    same input always names the same cycle.
    """
    graph: dict[str, set[str]] = {}
    for a, b in [*known, *((e.src, e.dst) for _, e in proposed)]:
        graph.setdefault(a, set()).add(b)
    found: list[tuple[int, Edge, list[str]]] = []
    seen_cycles: set[frozenset[tuple[str, str]]] = set()
    for i, edge in proposed:
        parent: dict[str, str | None] = {edge.dst: None}
        queue = deque([edge.dst])
        while queue and edge.src not in parent:
            node = queue.popleft()
            for nxt in sorted(graph.get(node, ())):
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if edge.src not in parent:
            continue
        back: list[str] = [edge.src]  # walk back from src to dst
        while back[-1] != edge.dst:
            prev = parent[back[-1]]
            assert prev is not None
            back.append(prev)
        cycle = [edge.src, *reversed(back)]  # src -> dst -> ... -> src
        key = frozenset(zip(cycle, cycle[1:]))
        if key not in seen_cycles:
            seen_cycles.add(key)
            found.append((i, edge, cycle))
    return found
