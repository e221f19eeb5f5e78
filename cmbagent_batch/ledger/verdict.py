"""What a check of a hash chain found, as plain records: standard library only, so the report page (which
imports nothing else) can show them. ``chain.py`` makes a ``Verdict`` line by line, ``check.py`` words
what is wrong and what the chain's end was compared with; ``ledger summarize``, ``report`` and ``reprice``
keep a ``ChainStatus`` per file they read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where the ledger ended when something else recorded it."""

    entries: int
    head: str
    source: str  # e.g. "run.json" or "--head/--entries"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A chain read to its end, or to its first bad line."""

    entries: int  # lines that passed
    head: str  # hash of the last line that passed
    bad_line: int | None = None  # 1-based; None when every line passed
    problem: str | None = None
    at_anchor: str | None = None  # hash of line ``anchor.entries``, when the file has that many lines

    @property
    def intact(self) -> bool:
        return self.bad_line is None


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """What a command that read a ledger file found of its chain: verified, or why not."""

    path: str
    entries: int  # lines whose chain held
    head: str  # hash of the last of them
    problem: str | None  # the first thing wrong, worded as ``ledger verify`` words it; None: verified
    anchor: str  # what the chain's end was compared with, worded as ``ledger verify`` words it
    run_json: Mapping[str, Any] | None = None  # the run.json beside the file, as read for its anchor (or None)

    @property
    def verified(self) -> bool:
        return self.problem is None
