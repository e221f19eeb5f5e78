"""The hash chain of ``ledger.jsonl``: how a line is written, and what is wrong with one.

A line is ``{"seq":N,"prev":"<hash of line N-1>",<the entry's fields in FIELDS order>,"hash":"<h>"}``
where ``h`` is the sha256 of the line's bytes before ``,"hash":"``, and the first line's ``prev`` is
64 zeros (``ledger.intents.jsonl`` is chained the same way, with an intent's fields). A reader checks a
line without re-serialising it: the start must be exactly ``{"seq":N,"prev":"<previous hash>",`` and the
hash of the bytes before the last ``,"hash":"`` must be the one written after it. A string value cannot
hide a ``,"hash":"`` since JSON escapes its quotes. Everything here is pure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from cmbagent_batch.ledger.entry import FIELDS

GENESIS = "0" * 64  # the "prev" of the first line
HASH_MARK = b',"hash":"'
TAIL = len(HASH_MARK) + 64 + 2  # bytes of ,"hash":"<64 hex>"} at the end of a line
_START = re.compile(rb'\{"seq":(\d+),"prev":"([0-9a-f]{64})",')


def chain_line(seq: int, prev: str, entry: Mapping[str, Any],
               fields: tuple[str, ...] = FIELDS) -> tuple[bytes, str]:
    """Line ``seq`` (newline included) holding ``entry``'s ``fields`` after a line whose hash is ``prev``;
    and its hash."""
    body = orjson.dumps({"seq": seq, "prev": prev, **{k: entry[k] for k in fields}})
    prefix = body[:-1]
    digest = hashlib.sha256(prefix).hexdigest()
    return b"%s%s%s\"}\n" % (prefix, HASH_MARK, digest.encode("ascii")), digest


def chain_lines(entries: Iterable[Mapping[str, Any]], seq: int = 0, prev: str = GENESIS,
                fields: tuple[str, ...] = FIELDS) -> Iterator[bytes]:
    """The lines holding ``entries``, continuing a chain of ``seq`` lines whose last hash is ``prev``."""
    for entry in entries:
        seq += 1
        line, prev = chain_line(seq, prev, entry, fields)
        yield line


def line_hash(line: bytes) -> str | None:
    """The hash a line carries, when it ends like a chained line (its content is not checked)."""
    end = len(line) - TAIL
    if end < 0 or line[end:end + len(HASH_MARK)] != HASH_MARK or not line.endswith(b'"}'):
        return None
    return line[end + len(HASH_MARK):-2].decode("ascii", "replace")


def line_problem(line: bytes, seq: int, prev: str) -> str | None:
    """What is wrong with ``line`` as line ``seq`` after a line whose hash is ``prev``, or None.

    The fast loop in ``verify.py`` only calls this to word a problem it found.
    """
    start = _START.match(line)
    if start is None:
        return "not a chained ledger line (it does not start with seq and prev)"
    found = int(start.group(1))
    if found > seq:
        return f"seq {found} where {seq} was expected: an entry before it was deleted, or lines were moved"
    if found < seq:
        return f"seq {found} where {seq} was expected: an entry was inserted before it, or lines were moved"
    if start.group(2).decode("ascii") != prev:
        which = "64 zeros for the first line" if seq == 1 else f"the hash of line {seq - 1}"
        return f"prev is not {which}: a line before it was replaced"
    written = line_hash(line)
    if written is None:
        return "no hash at the end of the line"
    if hashlib.sha256(line[:len(line) - TAIL]).hexdigest() != written:
        return "the hash does not match the line: the entry was edited"
    return None
