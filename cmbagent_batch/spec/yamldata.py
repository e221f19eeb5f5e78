"""Plain data from a composed YAML node tree, under the YAML 1.2 core schema (``yamlio`` reads the file).

Scalars get their core-schema types (``plain_scalar_tag``), a duplicate key is a problem located at the
second key, merge keys (``<<``) work as in YAML 1.1, aliases share one Python object, and a tree whose
aliases expand beyond ``MAX_EXPANSION_RATIO`` is refused before anything walks it (``check_expansion``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

from cmbagent_batch.errors import Problem, SpecError

# Refuse documents whose aliases expand to more nodes than this many per distinct node (and over
# the absolute floor): a real spec reuses a block of defaults, a bomb multiplies it a billion times.
MAX_EXPANSION_RATIO = 100
EXPANSION_FLOOR = 1_000_000

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"
SEQ = "tag:yaml.org,2002:seq"
MAP = "tag:yaml.org,2002:map"


_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_NULL = re.compile(r"^(?:~|null|Null|NULL)$")


def plain_scalar_tag(value: str) -> str:
    """The YAML 1.2 core-schema type of an unquoted scalar (plus ``<<`` merge keys)."""
    if not value:
        return NULL
    c = value[0]
    if c in "tTfF":
        return BOOL if _BOOL.match(value) else STR
    if c in "-+0123456789.":
        if _INT.match(value):
            return INT
        return FLOAT if _FLOAT.match(value) else STR
    if c in "~nN":
        return NULL if _NULL.match(value) else STR
    if value == "<<":
        return MERGE
    return STR


class CoreResolver(BaseResolver):
    """Implicit types of the YAML 1.2 core schema; the C parser calls ``resolve`` for every node."""

    _memo: ClassVar[dict[str, str]] = {}  # shared by every parse: plain scalars resolve the same way

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            if not implicit[0]:
                return STR
            tag = self._memo.get(value)
            if tag is None:
                tag = plain_scalar_tag(value)
                if len(self._memo) < 4096:  # keys and small values repeat; long texts do not
                    self._memo[value] = tag
            return tag
        return SEQ if kind is SequenceNode else MAP


def merge_sources(node: Node) -> list[MappingNode]:
    """The mappings a ``<<`` merge key's value names: one mapping, or each mapping of a list."""
    if isinstance(node, MappingNode):
        return [node]
    if isinstance(node, SequenceNode):
        return [n for n in node.value if isinstance(n, MappingNode)]
    return []


def json_path(path: Iterator[Any] | tuple[Any, ...] | list[Any]) -> str:
    """``("tasks", 3, "depends_on", 0)`` -> ``$.tasks[3].depends_on[0]``."""
    out = ["$"]
    for step in path:
        if isinstance(step, int):
            out.append(f"[{step}]")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(step)):
            out.append(f".{step}")
        else:
            out.append("[" + repr(str(step)) + "]")
    return "".join(out)


_IN_TASK = re.compile(r"\$\.tasks\[(\d+)\](.*)")


def name_tasks(problems: list[Problem], data: Any) -> list[Problem]:
    """``problems``, each one inside a task entry (``$.tasks[N]...``) naming that entry's id as written
    (a matrix entry's id template, ``gen-{i}``) when it has one; a problem with the id itself quotes it."""
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        return problems
    out = []
    for p in problems:
        found = _IN_TASK.match(p.path)
        if found and found.group(2) != ".id" and int(found.group(1)) < len(tasks):
            entry = tasks[int(found.group(1))]
            tid = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(tid, str) and tid:
                p = dataclasses.replace(p, task=tid)
        out.append(p)
    return out


def check_expansion(root: Node, file: str) -> None:
    """Refuse alias bombs: compute the expanded node count in O(distinct nodes)."""
    size: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in size and not done:
            continue
        children = _children(node)
        if not done:
            size[key] = -1  # in progress; a recursive alias would revisit it
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        total = 1
        for c in children:
            s = size.get(id(c), 1)
            total += max(s, 1)
        size[key] = min(total, 1 << 62)
    distinct = len(size)
    expanded = size[id(root)]
    if expanded > max(EXPANSION_FLOOR, MAX_EXPANSION_RATIO * distinct):
        mark = root.start_mark
        raise SpecError(
            [
                Problem(
                    file,
                    mark.line + 1,
                    mark.column + 1,
                    "$",
                    f"aliases expand {distinct:,} YAML nodes to {expanded:,}: refused as an "
                    "alias bomb (at most "
                    f"{MAX_EXPANSION_RATIO}x expansion over {EXPANSION_FLOOR:,} nodes)",
                )
            ]
        )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _scalar(node: ScalarNode, file: str, path: list[Any], problems: list[Problem]) -> Any:
    tag, value = node.tag, node.value

    def bad(message: str) -> Any:
        mark = node.start_mark
        problems.append(Problem(file, mark.line + 1, mark.column + 1, json_path(path), message))
        return value

    if tag == STR:
        return value
    if tag == INT:
        if not _INT.match(value):
            return bad(f"invalid !!int value {value!r}")
        return int(value, 0) if value[:2] in ("0o", "0x") else int(value, 10)
    if tag == FLOAT:
        if not _FLOAT.match(value) and not _INT.match(value):
            return bad(f"invalid !!float value {value!r}")
        lowered = value.lower()
        if lowered.endswith("nan"):
            return bad("not-a-number (.nan) is not allowed in a job spec")
        if lowered.endswith("inf"):
            return bad("infinity (.inf) is not allowed in a job spec; leave the key out for no limit")
        return float(value)
    if tag == BOOL:
        if not _BOOL.match(value):
            return bad(f"invalid !!bool value {value!r} (use true or false)")
        return value in ("true", "True", "TRUE")
    if tag == NULL:
        if not (value == "" or _NULL.match(value)):
            return bad(f"invalid !!null value {value!r}")
        return None
    return bad(f"unsupported YAML tag {short_tag(tag)!r}")


