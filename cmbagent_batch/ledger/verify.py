"""``ledger verify``: is the chain whole, and does it end where the run said it ended?

The chain alone shows an edited, deleted, moved or inserted line and a cut in the middle of a line.
A cut at a line boundary leaves a shorter chain that is whole; only a head hash and entry count kept
elsewhere (``run.json``'s ``ledger`` record, or given on the command line) show it. What is wrong is worded
by ``check.py``, as ``ledger summarize``, ``report`` and ``reprice`` word it.

The intents file beside the ledger (``intents.py``) is a chain of its own, checked the same way as it is
scanned; its intents that were not paired when merged are looked for in the ledger as its chain is
checked, and those still without a result are the calls possibly billed. Each file is read once. No
record anchors the intents: a cut at one of their line boundaries would not show.
"""

from __future__ import annotations

import os

import orjson

from cmbagent_batch.errors import UsageError
from cmbagent_batch.ledger.chain import ChainCheck
from cmbagent_batch.ledger.check import NO_RUN_JSON, anchor_beside, ledger_record
from cmbagent_batch.ledger.files import Lines, read_json_object, run_json_beside
from cmbagent_batch.ledger.intents import Intents
from cmbagent_batch.ledger.verdict import Anchor, Verdict


def read_chain(path: str, anchor_line: int = 0, intents: Intents | None = None) -> Verdict:
    """Check every line of ``path``, stopping at the first bad one; remember the hash of ``anchor_line``.
    With ``intents`` (opened on ``path``), pair the pending ones with the entries as they go by."""
    check = ChainCheck(anchor_line)
    lines = Lines(path)
    for line in lines:
        if not check.feed(line):
            return check.end()
        if intents is not None and intents.pending:
            try:
                intents.see(orjson.loads(line))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # the line is chained: one that is no entry was written so, and pairs nothing
    return check.end(lines.tail)


def recorded_anchor(path: str, run_json: str | None = None, head: str | None = None,
                    entries: int | None = None) -> tuple[Anchor | None, str]:
    """The recorded end of the ledger ``path`` to compare with: ``head`` and ``entries`` when given, else
    the ``ledger`` record of ``run_json`` (default: the run.json beside the ledger, when there is one). None
    and why there is none (worded for the output) when nothing records it; UsageError for a bad record."""
    if (head is None) != (entries is None):
        raise UsageError("--head and --entries go together")
    if head is not None and entries is not None:
        if len(head) != 64 or set(head) - set("0123456789abcdef"):
            raise UsageError(f"--head: expected 64 lowercase hex digits, got {head!r}")
        return Anchor(entries, head, "--head/--entries"), ""
    if run_json is None:
        beside = run_json_beside(path)
        if not os.path.isfile(beside):
            return None, NO_RUN_JSON
        return anchor_beside(path, beside, read_json_object(beside))
    anchor = ledger_record(run_json, read_json_object(run_json))
    if anchor is None:
        raise UsageError(f"{run_json}: no ledger record (entries and head) to compare with")
    return anchor, ""
