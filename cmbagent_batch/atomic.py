"""Files that others read are replaced whole: written to a temporary file beside them, fsynced, renamed."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``; a reader sees the old file or the new one, never a mix.

    Raises OSError if the temporary file cannot be created; it is removed if anything later fails.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