def short_tag(tag: str) -> str:
    """``tag:yaml.org,2002:python/object`` -> ``!!python/object``."""
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def construct(root: Node, file: str) -> tuple[Any, list[Problem]]:
    """Build plain data from the node tree, iteratively; aliases share one Python object."""
    problems: list[Problem] = []
    built: dict[int, Any] = {}

    def build(node: Node, path: list[Any]) -> Any:
        # Containers are created empty, registered, then filled from an explicit stack, so a
        # 10^6-deep or 10^6-long document never recurses.
        key = id(node)
        if key in built:
            return built[key]
        if isinstance(node, ScalarNode):
            value = _scalar(node, file, path, problems)
            built[key] = value
            return value
        if isinstance(node, SequenceNode):
            if node.tag != SEQ:
                _bad_tag(node, path)
            container: Any = []
        else:
            if node.tag != MAP:
                _bad_tag(node, path)
            container = {}
        built[key] = container
        pending.append((node, container, path))
        return container

    def _bad_tag(node: Node, path: list[Any]) -> None:
        mark = node.start_mark
        problems.append(
            Problem(file, mark.line + 1, mark.column + 1, json_path(path), f"unsupported YAML tag {short_tag(node.tag)!r}")
        )

    pending: list[tuple[Node, Any, list[Any]]] = []
    merges: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    result = build(root, [])
    while pending:
        node, container, path = pending.pop()
        if isinstance(node, SequenceNode):
            for i, child in enumerate(node.value):
                container.append(build(child, path + [i]))
            continue
        # build() queues sequences and mappings only (scalars are done at once)
        sources = _fill_mapping(cast(MappingNode, node), container, path, build, file, problems)
        if sources:
            merges.append((container, sources))
    _apply_merges(merges)
    return result, problems


def _fill_mapping(
    node: MappingNode,
    container: dict[str, Any],
    path: list[Any],
    build: Callable[[Node, list[Any]], Any],
    file: str,
    problems: list[Problem],
) -> list[dict[str, Any]]:
    """Fill ``container`` with the mapping's own keys; return the mappings it merges, in order."""
    first_seen: dict[str, Node] = {}
    merged: list[dict[str, Any]] = []
    for key_node, value_node in node.value:
        mark = key_node.start_mark
        if key_node.tag == MERGE:
            sources = merge_sources(value_node)
            if not sources or (isinstance(value_node, SequenceNode) and len(sources) != len(value_node.value)):
                problems.append(
                    Problem(file, mark.line + 1, mark.column + 1, json_path(path),
                            "'<<' merges a mapping or a list of mappings")
                )
                continue
            merged.extend(build(source, path) for source in sources)
            continue
        if not isinstance(key_node, ScalarNode):
            problems.append(
                Problem(file, mark.line + 1, mark.column + 1, json_path(path),
                        "a key must be a plain string, not a list or mapping")
            )
            continue
        name = key_node.value
        if name in first_seen:
            problems.append(
                Problem(
                    file,
                    mark.line + 1,
                    mark.column + 1,
                    json_path(path + [name]),
                    f"duplicate key {name!r} (first defined at line {first_seen[name].start_mark.line + 1})",
                )
            )
            continue
        first_seen[name] = key_node
        if value_node.__class__ is ScalarNode and value_node.tag == STR:  # most values: no path to make
            container[name] = value_node.value
        else:
            container[name] = build(value_node, path + [name])
    return merged


def _apply_merges(merges: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    """Copy merged keys in, sources before the mappings that merge them (merges can nest).

    Keys written in a mapping win over merged ones; of two merged mappings, the earlier wins.
    """
    sources_of = {id(c): (c, srcs) for c, srcs in merges}
    done: set[int] = set()
    for container, _ in merges:
        stack = [container]
        active: set[int] = set()
        while stack:
            top = stack[-1]
            key = id(top)
            if key in done:
                stack.pop()
                continue
            active.add(key)
            todo = [s for s in sources_of[key][1] if id(s) in sources_of and id(s) not in done and id(s) not in active]
            if todo:
                stack.extend(todo)
                continue
            for source in sources_of[key][1]:
                if source is top:
                    continue
                for name, value in source.items():
                    top.setdefault(name, value)
            done.add(key)
            stack.pop()
