"""Intents: each model call announced in the ledger before it is sent, so that a call whose answer never
came back (the process was killed while it waited) still shows, as ``unknown: possibly billed``.

Before each HTTP attempt (each retry too) the caller appends an intent to its rank's intents journal
(``RUN_DIR/ledger/intents-NNNN.jsonl``, one write and an fsync, like a ledger entry); when the answer
comes (or the error), the ledger entry it appends has the intent's ``id`` and ``timestamp``: that pair
is how an intent finds its result. ``merge`` appends the journals' intents to the hash-chained
``RUN_DIR/ledger.intents.jsonl`` beside ``ledger.jsonl``, each with ``paired``: whether its result was in
the ledger then. ``ledger.jsonl`` itself holds only results, as it always has.

An intent is *unresolved* when no entry of its ledger has its id and timestamp. Readers parse only the
intents merged with ``"paired":false`` (or journal intents, which have no ``paired``): the others are
counted, not read. Everything here but ``scan_intents`` is pure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from cmbagent_batch.errors import LedgerError
from cmbagent_batch.ledger.chain import TAIL, ChainCheck
from cmbagent_batch.ledger.entry import FIELDS, entry_problem
from cmbagent_batch.ledger.files import Lines, intents_beside, is_journal
from cmbagent_batch.ledger.verdict import Verdict

INTENT_FIELDS: tuple[str, ...] = (
    "id", "job", "run_id", "source", "task", "attempt", "call", "rank", "host", "pid", "agent",
    "model", "requested_model", "endpoint", "prompt_chars", "prompt_tokens_estimate", "timestamp",
)
MERGED_FIELDS: tuple[str, ...] = (*INTENT_FIELDS, "paired")  # the fields of a line of ledger.intents.jsonl
UNKNOWN = "unknown: possibly billed"  # what an unresolved intent's cost is, wherever it is shown
CHARS_PER_TOKEN = 4  # the estimate ``plan --estimate`` uses too

_PAIRED = b'"paired":true'
_SHARED = tuple(f for f in INTENT_FIELDS if f in FIELDS)  # checked as a ledger entry checks them


def endpoint_host(url: str | None) -> str:
    """``host[:port]`` of an endpoint's base URL: never its path, nor any user or password in it."""
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port is not None else host


def estimate_tokens(chars: int) -> int:
    """Prompt tokens guessed from characters (``CHARS_PER_TOKEN`` a token, rounded up)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def make_intent(**fields: Any) -> dict[str, Any]:
    """An intent with exactly the ``INTENT_FIELDS``, in their order; ValueError saying what is wrong."""
    unknown = sorted(set(fields) - set(INTENT_FIELDS))
    if unknown:  # a missing field is said by ``intent_problem``
        raise ValueError(f"ledger intent: unknown {unknown}; valid: {', '.join(INTENT_FIELDS)}")
    intent = {f: fields[f] for f in INTENT_FIELDS if f in fields}
    problem = intent_problem(intent)
    if problem is not None:
        raise ValueError(f"ledger intent: {problem}")
    return intent


def intent_problem(intent: Any) -> str | None:
    """What makes ``intent`` not an intent (journal or merged), or None."""
    if not isinstance(intent, dict):
        return "not a JSON object"
    missing = [f for f in INTENT_FIELDS if f not in intent]
    if missing:
        return f"lacks {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more fields" if len(missing) > 3 else "")
    # the fields an entry has too are checked by the entry's rules, on a stand-in entry
    stand_in = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0,
                "reported_model": None, "cost_usd": 0.0, "price_table": "-", "status": "ok", "error": None,
                "latency_s": 0.0, "price": {"prompt_per_1m": 0, "cached_prompt_per_1m": 0, "completion_per_1m": 0},
                **{k: intent[k] for k in _SHARED}}
    problem = entry_problem(stand_in)
    if problem is not None:
        return problem
    if not isinstance(intent["endpoint"], str):
        return f"endpoint: expected a string, got {intent['endpoint']!r}"
    for name in ("prompt_chars", "prompt_tokens_estimate"):
        value = intent[name]
        if type(value) is not int or value < 0:
            return f"{name}: expected an integer of at least 0, got {value!r}"
    if "paired" in intent and not isinstance(intent["paired"], bool):
        return f"paired: expected true or false, got {intent['paired']!r}"
    return None


def intent_key(record: Mapping[str, Any]) -> tuple[str, str]:
    """What an intent and its result share: the call's id and the time it was sent."""
    return record["id"], record["timestamp"]


def scan_intents(path: str) -> tuple[int, list[dict[str, Any]], Verdict | None]:
    """How many intents ``path`` holds, those not paired with a result when merged (every intent of a
    journal), and the verdict on the chain of a merged file (None for a journal, which has no chain), from
    one read. A line that is not an intent is a LedgerError naming ``FILE:LINE``, unless the chain broke
    at or before it: then the verdict says what is wrong."""
    lines = Lines(path)
    check = None if is_journal(path) else ChainCheck()
    unpaired: list[dict[str, Any]] = []
    count = 0
    for number, line in enumerate(lines, 1):
        count += 1
        chained = check is None or check.feed(line)
        end = len(line) - TAIL
        if end > 0 and line[end - len(_PAIRED):end] == _PAIRED:
            continue
        try:
            intent = orjson.loads(line)
        except orjson.JSONDecodeError:
            intent = None
        problem = intent_problem(intent)
        if problem is not None:
            if not chained:
                continue
            raise LedgerError(f"{path}:{number}: not a ledger intent: {problem}")
        if not intent.get("paired"):
            unpaired.append(intent)
    if check is not None:
        return count, unpaired, check.end(lines.tail)
    if lines.tail:
        raise LedgerError(f"{path}:{lines.count + 1}: incomplete last line: the file ends in the middle of an intent")
    return count, unpaired, None


class Intents:
    """The intents beside the ledger files a command reads, paired with the entries it reads.

    ``open(ledger)`` before a file's entries, ``see(entry)`` for each (only while ``pending``), ``close()``
    after them. Then ``files`` (intents files found), ``count`` (intents in them), ``unresolved``
    (intents with no result, in time order) and ``chains`` (by ledger: its intents file and the verdict on
    that file's chain, for a merged one).
    """

    def __init__(self) -> None:
        self.files = 0
        self.count = 0
        self.chains: dict[str, tuple[str, Verdict]] = {}
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}
        self._unresolved: list[dict[str, Any]] = []

    def open(self, ledger: str) -> None:
        path = intents_beside(ledger)
        if not os.path.isfile(path):
            return
        count, unpaired, verdict = scan_intents(path)
        if verdict is not None:
            self.chains[ledger] = (path, verdict)
        self.files += 1
        self.count += count
        self.pending = {intent_key(i): i for i in unpaired}

    def see(self, entry: Mapping[str, Any]) -> None:
        self.pending.pop(intent_key(entry), None)

    def close(self) -> None:
        self._unresolved.extend(self.pending.values())
        self.pending = {}

    @property
    def unresolved(self) -> list[dict[str, Any]]:
        return sorted(self._unresolved, key=lambda i: (i["timestamp"], i["id"]))


def describe(intent: Mapping[str, Any]) -> str:
    """One line about an unresolved intent, for people."""
    who = "dependency analysis" if intent["task"] is None else f"task {intent['task']} attempt {intent['attempt']}"
    return (f"{intent['timestamp']}  {who}  model {intent['model']} ({intent['requested_model']}) at "
            f"{intent['endpoint'] or '?'}  prompt {intent['prompt_chars']:,} characters "
            f"(~{intent['prompt_tokens_estimate']:,} tokens)  id {intent['id']}")
