"""A task's work directory: create it, link its inputs in, publish its outputs, trim it.

Paths follow the run directory's ``Layout`` (``TaskContext.sharding``): ``RANK_DIR/tasks/S/TASK``,
``RUN_DIR/outputs/S/TASK``, S the task's shard, made by its first task that needs it.

Each attempt starts in an empty work directory: the one an earlier attempt or run left is first moved to
``RANK_DIR/superseded/S/TASK`` (one kept per task), all but its ``logs/``. Publishing is crash-safe:
outputs are collected in ``.staging-TASK`` beside ``RUN_DIR/outputs/S/TASK`` (hard links where possible)
and renamed into place as a whole; an earlier run's outputs are moved to ``RUN_DIR/superseded/S/``, never
deleted. The staging name is fixed, so the next publish of the task finds a crash's leftovers without
listing the shard. One publish per task at a time.

A task that succeeds and leaves nothing costs no inode once the run ends: its empty logs (the header
``# attempt N`` alone) are removed, and its empty work directory becomes a spare for the process's next
task (``places``); the spares left and the shards' directories left empty go at the end of the run.
"""
from __future__ import annotations

import datetime
import errno
import functools
import glob
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Collection, Sequence

from cmbagent_batch.attempt import WORK_SUBDIRS, TaskContext
from cmbagent_batch.rundir.layout import Layout
from cmbagent_batch.tasks.places import (
    bring_logs,
    checked_id,
    make_work_dir,
    retire,
    set_aside_earlier,
)

LOGS = ("stdout.log", "stderr.log")  # a shell or agent task's logs, in logs/

class OutputError(Exception):
    """Declared outputs were not written; ``missing`` lists them as declared, in declaration order."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        if len(self.missing) == 1:
            message = f"declared output {self.missing[0]!r} was not written"
        else:
            message = "declared outputs " + ", ".join(repr(m) for m in self.missing) + " were not written"
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:  # survives a process boundary
        return (OutputError, (self.missing,))


def prepare(ctx: TaskContext, subdirs: Sequence[str] = WORK_SUBDIRS) -> None:
    """Create the work directory, empty, and ``subdirs`` (the others come on demand: ``TaskContext.sub``).

    A directory left by an earlier attempt or run (the links staged for it, the files it wrote) is first
    moved aside as a whole (``set_aside``), so an attempt starts from an empty directory and finds in it
    only the inputs staged for it; only its ``logs/`` comes back, the one log of all the task's attempts."""
    work = ctx.work_dir
    try:
        make_work_dir(ctx)
    except FileExistsError:
        kept = set_aside_earlier(ctx)
        os.mkdir(work)
        bring_logs(kept, work)
    for name in subdirs:
        try:
            os.mkdir(os.path.join(work, name))
        except FileExistsError:
            pass


def stage_inputs(ctx: TaskContext, links: Sequence[tuple[str, str]]) -> None:
    """Make each ``(absolute source, relative destination)`` a symlink at ``work_dir/destination``.

    A symlink left there by an earlier attempt is replaced; anything else in the way is an error, and so
    is a destination that leaves the work directory (absolute, ``..``, or through a symlinked directory).
    """
    if not links:
        return
    root = os.path.realpath(ctx.work_dir)
    for source, destination in links:
        rel = _relative(destination, "input destination")
        if not os.path.isabs(source):
            raise ValueError(f"input source {source!r} for {destination!r} is not an absolute path")
        if not os.path.exists(source):
            raise FileNotFoundError(f"input source {source!r} for {destination!r} does not exist")
        target = os.path.join(ctx.work_dir, rel)
        parent = os.path.realpath(os.path.dirname(target))  # resolved before anything is created
        if parent != root and not parent.startswith(root + os.sep):
            raise ValueError(f"input destination {destination!r} escapes the task's work directory through a symlink")
        os.makedirs(parent, exist_ok=True)
        try:
            os.symlink(source, target)
        except FileExistsError:
            if not os.path.islink(target):
                raise FileExistsError(
                    f"cannot stage input {destination!r}: {target} already exists and is not a symlink"
                ) from None
            os.unlink(target)
            os.symlink(source, target)


def publish(ctx: TaskContext, outputs: Sequence[str], paths: Sequence[str] | None = None) -> list[str]:
    """Check the declared outputs exist and install them as ``RUN_DIR/outputs/S/TASK``; return their paths.

    ``outputs`` are paths or globs relative to the work directory (files or directories). Raises
    ``OutputError`` naming every declared output that is missing (a glob must match something); then
    nothing is changed. The returned paths are the matches, relative and sorted (``paths``: what
    ``existing_outputs`` returned for them just before, so as not to look twice).
    """
    task = checked_id(ctx.task_id)
    paths = list(paths) if paths is not None else existing_outputs(ctx.work_dir, outputs)
    layout = Layout(ctx.run_dir, ctx.sharding)
    final = layout.published(task)
    root = os.path.dirname(final)
    # One publish per task at a time (the run directory's lock), so the staging name can be fixed: a
    # leftover of a publish that crashed is found by name and holds only copies of work-dir files.
    staging = os.path.join(root, f".staging-{task}")
    try:
        os.mkdir(staging)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging)
    except FileNotFoundError:
        os.makedirs(root, exist_ok=True)
        os.mkdir(staging)
    try:
        for rel in paths:
            _copy_in(os.path.join(ctx.work_dir, rel), os.path.join(staging, rel), os.sep in rel)
        _install(staging, final, layout.superseded(task), task)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths


