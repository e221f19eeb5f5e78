"""The hash chain of ``ledger.jsonl``: how a line is written, and what is wrong with one.

A line is ``{"seq":N,"prev":"<hash of line N-1>",<the entry's fields in FIELDS order>,"hash":"<h>"}``
(the ``OPTIONAL_FIELDS`` an entry has come after its ``FIELDS``)
where ``h`` is the sha256 of the line's bytes before ``,"hash":"``, and the first line's ``prev`` is
64 zeros (``ledger.intents.jsonl`` is chained the same way, with an intent's fields). A reader checks a
line without re-serialising it: the start must be exactly ``{"seq":N,"prev":"<previous hash>",`` and the
hash of the bytes before the last ``,"hash":"`` must be the one written after it. A string value cannot
hide a ``,"hash":"`` since JSON escapes its quotes. ``ChainCheck`` checks lines as a reader goes, so a
command that reads a ledger verifies it in the same pass. Everything here is pure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from cmbagent_batch.ledger.entry import FIELDS, OPTIONAL_FIELDS
from cmbagent_batch.ledger.verdict import Verdict

GENESIS = "0" * 64  # the "prev" of the first line
NOT_CHAINED = "not a chained ledger line"  # how the problem of a line that is no chained line at all starts
HASH_MARK = b',"hash":"'
TAIL = len(HASH_MARK) + 64 + 2  # bytes of ,"hash":"<64 hex>"} at the end of a line
_MARK = len(HASH_MARK)
_START = re.compile(rb'\{"seq":(\d+),"prev":"([0-9a-f]{64})",')


def chain_line(seq: int, prev: str, entry: Mapping[str, Any], fields: tuple[str, ...] = FIELDS,
               optional: tuple[str, ...] = OPTIONAL_FIELDS) -> tuple[bytes, str]:
    """Line ``seq`` (newline included) holding ``entry``'s ``fields`` (and those of ``optional`` it has) after
    a line whose hash is ``prev``; and its hash."""
    body = orjson.dumps({"seq": seq, "prev": prev, **{k: entry[k] for k in fields},
                         **{k: entry[k] for k in optional if k in entry}})
    prefix = body[:-1]
    digest = hashlib.sha256(prefix).hexdigest()
    return b"%s%s%s\"}\n" % (prefix, HASH_MARK, digest.encode("ascii")), digest


def chain_lines(entries: Iterable[Mapping[str, Any]], seq: int = 0, prev: str = GENESIS,
                fields: tuple[str, ...] = FIELDS, optional: tuple[str, ...] = OPTIONAL_FIELDS) -> Iterator[bytes]:
    """The lines holding ``entries``, continuing a chain of ``seq`` lines whose last hash is ``prev``."""
    for entry in entries:
        seq += 1
        line, prev = chain_line(seq, prev, entry, fields, optional)
        yield line


def line_hash(line: bytes) -> str | None:
    """The hash a line carries, when it ends like a chained line (its content is not checked)."""
    end = len(line) - TAIL
    if end < 0 or line[end:end + len(HASH_MARK)] != HASH_MARK or not line.endswith(b'"}'):
        return None
    return line[end + len(HASH_MARK):-2].decode("ascii", "replace")


def line_problem(line: bytes, seq: int, prev: str) -> str | None:
    """What is wrong with ``line`` as line ``seq`` after a line whose hash is ``prev``, or None.

    ``ChainCheck`` only calls this to word a problem it found.
    """
    start = _START.match(line)
    if start is None:
        return f"{NOT_CHAINED} (it does not start with seq and prev)"
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


class ChainCheck:
    """Checks the lines of a chain in order, one ``feed`` each, then ``end`` gives the ``Verdict``.

    One prefix test and one hash a line; after the first bad line, lines are not looked at. The hash of
    line ``anchor_line`` is kept (to compare with a recorded head).
    """

    __slots__ = ("anchor_line", "at_anchor", "bad", "prev", "seq")

    def __init__(self, anchor_line: int = 0) -> None:
        self.anchor_line = anchor_line
        self.seq = 0  # lines that passed
        self.prev = GENESIS.encode("ascii")  # hash of the last of them
        self.at_anchor: bytes | None = None
        self.bad: tuple[int, str] | None = None  # the first bad line and what is wrong with it

    def feed(self, line: bytes) -> bool:
        """Check the next line (without its newline); False once a line was bad."""
        if self.bad is not None:
            return False
        seq, prev = self.seq + 1, self.prev
        cut = len(line) - TAIL  # where ,"hash":" starts in a well-formed line
        written = line[cut + _MARK:-2]
        if (cut < 0 or not line.startswith(b'{"seq":%d,"prev":"%s",' % (seq, prev))
                or line[cut:cut + _MARK] != HASH_MARK or line[-2:] != b'"}'
                or hashlib.sha256(line[:cut]).hexdigest().encode() != written):
            self.bad = (seq, line_problem(line, seq, prev.decode("ascii")) or NOT_CHAINED)
            return False
        self.seq, self.prev = seq, written
        if seq == self.anchor_line:
            self.at_anchor = written
        return True

    def end(self, tail: bytes = b"") -> Verdict:
        """The verdict, given what followed the last newline (a line cut short when not empty)."""
        head = self.prev.decode("ascii")
        at_anchor = None if self.at_anchor is None else self.at_anchor.decode("ascii")
        if self.bad is not None:
            return Verdict(self.seq, head, self.bad[0], self.bad[1], at_anchor)
        if tail:
            return Verdict(self.seq, head, self.seq + 1,
                           "incomplete last line (no newline at its end): the file was cut", at_anchor)
        return Verdict(self.seq, head, at_anchor=at_anchor)
