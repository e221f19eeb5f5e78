"""``ro-crate-metadata.json`` written as it is made: one entity a line in its ``@graph``, so a crate of
10^5 tasks never holds more than one task's entities in memory. Entities are written once each (by id):
an id seen again is not written again, which lets many actions share a rank's or a host's entity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType
from typing import IO, Any

import orjson

from cmbagent_batch.provenance.vocab import CONTEXT, METADATA
from cmbagent_batch.rundir.atomic import atomic_output


class GraphWriter:
    """Writes DIR/ro-crate-metadata.json; the file appears, whole, when the ``with`` block ends well."""

    def __init__(self, crate_dir: str) -> None:
        self.path = os.path.join(crate_dir, METADATA)
        self.entities = 0
        self.bytes = 0
        self._seen: set[str] = set()
        self._cm = atomic_output(self.path)
        self._out: IO[bytes] | None = None

    def __enter__(self) -> GraphWriter:
        self._out = self._cm.__enter__()
        self._write(b'{"@context": ' + orjson.dumps(CONTEXT) + b',\n"@graph": [\n')
        return self

    def add(self, entity: dict[str, Any]) -> None:
        """Write ``entity`` unless one of its id was written already."""
        entity_id = entity["@id"]
        if entity_id in self._seen:
            return
        self._seen.add(entity_id)
        self._write((b",\n" if self.entities else b"") + orjson.dumps(entity))
        self.entities += 1

    def add_all(self, entities: Iterable[dict[str, Any]]) -> None:
        for entity in entities:
            self.add(entity)

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        self._out.write(data)
        self.bytes += len(data)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self._write(b"\n]}\n")
        self._cm.__exit__(kind, exc, tb)
