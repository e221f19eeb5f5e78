"""Merging the rank journals into the hash-chained ``RUN_DIR/ledger.jsonl``.

Each step leaves files a later ``merge`` can finish from, so a crash anywhere loses and duplicates
nothing: new entries are appended with one write and fsynced before any journal is removed; an entry
already in the ledger (same id, same content) is not appended again; a torn last line (a merge killed
while writing) is cut off, its entries being still in the journals. Reruns and resumes of a run
directory append to the same chain. An exclusive ``flock`` keeps two mergers from interleaving.

Intents (``intents.py``) go the same way into ``ledger.intents.jsonl``, after the entries, each marked
``paired`` when its result is in the ledger by then. The intents journals are read before the entries'
journals, so a result written meanwhile finds its intent merged; an intent whose result comes later is
paired by the readers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from cmbagent_batch.errors import LedgerError
from cmbagent_batch.ledger.chain import GENESIS, chain_lines, line_hash
from cmbagent_batch.ledger.entry import FIELDS, entry_fields, entry_problem
from cmbagent_batch.ledger.files import (
    INTENTS_FILE,
    LEDGER_FILE,
    Lines,
    intents_journal_paths,
    intents_path,
    journal_dir,
    journal_paths,
    ledger_path,
)
from cmbagent_batch.ledger.intents import INTENT_FIELDS, MERGED_FIELDS, intent_key, intent_problem
from cmbagent_batch.ledger.journal import read_journal
from cmbagent_batch.rundir.atomic import fsync_dir


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What the ledger holds after a merge, and what the merge did."""

    head: str  # hash of the ledger's last line (64 zeros when it is empty)
    entries: int  # lines in ledger.jsonl
    added: int  # lines this merge appended
    cost_usd: float  # sum of every entry's cost in ledger.jsonl
    problems: tuple[str, ...]  # lines skipped or repaired, each "FILE:LINE: what"
    intents_added: int = 0  # intents this merge appended to ledger.intents.jsonl
    unresolved: tuple[dict[str, Any], ...] = ()  # of those, the ones whose result was not in the ledger

    def manifest(self) -> dict[str, Any]:
        """The ``ledger`` record of ``run.json``."""
        return {"file": LEDGER_FILE, "entries": self.entries, "head": self.head, "cost_usd": self.cost_usd}


@dataclass
class _Chain:
    """What merge needs to know of ``ledger.jsonl`` as it is."""

    entries: int = 0
    head: str = GENESIS
    cost_usd: float = 0.0


def merge(run_dir: str) -> MergeResult:
    """Append the journals' new entries to ``RUN_DIR/ledger.jsonl``, then remove the journals."""
    if not os.path.isdir(journal_dir(run_dir)) and not os.path.exists(ledger_path(run_dir)):
        return MergeResult(GENESIS, 0, 0, 0.0, ())  # no call was ever made here: leave no files behind
    os.makedirs(journal_dir(run_dir), exist_ok=True)
    with _exclusive(os.path.join(journal_dir(run_dir), "merge.lock")):
        problems: list[str] = []
        intent_journals = [(path, _read(path)) for path in intents_journal_paths(run_dir)]  # before results
        journals = [(path, _read(path)) for path in journal_paths(run_dir)]
        intents = _journal_entries(intent_journals, problems, INTENT_FIELDS)
        new = _journal_entries(journals, problems)
        wanted = {intent_key(i) for i in intents.values()}
        paired = {k for k in (intent_key(e) for e in new.values()) if k in wanted}
        path = ledger_path(run_dir)
        existed = os.path.exists(path)
        chain = _scan(path, new, problems, wanted, paired) if existed else _Chain()
        fresh = sorted(new.values(), key=lambda e: (e["timestamp"], e["id"]))
        if fresh or (intents and not existed):  # with intents alone, an empty ledger: the commands read it
            lines = list(chain_lines(fresh, chain.entries, chain.head))
            _append(path, b"".join(lines))
            if not existed:
                fsync_dir(run_dir)
            if lines:
                chain = _Chain(chain.entries + len(fresh), line_hash(lines[-1].rstrip(b"\n")) or GENESIS,
                               chain.cost_usd + sum(e["cost_usd"] for e in fresh))
        added = _merge_intents(run_dir, intents, paired, problems)
        for journal, data in intent_journals + journals:
            _remove_if_unchanged(journal, len(data))
        return MergeResult(chain.head, chain.entries, len(fresh), chain.cost_usd, tuple(problems), len(added),
                           tuple(i for i in added if intent_key(i) not in paired))


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _journal_entries(journals: list[tuple[str, bytes]], problems: list[str],
                     fields: tuple[str, ...] = FIELDS) -> dict[bytes, dict[str, Any]]:
    """Valid journal entries (or intents, by their ``fields``) by content (one written twice counts once);
    what was skipped goes to ``problems``. Two with one id and different content (a process id reused
    within the run) are both kept."""
    check = entry_problem if fields is FIELDS else intent_problem
    what = "entry" if fields is FIELDS else "intent"
    out: dict[bytes, dict[str, Any]] = {}
    for path, data in journals:
        name = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
        for entry, problem in read_journal(data, name):
            if problem:
                problems.append(problem)
            if entry is None:
                continue
            if (bad := check(entry)) is not None:
                problems.append(f"{name}: {what} {entry.get('id') if isinstance(entry, dict) else None!r} "
                                f"skipped: {bad}")
                continue
            out.setdefault(_content(entry, fields), entry)
    return out


