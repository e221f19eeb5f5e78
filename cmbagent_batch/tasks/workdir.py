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
``# attempt N`` alone) are removed, and its empty work directory becomes a spare for the next task; the
spares left and the shards' directories left empty go at the end of the run.
"""
from __future__ import annotations

import datetime
import errno
import functools
import glob
import itertools
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Collection, Sequence

from cmbagent_batch.attempt import WORK_SUBDIRS, Sharding, TaskContext
from cmbagent_batch.rundir.layout import Layout

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


def prepare(ctx: TaskContext, subdirs: Sequence[str] = WORK_SUBDIRS, made: bool = False) -> None:
    """Create the work directory, empty, and ``subdirs`` (the others come on demand: ``TaskContext.sub``).

    A directory left by an earlier attempt or run (the links staged for it, the files it wrote) is first
    moved aside as a whole (``set_aside``), so an attempt starts from an empty directory and finds in it
    only the inputs staged for it; only its ``logs/`` comes back, the one log of all the task's attempts.
    ``made``: the caller has just created the (empty) work directory."""
    work = ctx.work_dir
    if not made:
        try:
            make_work_dir(ctx)
        except FileExistsError:
            kept = set_aside(work, Layout(ctx.run_dir, ctx.sharding).kept_work_dir(ctx.rank, _checked_id(ctx.task_id)))
            os.mkdir(work)
            try:  # the task's log goes on: each attempt appends to it after a line "# attempt N"
                os.rename(os.path.join(kept, "logs"), os.path.join(work, "logs"))
            except FileNotFoundError:
                pass
    for name in subdirs:
        try:
            os.mkdir(os.path.join(work, name))
        except FileExistsError:
            pass


def make_work_dir(ctx: TaskContext) -> None:
    """Make the work directory (and its shard's directory, for the first task of the shard there): from a
    spare of this process (``remove_if_empty``) by one rename, else by ``mkdir``. Raises FileExistsError
    when it exists."""
    work = ctx.work_dir
    spare = _spare(ctx) if ctx.sharding is Sharding.SHARDED else None
    if spare is not None:
        if os.path.lexists(work):  # a rename would replace an empty directory there: it is set aside instead
            with _spares_lock:
                _spares.append(spare)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), work)
        try:
            os.rename(spare, work)
            return
        except FileNotFoundError:
            if os.path.isdir(spare):  # the shard's directory is missing
                os.makedirs(os.path.dirname(work), exist_ok=True)
                os.rename(spare, work)
                return
    try:
        os.mkdir(work)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(work), exist_ok=True)
        os.mkdir(work)


def remove_if_empty(ctx: TaskContext) -> bool:
    """Remove the work directory if it is empty; whether it did. Sharded, it becomes a spare
    (``RANK_DIR/tasks/.spare-PID-N``) that the next ``make_work_dir`` renames into place: two renames, as
    many metadata operations as rmdir and mkdir, but an rmdir frees a block (slow where freed blocks are
    discarded at once). ``Layout.remove_empty_shards`` removes the spares left when the run ends."""
    work = ctx.work_dir
    if ctx.sharding is not Sharding.SHARDED:
        try:
            os.rmdir(work)
        except OSError:
            return False
        return True
    try:
        with os.scandir(work) as entries:
            if next(entries, None) is not None:
                return False
        with _spares_lock:
            if len(_spares) >= _SPARES:
                os.rmdir(work)
                return True
            spare = os.path.join(_tasks_root(ctx), f"{SPARE}{os.getpid()}-{next(_numbers)}")
            os.rename(work, spare)
            _spares.append(spare)
    except OSError:
        return False
    return True


SPARE = ".spare-"  # RANK_DIR/tasks/.spare-PID-N: an empty work directory kept for the next task, at most
_SPARES = 8  # per process (one per thread running tasks)
_spares: list[str] = []
_spares_lock = threading.Lock()
_numbers = itertools.count()


def _spare(ctx: TaskContext) -> str | None:
    """A spare of this process under the rank's ``tasks/`` of ``ctx``, taken."""
    root = _tasks_root(ctx)
    with _spares_lock:
        for i in range(len(_spares) - 1, -1, -1):
            if os.path.dirname(_spares[i]) == root:
                return _spares.pop(i)
    return None


def _tasks_root(ctx: TaskContext) -> str:
    """RANK_DIR/tasks, from the work directory RANK_DIR/tasks/S/TASK."""
    return os.path.dirname(os.path.dirname(ctx.work_dir))


def set_aside(work_dir: str, kept: str) -> str:
    """Move the work directory to ``kept`` (``RANK_DIR/superseded/S/TASK``) and return that path: one
    rename, nothing deleted (files the task wrote hard-link the published outputs). What an attempt
    before that one left there is removed: one earlier work directory per task is kept."""
    try:
        os.rename(work_dir, kept)
        return kept
    except FileNotFoundError:
        if not os.path.lexists(work_dir):
            raise
        os.makedirs(os.path.dirname(kept), exist_ok=True)  # the first one set aside on this rank (or shard)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        _remove(kept)
    os.rename(work_dir, kept)
    return kept


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
    task = _checked_id(ctx.task_id)
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
    it (``remove_if_empty``). Return the bytes left in the work directory."""
    unknown = sorted(set(keep) - set(WORK_SUBDIRS))
    if unknown:
        raise ValueError(f"cannot keep {unknown[0]!r}: not a work subdirectory (one of {', '.join(WORK_SUBDIRS)})")
    left = 0
    kept = False
    with os.scandir(ctx.work_dir) as entries:  # one listing, rather than a probe per subdirectory
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
    if not kept:
        remove_if_empty(ctx)
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

_TASK_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _checked_id(task_id: str) -> str:
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(f"task id {task_id!r} cannot name a directory (letters, digits, '_', '.', '-' only)")
    return task_id


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


def _remove(path: str) -> None:
    """Remove ``path``, a directory tree (read-only directories in it included) or a file."""
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return

    def writable(func: Callable[..., object], name: str, exc: object) -> None:
        error = exc if isinstance(exc, BaseException) else exc[1]  # type: ignore[index]  # onerror: exc_info
        if func not in (os.unlink, os.rmdir) or not isinstance(error, PermissionError):
            raise error
        os.chmod(os.path.dirname(name), 0o700)  # in a read-only directory: make it writable, try again
        func(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable)
    else:
        shutil.rmtree(path, onerror=writable)


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
