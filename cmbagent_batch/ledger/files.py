"""Where the ledger lives in a run directory, and reading its files at speed.

    RUN_DIR/
      ledger.jsonl               the merged, hash-chained ledger (``chain.py``)
      ledger.intents.jsonl       the merged intents, chained the same way (``intents.py``)
      ledger/rank-NNNN.jsonl     a rank's journal: entries appended as calls end (``journal.py``)
      ledger/intents-NNNN.jsonl  a rank's intents: appended before each call is sent
      ledger/merge.lock          held by ``merge``

Files are read in large chunks and split into lines here, so a 10^6-line ledger streams through in
seconds without ever holding more than a chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import IO, Any

from cmbagent_batch.errors import LedgerError, UsageError

LEDGER_FILE = "ledger.jsonl"
INTENTS_FILE = "ledger.intents.jsonl"
JOURNAL_DIR = "ledger"
_CHUNK = 1 << 23  # bytes read at once


def ledger_path(run_dir: str) -> str:
    return os.path.join(run_dir, LEDGER_FILE)


def journal_dir(run_dir: str) -> str:
    return os.path.join(run_dir, JOURNAL_DIR)


def journal_path(run_dir: str, rank: int) -> str:
    return os.path.join(journal_dir(run_dir), f"rank-{rank:04d}.jsonl")


def journal_paths(run_dir: str) -> list[str]:
    """Every rank journal of the run, in rank order."""
    return _per_rank(run_dir, "rank-")


def _per_rank(run_dir: str, prefix: str) -> list[str]:
    """The files ``PREFIXNNNN.jsonl`` of the ledger's journal directory, in rank order."""
    directory = journal_dir(run_dir)
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".jsonl"))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def intents_path(run_dir: str) -> str:
    return os.path.join(run_dir, INTENTS_FILE)


def intents_journal_path(run_dir: str, rank: int) -> str:
    return os.path.join(journal_dir(run_dir), f"intents-{rank:04d}.jsonl")


def intents_journal_paths(run_dir: str) -> list[str]:
    """Every rank's intents journal, in rank order."""
    return _per_rank(run_dir, "intents-")


def intents_beside(ledger: str) -> str:
    """The intents file that goes with a ledger file: ``ledger.intents.jsonl`` for ``ledger.jsonl`` (any
    ``X.jsonl``: ``X.intents.jsonl``), ``intents-NNNN.jsonl`` for a rank journal ``rank-NNNN.jsonl``."""
    directory, name = os.path.split(ledger)
    if name.startswith("rank-") and name.endswith(".jsonl"):
        return os.path.join(directory, "intents-" + name[len("rank-"):])
    stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else name
    return os.path.join(directory, stem + ".intents.jsonl")


def is_journal(path: str) -> bool:
    """Whether ``path`` is a rank's journal (of entries or of intents), which is not chained."""
    name = os.path.basename(path)
    return name.endswith(".jsonl") and name.startswith(("rank-", "intents-"))


def run_json_beside(ledger: str) -> str:
    """The run manifest that sits beside a ledger file (or inside a run directory), in the form the ledger's
    path was given (relative stays relative), so that messages name both alike."""
    directory = ledger if os.path.isdir(ledger) else os.path.dirname(ledger)
    return os.path.join(directory, "run.json")


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when it holds another value); UsageError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def resolve(path: str) -> str:
    """The ledger file a command argument names: the file itself, or a run directory's ledger.jsonl."""
    if os.path.isdir(path):
        inside = ledger_path(path)
        if not os.path.isfile(inside):
            raise LedgerError(f"{path}: no {LEDGER_FILE} in this directory")
        return inside
    if not os.path.exists(path):
        raise LedgerError(f"{path}: no such file")
    return path


def open_binary(path: str) -> IO[bytes]:
    """``open(path, "rb")`` with the failure worded for the user."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LedgerError(f"{path}: no such file") from None
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read ({exc.strerror})") from None


class Lines:
    """The complete lines of a file, without their newlines, read a chunk at a time.

    After iterating, ``tail`` holds what follows the last newline (empty for a well-ended file)
    and ``count`` the number of complete lines.
    """

    def __init__(self, path: str, start: int = 0) -> None:
        self.path = path
        self.start = start
        self.tail = b""
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        rest = b""
        with open_binary(self.path) as fh:
            if self.start:
                fh.seek(self.start)
            while chunk := fh.read(_CHUNK):
                parts = (rest + chunk if rest else chunk).split(b"\n")
                rest = parts.pop()
                self.count += len(parts)
                yield from parts
        self.tail = rest


