"""Safe YAML reading that keeps every value's place in the file.

PyYAML's loaders keep the last of two equal keys, turn ``1:30:00`` into 5400 and ``no`` into False,
and expand aliases without limit. This module composes the document with libyaml (PyYAML's C parser)
and builds plain Python data itself, under the YAML 1.2 core schema:

- a duplicate key in a mapping is a problem, located at the second key;
- ``yes``/``no``/``on``/``off`` and ``1:30:00`` stay strings; no timestamps, no binary, no custom tags;
- aliases are shared, never copied, and a document whose expanded size explodes ("billion laughs")
  is refused before anything walks it;
- merge keys (``<<: *defaults``) work as in YAML 1.1.

The composed node tree stays available so that any later problem can be located by its JSON path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

from cmbagent_batch.errors import Problem

MAX_SPEC_BYTES = 256 * 1024 * 1024
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


# Aliases need anchors; without an anchor-like token the expansion check is skipped.
_MAY_HAVE_ANCHORS = re.compile(rb"(?:^|[\s\[{,])&[^\s&]", re.MULTILINE)


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

    _memo: dict[str, str] = {}

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


try:
    from yaml.cyaml import CParser as _Parser

    LIBYAML = True
except ImportError:  # pragma: no cover - PyPI wheels ship libyaml; a source build without it is slower
    from yaml.composer import Composer
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _PyParser(Reader, Scanner, Parser, Composer):
        def __init__(self, stream: Any) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)

    _Parser = _PyParser  # type: ignore[misc, assignment]
    LIBYAML = False


class _Composer(_Parser, CoreResolver):  # type: ignore[misc, valid-type]
    def __init__(self, stream: Any) -> None:
        _Parser.__init__(self, stream)
        CoreResolver.__init__(self)


@dataclass(frozen=True, slots=True)
class Document:
    """Plain data read from a YAML file, and the node tree that says where each value is."""

    file: str
    data: Any
    root: Node | None

    def item_lines(self, key: str) -> list[int]:
        """The 1-based line of every item of the top-level list ``key`` (e.g. each task)."""
        found = _find_key(self.root, key) if isinstance(self.root, MappingNode) else None
        if found is None or not isinstance(found[1], SequenceNode):
            return []
        return [item.start_mark.line + 1 for item in found[1].value]

    def locate(self, path: tuple[Any, ...], *, key: bool = False) -> tuple[int, int]:
        """(line, column), 1-based, of the value at ``path`` (of its key when ``key``).

        Walks as deep as the path exists and returns the deepest place found, so a problem about a
        missing key points at the mapping that lacks it.
        """
        node = self.root
        if node is None:
            return (1, 1)
        place = node
        for i, step in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, MappingNode) and isinstance(step, str):
                found = _find_key(node, step)
                if found is None:
                    break
                key_node, value_node = found
                place = key_node if (last and key) else value_node
                node = value_node
            elif isinstance(node, SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
                node = node.value[step]
                place = node
            else:
                break
        mark = place.start_mark
        return (mark.line + 1, mark.column + 1)


def _find_key(node: MappingNode, key: str) -> tuple[Node, Node] | None:
    """The (key, value) nodes of ``key`` in a mapping, looking through merge keys like loading does."""
    merged: list[MappingNode] = []
    for key_node, value_node in node.value:
        if key_node.tag == MERGE:
            merged.extend(_merge_sources(value_node))
        elif isinstance(key_node, ScalarNode) and key_node.value == key:
            return key_node, value_node
    for source in merged:
        found = _find_key(source, key)
        if found is not None:
            return found
    return None


def _merge_sources(node: Node) -> list[MappingNode]:
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


class YamlProblems(Exception):
    """Reading failed; ``problems`` says why (one for a file or syntax error, several for keys)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def read_yaml(file: str, *, max_bytes: int = MAX_SPEC_BYTES) -> Document:
    """Read one YAML document from ``file`` into plain data, or raise ``YamlProblems``."""
    raw = read_bytes(file, max_bytes=max_bytes)
    return parse_yaml(raw, file)


def read_bytes(file: str, *, max_bytes: int = MAX_SPEC_BYTES) -> bytes:
    """The file's bytes, with one clear problem for a missing, unreadable or oversized file."""

    def fail(message: str) -> YamlProblems:
        return YamlProblems([Problem(file, None, None, "$", message)])

    if os.path.isdir(file):
        raise fail("is a directory, not a YAML file")
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise fail(f"file is {size:,} bytes, over the {max_bytes:,}-byte limit for a job spec")
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise fail("no such file") from None
    except PermissionError:
        raise fail("permission denied") from None
    except IsADirectoryError:  # pragma: no cover - raced with the isdir check
        raise fail("is a directory, not a YAML file") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:  # a pipe or a file that grew while read
        raise fail(f"file is over the {max_bytes:,}-byte limit for a job spec")
    return raw


def parse_yaml(raw: bytes, file: str) -> Document:
    """Parse bytes holding one YAML document; see the module docstring for the rules."""

    def fail(message: str, line: int | None = None, column: int | None = None) -> YamlProblems:
        return YamlProblems([Problem(file, line, column, "$", message)])

    if b"\x00" in raw[:8192]:
        raise fail("binary file, not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise fail(f"not UTF-8 text (bad byte 0x{raw[exc.start]:02x})", line, 1) from None
    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise fail("the file is empty")
    composer = _Composer(text)
    try:
        root = composer.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = _yaml_error_text(exc, text)
        if mark is None:  # pragma: no cover - libyaml always marks its errors
            raise fail(message) from None
        raise fail(message, mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:  # pragma: no cover - e.g. a reader error without a mark
        raise fail(f"invalid YAML: {exc}") from None
    finally:
        composer.dispose()
    if root is None:
        raise fail("the file is empty")
    if _MAY_HAVE_ANCHORS.search(raw):
        _check_expansion(root, file)
    data, problems = _construct(root, file)
    if problems:
        raise YamlProblems(problems)
    return Document(file, data, root)


def _yaml_error_text(exc: yaml.MarkedYAMLError, text: str) -> str:
    problem = exc.problem or ""
    mark = exc.problem_mark
    if mark is not None and "cannot start any token" in problem:
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        if line[mark.column:mark.column + 1] == "\t":
            return "invalid YAML: a tab character cannot indent YAML; indent with spaces"
    context = exc.context or ""
    if "expected a single document" in context + problem:
        return "expected one YAML document, found several (remove the extra '---')"
    cm = exc.context_mark
    if context and cm is not None and (mark is None or (cm.line, cm.column) != (mark.line, mark.column)):
        context = f"{context} started at line {cm.line + 1}, column {cm.column + 1}"
    parts = [p for p in (context, problem) if p]
    return "invalid YAML: " + (": ".join(parts) if parts else "cannot parse")


def _check_expansion(root: Node, file: str) -> None:
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
        raise YamlProblems(
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


def _construct(root: Node, file: str) -> tuple[Any, list[Problem]]:
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
        sources = _fill_mapping(node, container, path, build, file, problems)
        if sources:
            merges.append((container, sources))
    _apply_merges(merges)
    return result, problems


def _fill_mapping(
    node: MappingNode,
    container: dict[str, Any],
    path: list[Any],
    build: Any,
    file: str,
    problems: list[Problem],
) -> list[dict[str, Any]]:
    """Fill ``container`` with the mapping's own keys; return the mappings it merges, in order."""
    first_seen: dict[str, Node] = {}
    merged: list[dict[str, Any]] = []
    for key_node, value_node in node.value:
        mark = key_node.start_mark
        if key_node.tag == MERGE:
            sources = _merge_sources(value_node)
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