def cleanup(ctx: TaskContext, keep: Collection[str]) -> int:
    """After a success: remove the work subdirectories not in ``keep`` (retention, e.g. drop ``temp``) and
    the logs that hold only this attempt's header; then the work directory itself if nothing is left in
    it (``retire``). Return the bytes left in the work directory."""
    unknown = sorted(set(keep) - set(WORK_SUBDIRS))
    if unknown:
        raise ValueError(f"cannot keep {unknown[0]!r}: not a work subdirectory (one of {', '.join(WORK_SUBDIRS)})")
    left = 0
    kept = False
    try:
        listing = os.scandir(ctx.work_dir)  # one listing, rather than a probe per subdirectory
    except FileNotFoundError:  # a python task that left nothing in its scratch directory
        return 0
    with listing as entries:
        for entry in entries:
            if entry.name in WORK_SUBDIRS and entry.name not in keep:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
                    continue
                try:
                    os.rmdir(entry.path)  # most often empty: one call, where rmtree makes eight
                except OSError:
                    shutil.rmtree(entry.path)
                continue
            if entry.name == "logs" and entry.is_dir(follow_symlinks=False) and _drop_empty_logs(entry.path, ctx.attempt):
                continue
            kept = True
            if entry.is_dir(follow_symlinks=False):
                left += tree_size(entry.path)
            elif entry.is_file(follow_symlinks=False):
                left += entry.stat(follow_symlinks=False).st_size
    if not kept:  # what was in it is gone
        retire(ctx)
    return left


def _drop_empty_logs(logs: str, attempt: int) -> bool:
    """Remove the logs holding only the header of ``attempt``, then ``logs`` if empty; whether it did. A
    log of an earlier attempt too is longer: the size tells (one ``stat``, no read)."""
    header = len(f"# attempt {attempt}\n")
    for name in LOGS:
        path = os.path.join(logs, name)
        try:
            if os.stat(path).st_size == header:
                os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(logs)
    except OSError:
        return False
    return True


def tree_size(path: str) -> int:
    """Bytes in the files under ``path`` (links not followed; hard links counted once per name)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


# -- paths -----------------------------------------------------------------------------------------

def _relative(path: str, what: str) -> str:
    """``path`` normalised, if it stays inside the work directory; else ValueError."""
    if os.path.isabs(path):
        raise ValueError(f"{what} {path!r} is absolute and escapes the task's work directory")
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"{what} {path!r} uses '..' and escapes the task's work directory")
    if norm == ".":
        raise ValueError(f"{what} {path!r} names the work directory itself")
    return norm


def existing_outputs(work_dir: str, outputs: Sequence[str]) -> list[str]:
    """The existing paths the declared outputs name, minus those inside another one; OutputError if any is missing."""
    found: set[str] = set()
    missing: list[str] = []
    for declared in outputs:
        rel = _relative(declared, "declared output")
        if glob.has_magic(rel):
            hits = [os.path.normpath(h) for h in glob.glob(rel, root_dir=work_dir, recursive=True)]
        else:
            hits = [rel]
        hits = [h for h in hits if os.path.exists(os.path.join(work_dir, h))]  # a dangling symlink was not written
        if not hits:
            missing.append(declared)
        found.update(hits)
    if missing:
        raise OutputError(missing)
    kept: list[str] = []
    for rel in sorted(found):
        parts = rel.split(os.sep)
        if not any(os.sep.join(parts[:i]) in found for i in range(1, len(parts))):
            kept.append(rel)
    return kept


# -- copying and installing ------------------------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> str:
    if os.path.islink(src):  # publish what it points to (os.link would link the symlink itself on Linux)
        src = os.path.realpath(src)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _copy_in(src: str, dst: str, nested: bool = True) -> None:
    if nested:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _install(staging: str, final: str, superseded: str, task: str) -> None:
    """Put ``staging`` at ``final``; an existing ``final`` goes to ``superseded/TASK-<UTC time>-<random>``."""
    try:
        os.rename(staging, final)  # the first publish of the task (an empty directory there is replaced)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    os.makedirs(superseded, exist_ok=True)
    aside = os.path.join(superseded, _aside_name(task))
    # Atomic swap where the file system supports it: outputs/TASK always holds a complete set.
    # A crash right after this rename leaves a copy of the new set in superseded/ and the old in place.
    os.rename(staging, aside)
    if _exchange(aside, final):
        return
    # Fallback: two renames. A crash between them leaves both sets in superseded/ and no outputs/TASK.
    os.rename(final, os.path.join(superseded, _aside_name(task)))
    os.rename(aside, final)


def _aside_name(task: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{task}-{stamp}-{secrets.token_hex(4)}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_SWAP = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # this kernel or file system cannot swap


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only here: most commands never publish

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in _NO_SWAP:
        return False
    raise OSError(err, os.strerror(err), b)
