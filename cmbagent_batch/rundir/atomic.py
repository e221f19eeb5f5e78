"""Files that others read are replaced whole: written to a temporary file beside them, fsynced, renamed.

``atomic_output`` streams into the new file (a ledger export of 10^6 entries); ``write_atomic`` and
``write_json_atomic`` write what is already in memory. A reader sees the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

_INDENTED_TASKS = 1000  # a manifest of more tasks is written without indent (json's slow pure-Python path)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` when the block ends well (fsynced, renamed), and is
    removed when it does not: a reader sees the old file or the whole new one.

    Raises OSError if the temporary file cannot be created beside ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``; a reader sees the old file or the new one, never a mix."""
    with atomic_output(path) as fh:
        fh.write(data)


def write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON (indented by one space when small) and a final newline."""
    # indent goes through json's pure-Python encoder: readable for small files, slow for 10^4 tasks
    small = not isinstance(data, dict) or len(data.get("tasks", ())) <= _INDENTED_TASKS
    write_atomic(path, (json.dumps(data, indent=1 if small else None) + "\n").encode("utf-8"))


def fsync_dir(directory: str) -> None:
    """Make a file's creation, rename or removal in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
