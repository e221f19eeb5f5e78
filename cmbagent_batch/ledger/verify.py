"""``ledger verify``: is the chain whole, and does it end where the run said it ended?

The chain alone shows an edited, deleted, moved or inserted line and a cut in the middle of a line.
A cut at a line boundary leaves a shorter chain that is whole; only a head hash and entry count kept
elsewhere (``run.json``'s ``ledger`` record, or given on the command line) show it.

The intents file beside the ledger (``intents.py``) is a chain of its own, checked the same way; its
intents that were not paired when merged are looked for in the ledger, and those still without a result
are the calls possibly billed. No record anchors it: a cut at one of its line boundaries would not show.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import orjson

from cmbagent_batch.ledger.chain import GENESIS, HASH_MARK, TAIL, line_problem
from cmbagent_batch.ledger.files import Lines, intents_beside
from cmbagent_batch.ledger.intents import Intents

_MARK = len(HASH_MARK)


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where the ledger ended when something else recorded it."""

    entries: int
    head: str
    source: str  # e.g. "run.json" or "--head"


@dataclass(frozen=True, slots=True)
class Verdict:
    entries: int  # lines that passed
    head: str  # hash of the last line that passed
    bad_line: int | None = None  # 1-based; None when every line passed
    problem: str | None = None
    at_anchor: str | None = None  # hash of line ``anchor.entries``, when the file has that many lines

    @property
    def intact(self) -> bool:
        return self.bad_line is None


def check_chain(path: str, anchor_line: int = 0) -> Verdict:
    """Check every line of ``path``; stop at the first bad one. Remember the hash of ``anchor_line``."""
    lines = Lines(path)
    sha256 = hashlib.sha256
    prev = GENESIS.encode("ascii")
    seq = 0
    at_anchor: bytes | None = None
    for line in lines:
        seq += 1
        cut = len(line) - TAIL  # where ,"hash":" starts in a well-formed line
        written = line[cut + _MARK:-2]
        # One prefix test and one hash a line; line_problem words what failed, for the first bad line only.
        if (cut < 0 or not line.startswith(b'{"seq":%d,"prev":"%s",' % (seq, prev))
                or line[cut:cut + _MARK] != HASH_MARK or line[-2:] != b'"}'
                or sha256(memoryview(line)[:cut]).hexdigest().encode() != written):
            problem = line_problem(line, seq, prev.decode("ascii")) or "not a chained ledger line"
            return Verdict(seq - 1, prev.decode("ascii"), seq, problem, _text(at_anchor))
        prev = written
        if seq == anchor_line:
            at_anchor = prev
    if lines.tail:
        return Verdict(seq, prev.decode("ascii"), seq + 1,
                       "incomplete last line (no newline at its end): the file was cut", _text(at_anchor))
    return Verdict(seq, prev.decode("ascii"), at_anchor=_text(at_anchor))


def _text(digest: bytes | None) -> str | None:
    return None if digest is None else digest.decode("ascii")


def anchor_problem(verdict: Verdict, anchor: Anchor) -> str | None:
    """What the whole chain's end says against ``anchor``: a cut, or another chain; None when it agrees."""
    if anchor.entries == 0:
        return None if anchor.head == GENESIS else f"{anchor.source} records 0 entries but head {anchor.head}"
    if verdict.entries < anchor.entries:
        missing = anchor.entries - verdict.entries
        return (f"{verdict.entries} entries where {anchor.source} records {anchor.entries} (head {anchor.head}): "
                f"the last {missing} {'entry was' if missing == 1 else 'entries were'} cut")
    if verdict.at_anchor != anchor.head:
        return (f"line {anchor.entries} has hash {verdict.at_anchor} where {anchor.source} records head "
                f"{anchor.head}: the ledger was rewritten")
    return None


def check_intents(ledger: str) -> tuple[str, Verdict, Intents] | None:
    """The intents file beside ``ledger``, its chain's verdict, and (when intact) its intents paired with
    the ledger's entries; None when there is no intents file (a ledger from before intents)."""
    path = intents_beside(ledger)
    if not os.path.isfile(path):
        return None
    verdict = check_chain(path)
    intents = Intents()
    if verdict.intact:
        intents.open(ledger)
        if intents.pending:  # merged unpaired: a result may have come in a later merge
            for line in Lines(ledger):
                try:
                    intents.see(orjson.loads(line))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # the chain is intact: a line that is no entry was written so, and pairs nothing
                if not intents.pending:
                    break
        intents.close()
    return path, verdict, intents