def _content(entry: dict[str, Any], fields: tuple[str, ...] = FIELDS) -> bytes:
    return orjson.dumps(entry_fields(entry) if fields is FIELDS else {k: entry[k] for k in fields})


def _scan(path: str, new: dict[bytes, dict[str, Any]], problems: list[str], wanted: set[tuple[str, str]],
          paired: set[tuple[str, str]]) -> _Chain:
    """Count, head and cost of the ledger; drop from ``new`` the entries it already holds; add to ``paired``
    the ``wanted`` intent keys whose result it holds."""
    chain = _Chain()
    ids = {e["id"] for e in new.values()}
    lines = Lines(path)
    last = b""
    for number, line in enumerate(lines, 1):
        try:
            entry = orjson.loads(line)
            chain.cost_usd += entry["cost_usd"]
            if entry["id"] in ids:
                new.pop(_content(entry), None)
            if wanted and (key := intent_key(entry)) in wanted:
                paired.add(key)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            problems.append(f"{LEDGER_FILE}:{number}: not a ledger line (run: cmbagent-batch ledger verify)")
        last = line
    chain.entries = lines.count
    if lines.tail:
        _cut(path, os.path.getsize(path) - len(lines.tail))
        problems.append(f"{LEDGER_FILE}:{lines.count + 1}: incomplete last line removed (a merge was killed "
                        "while writing it; its entries are merged again from the journals)")
    if last:
        head = line_hash(last)
        if head is None:
            raise LedgerError(f"{path}:{lines.count}: the last line is not a chained ledger line, so the chain "
                              "cannot go on (run: cmbagent-batch ledger verify)")
        chain.head = head
    return chain


def _merge_intents(run_dir: str, intents: dict[bytes, dict[str, Any]], paired: set[tuple[str, str]],
                   problems: list[str]) -> list[dict[str, Any]]:
    """Append the intents that ``ledger.intents.jsonl`` lacks, with ``paired``; return them."""
    if not intents:
        return []
    path = intents_path(run_dir)
    existed = os.path.exists(path)
    seq, head = _scan_intents(path, intents, problems) if existed else (0, GENESIS)
    fresh = sorted(intents.values(), key=lambda i: (i["timestamp"], i["id"]))
    if fresh:
        marked = ({**i, "paired": intent_key(i) in paired} for i in fresh)
        _append(path, b"".join(chain_lines(marked, seq, head, MERGED_FIELDS, optional=())))
        if not existed:
            fsync_dir(run_dir)
    return fresh


def _scan_intents(path: str, intents: dict[bytes, dict[str, Any]], problems: list[str]) -> tuple[int, str]:
    """Lines and head of ``ledger.intents.jsonl``; drop from ``intents`` those it holds already."""
    ids = {i["id"] for i in intents.values()}
    lines = Lines(path)
    last = b""
    for number, line in enumerate(lines, 1):
        try:
            intent = orjson.loads(line)
            if intent["id"] in ids:
                intents.pop(_content(intent, INTENT_FIELDS), None)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            problems.append(f"{INTENTS_FILE}:{number}: not an intent line (run: cmbagent-batch ledger verify)")
        last = line
    if lines.tail:
        _cut(path, os.path.getsize(path) - len(lines.tail))
        problems.append(f"{INTENTS_FILE}:{lines.count + 1}: incomplete last line removed (a merge was killed "
                        "while writing it; its intents are merged again from the journals)")
    head = line_hash(last) if last else GENESIS
    if head is None:
        raise LedgerError(f"{path}:{lines.count}: the last line is not a chained line, so the chain cannot go on "
                          "(run: cmbagent-batch ledger verify)")
    return lines.count, head


def _cut(path: str, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)
        os.fsync(fh.fileno())


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it all at once, short of a full disk
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_unchanged(path: str, size: int) -> None:
    """Unlink a merged journal unless a writer appended to it after it was read (it waits for next time)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == size and os.fstat(fd).st_nlink > 0:
            os.unlink(path)
    finally:
        os.close(fd)
