"""Pruning ``RUN_DIR/superseded/``: the output sets of each task beyond the newest ``job.keep_superseded``
go, oldest first, before a run's first task (``run --prune-superseded``: all of them)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from cmbagent_batch.rundir.layout import SHARD_PATTERN, SUPERSEDED

# An output set moved aside by a publish: TASK-<UTC time to the microsecond>-<8 random hex digits>
_SET_ASIDE = re.compile(r"(?P<task>.+)-(?P<stamp>\d{8}T\d{12}Z)-[0-9a-f]{8}")
_LISTED = 5  # names said in the message; the rest are counted


@dataclass(frozen=True, slots=True)
class Pruned:
    """What ``prune_superseded`` removed from RUN_DIR/superseded/, oldest first."""

    directory: str
    removed: tuple[str, ...]
    size: int  # bytes of the files removed
    failed: tuple[str, ...]  # "NAME: reason", for what could not be removed
    unreadable: str | None = None  # why the directory could not be listed (a file named superseded...)

    def lines(self, why: str) -> list[str]:
        """What to tell the user (nothing when nothing was to be removed); ``why`` names the setting or flag."""
        out = [f"cmbagent-batch: warning: cannot remove {self.directory}/{f}" for f in self.failed]
        if self.unreadable:
            out.append(f"cmbagent-batch: warning: cannot read {self.directory} ({self.unreadable}); no earlier output "
                       "set was removed")
        if self.removed:
            names = ", ".join(self.removed[:_LISTED])
            more = f" and {len(self.removed) - _LISTED} more" if len(self.removed) > _LISTED else ""
            sets = "set" if len(self.removed) == 1 else "sets"
            out.insert(0, f"cmbagent-batch: removed {len(self.removed)} earlier output {sets} ({self.size:,} bytes) "
                          f"from {self.directory}, oldest first ({why}): {names}{more}")
        return out


def superseded_to_prune(names: Iterable[str], keep: int) -> list[str]:
    """The output sets of RUN_DIR/superseded/ beyond the newest ``keep`` of each task, oldest first.
    ``names``: the sets' paths relative to it, S/NAME (or NAME, in the flat layout). A name a publish did
    not make (TASK-<time>-<id>) is never chosen."""
    by_task: dict[str, list[tuple[str, str]]] = {}
    for path in names:
        if m := _SET_ASIDE.fullmatch(os.path.basename(path)):
            by_task.setdefault(m["task"], []).append((m["stamp"], path))
    old = [entry for sets in by_task.values() for entry in sorted(sets)[:max(0, len(sets) - keep)]]
    return [path for _, path in sorted(old)]


def prune_superseded(run_dir: str, keep: int) -> Pruned:
    """Remove the output sets of RUN_DIR/superseded/ beyond the newest ``keep`` of each task, oldest first.
    Call it with the run directory's lock held: a run publishing meanwhile would add to what is judged.
    Sets are found in either layout (a set's name is never a shard's), in one listing of each shard."""
    directory = os.path.join(run_dir, SUPERSEDED)
    removed: list[str] = []
    failed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    except OSError as exc:  # a file named superseded, no permission: said, and the run goes on
        return Pruned(directory, (), 0, (), unreadable=exc.strerror or str(exc))
    paths = []
    for name in names:
        if SHARD_PATTERN.fullmatch(name):
            try:
                paths += [os.path.join(name, n) for n in os.listdir(os.path.join(directory, name))]
            except NotADirectoryError:
                pass
        else:
            paths.append(name)
    size = 0
    emptied: set[str] = set()
    for path in superseded_to_prune(paths, keep):
        try:
            size += _remove_tree(os.path.join(directory, path))
            removed.append(os.path.basename(path))
            emptied.add(os.path.dirname(path))
        except OSError as exc:
            failed.append(f"{os.path.basename(path)}: {exc.strerror or exc}")
    for shard_dir in sorted(emptied - {""}):  # a shard left empty goes too
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(directory, shard_dir))
    return Pruned(directory, tuple(removed), size, tuple(failed))


def _remove_tree(path: str) -> int:
    """Remove ``path`` and what it holds; the bytes of its files (a hard link counted once per name). A
    directory in it that a task made read-only is made writable first, as its owner may."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    size = 0
    _owner_may_write(path)
    for top, dirs, files in os.walk(path):
        for name in dirs:  # before the walk lists it
            _owner_may_write(os.path.join(top, name))
        for name in files:
            entry = os.lstat(os.path.join(top, name))
            size += entry.st_size if stat.S_ISREG(entry.st_mode) else 0
    shutil.rmtree(path)
    return size


def _owner_may_write(path: str) -> None:
    """Give a directory's owner read, write and search permission on it (a symlink is left alone)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode) and mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(mode) | 0o700)
