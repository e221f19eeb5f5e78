"""A content-addressed cache of JSON records on disk.

Keys are sha256 digests of canonical JSON (sorted keys, no whitespace): the same inputs give the same
key on every machine and in every process, unlike Python's ``hash()``. Each file holds its payload and
the payload's sha256; a truncated or edited file fails the check, is reported and recomputed.
Writes go to a temporary file in the same directory, are fsynced and renamed over the target, so a
reader sees either the old record or the new one, and two writers of one key never mix their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from cmbagent_batch.rundir.atomic import write_atomic

FORMAT = 1
# A record is {"format":1,"sha256":"<64 hex>","payload":<canonical JSON>}: the checksum is verified on
# the payload's bytes before they are parsed.
_HEAD = b'{"format":%d,"sha256":"%s","payload":'
_HEAD_LEN = len(_HEAD % (FORMAT, b"0" * 64))


def _checked_body(raw: bytes) -> bytes | None:
    """The payload bytes of a record if its header and checksum are right, else None."""
    if len(raw) <= _HEAD_LEN or not raw.endswith(b"}"):
        return None
    head, body = raw[:_HEAD_LEN], raw[_HEAD_LEN:-1]
    expected = _HEAD % (FORMAT, hashlib.sha256(body).hexdigest().encode())
    return body if head == expected else None


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(value: Any) -> bytes:
    return _canonical(value).encode("utf-8")


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical(value)).hexdigest()


class Cache:
    """Records under ``root/<kind>/<key[:2]>/<key>.json``."""

    def __init__(self, root: str, warn: Callable[[str], None]) -> None:
        self.root = root
        self.warn = warn  # corrupt records are reported through this, never silently skipped

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key[:2], f"{key}.json")

    def get(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warn(f"cannot read cache record {path}: {exc.strerror or exc}; recomputing")
            return None
        body = _checked_body(raw)
        if body is None:
            self.warn(f"cache record {path} is corrupt (checksum mismatch or truncated); recomputing")
            return None
        try:
            return json.loads(body)
        except ValueError:  # pragma: no cover - a matching checksum over bad JSON means a bug in put
            self.warn(f"cache record {path} does not parse; recomputing")
            return None

    def put(self, kind: str, key: str, payload: Any) -> str | None:
        """Store a record; a cache that cannot be written is reported and skipped (the result stands)."""
        path = self.path(kind, key)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            self.warn(f"cannot write the cache in {self.root}: {exc.strerror or exc}; results are not cached")
            return None
        body = canonical(payload)
        record = _HEAD % (FORMAT, hashlib.sha256(body).hexdigest().encode()) + body + b"}"
        try:
            write_atomic(path, record)
        except OSError as exc:
            self.warn(f"cannot write the cache in {self.root}: {exc.strerror or exc}; results are not cached")
            return None
        return path
