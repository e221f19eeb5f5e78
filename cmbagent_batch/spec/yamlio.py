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
Here: reading the file and composing it; ``yamldata.py`` builds the data from the node tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cmbagent_batch.errors import Problem, SpecError
from cmbagent_batch.spec.yamldata import MERGE, CoreResolver, check_expansion, construct, merge_sources, name_tasks

MAX_SPEC_BYTES = 256 * 1024 * 1024

# Aliases need anchors; without an anchor-like token the expansion check is skipped.
MAY_HAVE_ANCHORS = re.compile(rb"(?:^|[\s\[{,])&[^\s&]", re.MULTILINE)


try:
    from yaml._yaml import CParser as _Parser

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


class _Composer(_Parser, CoreResolver):
    def __init__(self, stream: Any) -> None:
        _Parser.__init__(self, stream)
        CoreResolver.__init__(self)


@dataclass(frozen=True, slots=True)
class Document:
    """Plain data read from a YAML file, and the node tree that says where each value is."""

    file: str
    data: Any
    root: Node | None

    def item_places(self, key: str) -> list[tuple[int, int]]:
        """The 1-based (line, column) of every item of the top-level list ``key`` (e.g. each task): what
        ``locate((key, i))`` gives for each, without a walk per item."""
        found = _find_key(self.root, key) if isinstance(self.root, MappingNode) else None
        if found is None or not isinstance(found[1], SequenceNode):
            return []
        return [(item.start_mark.line + 1, item.start_mark.column + 1) for item in found[1].value]

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
            merged.extend(merge_sources(value_node))
        elif isinstance(key_node, ScalarNode) and key_node.value == key:
            return key_node, value_node
    for source in merged:
        found = _find_key(source, key)
        if found is not None:
            return found
    return None


def read_yaml(file: str, *, max_bytes: int = MAX_SPEC_BYTES) -> Document:
    """Read one YAML document from ``file`` into plain data, or raise ``SpecError`` saying why."""
    raw = read_bytes(file, max_bytes=max_bytes)
    return parse_yaml(raw, file)


def read_bytes(file: str, *, max_bytes: int = MAX_SPEC_BYTES) -> bytes:
    """The file's bytes, with one clear problem for a missing, unreadable or oversized file."""

    def fail(message: str) -> SpecError:
        return SpecError([Problem(file, None, None, "$", message)])

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

    def fail(message: str, line: int | None = None, column: int | None = None) -> SpecError:
        return SpecError([Problem(file, line, column, "$", message)])

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
    if may_have_anchors(raw):
        check_expansion(root, file)
    data, problems = construct(root, file)
    if problems:
        raise SpecError(name_tasks(problems, data))
    return Document(file, data, root)


def may_have_anchors(raw: bytes) -> bool:
    """Whether ``MAY_HAVE_ANCHORS`` is found in ``raw``, tried only where there is a '&' (searched for
    everywhere, the pattern costs 15 ms a megabyte; most specs have no '&', or a few, in shell lines)."""
    i = raw.find(b"&")
    while i != -1:
        if MAY_HAVE_ANCHORS.match(raw, max(i - 1, 0)):  # the '&' at i, after a space, '[', '{', ',' or first
            return True
        i = raw.find(b"&", i + 1)
    return False


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
    return "invalid YAML: " + (": ".join(parts) if parts else "cannot parse") + _flow_placeholder_hint(exc, text)


_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_FLOW_ITEM = re.compile(r"(?:\{[A-Za-z_][A-Za-z0-9_]*\}|[^\s,\[\]{}])+")  # cls_{lmax}.txt, x_{a}_{b}
_FLOW_KINDS = {"while parsing a flow sequence": "[...]", "while parsing a flow mapping": "{...}"}


def _flow_placeholder_hint(exc: yaml.MarkedYAMLError, text: str) -> str:
    """A hint when a ``{NAME}`` placeholder inside a flow collection is the error (``outputs:
    [cls_{lmax}.txt]``: there ``{`` starts a flow mapping), else ''."""
    kind = _FLOW_KINDS.get(exc.context or "")
    mark = exc.problem_mark
    if kind is None or mark is None:
        return ""
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    found = next((m for m in _PLACEHOLDER.finditer(line) if m.start() <= mark.column <= m.end()), None)
    if found is None:
        return ""
    item = next((m.group() for m in _FLOW_ITEM.finditer(line) if m.start() <= found.start() < m.end()), "")
    example = f', as "{item}"' if item and '"' not in item and "\\" not in item else ""
    return f" ({found.group()} inside {kind} is YAML flow syntax, not a placeholder: quote the value{example})"
