"""Files that others read are replaced whole: written to a temporary file beside them, fsynced, renamed.

``atomic_output`` streams into the new file (a ledger export of 10^6 entries); ``write_atomic`` and
``write_json_atomic`` write what is already in memory. A reader sees the old file or the whole new one.
``writable_dir`` and ``writable_output`` check a place before a command starts, so that a place that
cannot be written is a usage error naming it, not a crash half way.

Every file written here is created as ``open`` creates one (mode 0666, 0777 for a script), so the kernel
gives it the mode the user's umask, or the directory's default ACL, allows; ``tempfile.mkstemp`` would
make it 0600, which would keep a group from reading reports and run files. No file of a run holds a
secret (an agent's API key is read from the environment by the agent process and redacted from its
transcript), so none needs to be kept private.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from cmbagent_batch.errors import UsageError

_INDENTED_TASKS = 1000  # a manifest of more tasks is written without indent (json's slow pure-Python path)
_NEW = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


def _create_beside(path: str) -> tuple[int, str]:
    """A new file of a random name in ``path``'s directory, created as ``open`` would (its descriptor, its
    path). Raises OSError if it cannot be created."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, _NEW, 0o666), tmp
        except FileExistsError:  # a name taken: draw another
            continue


def write_new(path: str, data: bytes, *, executable: bool = False) -> None:
    """Create ``path`` (mode 0666, or 0777 for a script, less the umask or the default ACL) holding ``data``.
    Raises FileExistsError if it exists: a file left there is never taken over."""
    fd = os.open(path, _NEW, 0o777 if executable else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:  # a disk full: no half script is left
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` when the block ends well (fsynced, renamed), and is
    removed when it does not: a reader sees the old file or the whole new one.

    Raises OSError if the temporary file cannot be created beside ``path``.
    """
    fd, tmp = _create_beside(path)
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


def writable_dir(directory: str, what: str) -> str:
    """``directory``, made (with its parents) if missing, once a file could be created in it and removed;
    else ``UsageError``: "cannot write the WHAT DIRECTORY: REASON" (a read-only file system, no
    permission, a path below a file...)."""
    try:
        os.makedirs(directory, exist_ok=True)
        _probe(directory)
    except OSError as exc:
        raise UsageError(f"cannot write the {what} {directory}: {_reason(directory, exc, directory)}") from None
    return directory


def missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first: what making ``path`` would make."""
    made = []
    while not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def remove_empty(directories: list[str]) -> list[str]:
    """Remove each directory (deepest first) that holds nothing; those removed."""
    removed = []
    for d in directories:
        try:
            os.rmdir(d)
        except OSError:  # gone already, or it holds something else
            continue
        removed.append(d)
    return removed


def writable_output(path: str, flag: str = "-o") -> str:
    """``path``, once a file could be created beside it (as ``atomic_output`` does); a missing directory
    is not made. Else ``UsageError``: "cannot write -o PATH: REASON"."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"cannot write {flag} {path}: it is a directory")
    if not os.path.isdir(directory):  # missing, or a file (or below one): said, never made
        blocker = _deepest_existing(directory)
        why = f"the directory {directory} does not exist" if os.path.isdir(blocker) else f"{blocker} is not a directory"
        raise UsageError(f"cannot write {flag} {path}: {why}")
    try:
        _probe(directory)
    except OSError as exc:
        raise UsageError(f"cannot write {flag} {path}: {_reason(directory, exc, path)}") from None
    return path


def _probe(directory: str) -> None:
    """Create a file in ``directory`` and remove it (OSError if either cannot be done)."""
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


def _deepest_existing(path: str) -> str:
    """``path`` or the nearest of its parents that exists (a path below a file does not)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _reason(directory: str, exc: OSError, named: str) -> str:
    """Why ``directory`` cannot be written, in words for a message that names ``named``: the OS's reason
    ("Read-only file system"), or which path is a file where a directory should be."""
    blocker = _deepest_existing(directory)
    if not os.path.isdir(blocker):
        return "it is not a directory" if blocker == os.path.abspath(named) else f"{blocker} is not a directory"
    return exc.strerror or str(exc)
