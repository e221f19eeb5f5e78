"""Reading ledger entries for the offline commands, one line at a time, with errors naming FILE:LINE.

Any file of entries reads: the chained ``ledger.jsonl`` (its ``seq``, ``prev`` and ``hash`` come
along), a rank journal, or a run directory (its ledger.jsonl). The first entry of each file is checked
in full, so a file that is not a ledger is refused at its first line; later lines are checked only as
far as the command uses them (``consume`` turns a KeyError, TypeError or ValueError into an
error naming the line), which keeps 10^6 lines to seconds. Given an ``Intents``, a reader also reads
the intents file beside each ledger file and pairs its intents with the entries (``intents.py``). Asked to
verify, it checks each file's chain (and its intents' chain, and its end against the run.json beside it)
in the same pass, as ``ledger verify`` would (``check.FileCheck``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from cmbagent_batch.errors import LedgerError
from cmbagent_batch.ledger.check import FileCheck
from cmbagent_batch.ledger.entry import entry_problem
from cmbagent_batch.ledger.files import Lines, resolve
from cmbagent_batch.ledger.intents import Intents
from cmbagent_batch.ledger.verdict import ChainStatus

_NOT_JSON = "not a JSON object: a ledger holds one entry per line"


class EntryReader:
    """The entries of one ledger file; ``line`` is the number of the last one given."""

    def __init__(self, path: str, intents: Intents | None = None, verify: bool = False) -> None:
        self.path = resolve(path)
        self.line = 0
        self.entry: Any = None
        self.intents = intents
        self.verify = verify
        self.status: ChainStatus | None = None  # with ``verify``, once every line was read

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lines = Lines(self.path)
        loads = orjson.loads
        intents = self.intents
        check = FileCheck(self.path) if self.verify else None
        feed = None if check is None else check.feed
        if intents is not None:
            intents.open(self.path)
        for raw in lines:
            if feed is not None:
                feed(raw)
            self.line += 1
            try:
                self.entry = loads(raw)
            except orjson.JSONDecodeError:
                raise self.error(_NOT_JSON) from None
            if self.line == 1 or type(self.entry) is not dict:
                self.check()
            if intents is not None and intents.pending:
                intents.see(self.entry)
            yield self.entry
        if lines.tail:
            self.line += 1
            raise self.error("incomplete last line: the file ends in the middle of an entry")
        if intents is not None:
            intents.close()
        if check is not None:
            self.status = check.status(intents)

    def check(self) -> None:
        """Refuse the current entry unless it is a whole ledger entry."""
        problem = entry_problem(self.entry)
        if problem is not None:
            raise self.bad_entry(problem)

    def bad_entry(self, problem: str | None = None) -> LedgerError:
        """The error for the current entry, which a command could not use."""
        problem = problem or entry_problem(self.entry) or "an entry this command cannot read"
        return self.error(_NOT_JSON if problem == "not a JSON object" else f"not a ledger entry: {problem}")

    def error(self, message: str) -> LedgerError:
        return LedgerError(f"{self.path}:{self.line}: {message}")


def consume(paths: Iterable[str], use: Callable[[Iterable[dict[str, Any]]], object],
            intents: Intents | None = None, verify: bool = False) -> list[ChainStatus]:
    """Give ``use`` the entries of each file in turn; an entry it cannot use becomes a FILE:LINE error.
    With ``intents``, the intents beside each file are paired with its entries there. With ``verify``,
    what each file's chain is found to be, in order (else [])."""
    found: list[ChainStatus] = []
    for path in paths:
        reader = EntryReader(path, intents, verify)
        try:
            use(reader)
        except (KeyError, TypeError, ValueError):
            raise reader.bad_entry() from None
        if reader.status is not None:
            found.append(reader.status)
    return found
