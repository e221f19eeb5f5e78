"""What is checked of a ledger file beyond its lines, and how it is worded: the end of its chain against
the end recorded elsewhere (the ``ledger`` record of the run.json beside it), the first thing wrong, and
``FileCheck``, which checks a file's chain as a reader goes through its lines (``ledger summarize``,
``report`` and ``reprice``). ``ledger verify`` words what it finds with the same functions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from cmbagent_batch.errors import UsageError
from cmbagent_batch.ledger.chain import GENESIS, ChainCheck
from cmbagent_batch.ledger.files import is_journal, read_json_object, run_json_beside
from cmbagent_batch.ledger.intents import Intents
from cmbagent_batch.ledger.verdict import Anchor, ChainStatus, Verdict

JOURNAL = "a rank journal has no chain to verify"
NO_RUN_JSON = " (no run.json beside the ledger; give --run-json FILE or --head HASH --entries N)"
_HEAD = re.compile(r"[0-9a-f]{64}")
_SHOWN = 80  # characters of a bad value shown (a whole head hash, quoted)
_MISSING = object()  # a field the record lacks


def ledger_record(manifest: str, data: Mapping[str, Any]) -> Anchor | None:
    """The end of the ledger that run.json ``data`` (read from ``manifest``) records; None when it records
    none (no ``ledger``, or null). UsageError naming ``manifest`` when the record is malformed."""
    record = data.get("ledger")
    if record is None:
        return None
    problem = record_problem(record)
    if problem is not None:
        raise UsageError(f"{manifest}: malformed ledger record ({problem})")
    return Anchor(record["entries"], record["head"], "run.json")


def record_problem(record: Any) -> str | None:
    """What makes ``record`` no ``ledger`` record of run.json (``{"file", "entries", "head", ...}``), or None."""
    if not isinstance(record, dict):
        return f"expected an object with entries and head, got {_json(record)}"
    entries = record.get("entries", _MISSING)
    if type(entries) is not int or entries < 0:
        return f"entries: expected an integer of at least 0, got {_json(entries)}"
    head = record.get("head", _MISSING)
    if not isinstance(head, str) or not _HEAD.fullmatch(head):
        return f"head: expected 64 lowercase hex digits, got {_json(head)}"
    if not isinstance(record.get("file", ""), str):
        return f"file: expected a string, got {_json(record['file'])}"
    return None


def _json(value: Any) -> str:
    """``value`` as run.json spells it, cut short; "nothing" when the field is missing."""
    if value is _MISSING:
        return "nothing"
    text = orjson.dumps(value).decode("utf-8")
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def anchor_beside(path: str, manifest: str, data: Mapping[str, Any]) -> tuple[Anchor | None, str]:
    """The end that the run.json beside the ledger ``path`` (``manifest``, holding ``data``) records for it;
    None and why (worded for the output) when it records none for this file."""
    anchor = ledger_record(manifest, data)
    if anchor is None:
        return None, " (run.json beside it records no ledger)"
    name = os.path.basename(path)
    recorded = data["ledger"].get("file", name)
    if recorded != name:
        return None, f" (run.json beside it records {recorded}, not {name})"
    return anchor, ""


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


def anchor_note(verdict: Verdict, anchor: Anchor | None, why_none: str) -> str:
    """What an intact chain's end was compared with, and how it went (``anchor_problem`` found nothing)."""
    if anchor is None:
        return f"no head hash to compare with{why_none}: a cut at a line boundary would not show"
    if verdict.entries == anchor.entries:
        return f"matches {anchor.source}: {anchor.entries} entries, head {anchor.head}"
    added = verdict.entries - anchor.entries
    return (f"matches {anchor.source} at line {anchor.entries} (head {anchor.head}); "
            f"{added} {'entry was' if added == 1 else 'entries were'} added after it")


def first_problem(path: str, verdict: Verdict, anchor: Anchor | None,
                  intents: tuple[str, Verdict] | None) -> str | None:
    """The first thing wrong, as ``verify`` says it: a bad line of the ledger, its end against the anchor,
    a bad line of its intents file (``FILE:LINE: what`` or ``FILE: what``); None when nothing is."""
    if not verdict.intact:
        return f"{path}:{verdict.bad_line}: {verdict.problem}"
    problem = anchor_problem(verdict, anchor) if anchor is not None else None
    if problem:
        return f"{path}: {problem}"
    if intents is not None and not intents[1].intact:
        return f"{intents[0]}:{intents[1].bad_line}: {intents[1].problem}"
    return None


class FileCheck:
    """Checks the chain of one ledger file as a reader goes through its lines: ``feed`` each line (None for
    a rank journal, which has no chain), then ``status``.

    The run.json beside the file is read once, here: its ``ledger`` record is what the chain's end is
    compared with, and the whole of it goes into the status (the report's budget comes from it). A run.json
    that cannot be read, or whose record is malformed, makes the file unverified, not the command fail.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.journal = is_journal(path)
        self.anchor: Anchor | None = None
        self.why_none = ""
        self.anchor_error: str | None = None
        self.run_json: dict[str, Any] | None = None
        if not self.journal:
            self._read_run_json()
        self.check = ChainCheck(self.anchor.entries if self.anchor else 0)
        self.feed: Callable[[bytes], bool] | None = None if self.journal else self.check.feed

    def _read_run_json(self) -> None:
        manifest = run_json_beside(self.path)
        if not os.path.isfile(manifest):
            self.why_none = NO_RUN_JSON
            return
        try:
            self.run_json = read_json_object(manifest)
            self.anchor, self.why_none = anchor_beside(self.path, manifest, self.run_json)
        except UsageError as exc:
            self.anchor_error = str(exc)

    def status(self, intents: Intents | None) -> ChainStatus:
        """What was found, once every line was fed (and the intents beside the file, if any, scanned)."""
        if self.journal:
            return ChainStatus(self.path, 0, "", f"{self.path}: {JOURNAL}", "", self.run_json)
        verdict = self.check.end()
        problem = first_problem(self.path, verdict, self.anchor,
                                None if intents is None else intents.chains.get(self.path))
        if problem is None and self.anchor_error is not None:
            problem = self.anchor_error
        note = "" if problem else anchor_note(verdict, self.anchor, self.why_none)
        return ChainStatus(self.path, verdict.entries, verdict.head, problem, note, self.run_json)


def unverified_lines(statuses: list[ChainStatus]) -> list[str]:
    """``UNVERIFIED: <reason>`` for each file whose chain did not verify, in order."""
    return [f"UNVERIFIED: {s.problem}" for s in statuses if s.problem is not None]


def verification_json(statuses: list[ChainStatus]) -> dict[str, object]:
    """What the JSON outputs say of the chains read: ``verified``, and ``unverified_reason`` (the reasons,
    joined by "; ", or null)."""
    reasons = [s.problem for s in statuses if s.problem is not None]
    return {"verified": not reasons, "unverified_reason": "; ".join(reasons) if reasons else None}
