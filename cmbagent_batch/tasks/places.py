"""Where an attempt runs, at the least cost to the file system: a worker process's scratch directory for
python tasks (``take_scratch``, ``adopt_scratch``), a spare directory renamed into place for the others
(``make_work_dir``, ``retire``), and what an earlier attempt left, set aside (``set_aside``).

On ext4 here, making and removing a directory cost 840 us of wall time, two renames 120 us, and a
listing of an empty directory 35 us: a task that writes nothing must not cost a directory of its own.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable

from cmbagent_batch.attempt import Sharding, TaskContext
from cmbagent_batch.rundir.layout import SPARES, Layout, rank_dir

_TASK_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def set_aside_earlier(ctx: TaskContext) -> str:
    """Set aside the work directory an earlier attempt or run left (``set_aside``); where it went."""
    return set_aside(ctx.work_dir, Layout(ctx.run_dir, ctx.sharding).kept_work_dir(ctx.rank, checked_id(ctx.task_id)))


def bring_logs(kept: str, work: str) -> None:
    """The task's log goes on: each attempt appends to it after a line ``# attempt N``."""
    try:
        os.rename(os.path.join(kept, "logs"), os.path.join(work, "logs"))
    except FileNotFoundError:
        pass


def take_scratch(ctx: TaskContext) -> str:
    """This process's scratch directory on the rank of ``ctx`` (``Layout.scratch``), empty: where a python
    task in a worker process runs (``chdir``). Made once, then kept from task to task until a task leaves
    something in it (``adopt_scratch``). One left, not empty, by a process of the same id in a run that
    was killed is first renamed ``PID-left-NS`` (``Layout.leftovers`` finds it)."""
    path = Layout(ctx.run_dir, ctx.sharding).scratch(ctx.rank, os.getpid())
    if path in _scratch_made:
        return path
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        with os.scandir(path) as entries:
            left = next(entries, None) is not None
        if left:
            os.rename(path, f"{path}-left-{time.time_ns()}")
            os.mkdir(path)
    _scratch_made.add(path)
    return path


_scratch_made: set[str] = set()  # this process's scratch directories that exist, empty between tasks


def carry_logs(ctx: TaskContext, scratch: str) -> None:
    """Before a later attempt runs in ``scratch``: set aside the work directory an earlier attempt left,
    and bring its ``logs/`` into ``scratch`` (the task's log goes on)."""
    if os.path.lexists(ctx.work_dir):
        bring_logs(set_aside_earlier(ctx), scratch)


def adopt_scratch(scratch: str, ctx: TaskContext) -> bool:
    """Make what the attempt left in ``scratch`` its work directory, by one rename (its shard's directory
    made first if needed); whether it left anything. A work directory there already (left by a run the
    journal does not know of) is set aside first. Also the runner's, for a worker that died."""
    with os.scandir(scratch) as entries:
        if next(entries, None) is None:
            return False
    _scratch_made.discard(scratch)
    try:
        _move(scratch, ctx.work_dir)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        set_aside_earlier(ctx)
        os.rename(scratch, ctx.work_dir)
    return True


def _move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, making ``dst``'s directory first if it is missing (the first task of a
    shard, the rank's first spare)."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        if not os.path.lexists(src):
            raise
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)


def make_work_dir(ctx: TaskContext) -> None:
    """Make the work directory (and its shard's directory, for the first task of the shard there): from a
    spare of this process (``retire``) by one rename, else by ``mkdir``. Raises FileExistsError
    when it exists."""
    work = ctx.work_dir
    spare = _spare(ctx) if ctx.sharding is Sharding.SHARDED else None
    if spare is not None:
        if os.path.lexists(work):  # a rename would replace an empty directory there: it is set aside instead
            with _spares_lock:
                _spares.append(spare)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), work)
        try:
            _move(spare, work)
            return
        except FileNotFoundError:  # the spare is gone: a directory is made
            pass
    try:
        os.mkdir(work)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(work), exist_ok=True)
        os.mkdir(work)


def retire(ctx: TaskContext) -> bool:
    """Remove the (empty) work directory; whether it did. Sharded, it becomes a spare
    (``RANK_DIR/spares/PID-N``) that this process's next ``make_work_dir`` renames into place: two
    renames, where an ``mkdir`` and an ``rmdir`` cost several times more (on ext4, 120 us against 840 us
    of wall time: a new directory allocates an inode and a block, and freeing them is journaled).
    ``Layout.remove_empty_shards`` removes the spares left when the run ends."""
    work = ctx.work_dir
    try:
        with _spares_lock:
            if ctx.sharding is not Sharding.SHARDED or len(_spares) >= _SPARES:
                os.rmdir(work)
                return True
            spare = os.path.join(spares_dir(ctx), f"{os.getpid()}-{next(_numbers)}")
            _move(work, spare)
            _spares.append(spare)
    except OSError:
        return False
    return True


_SPARES = 8  # per process (one per thread running tasks)
_spares: list[str] = []
_spares_lock = threading.Lock()
_numbers = itertools.count()


def _spare(ctx: TaskContext) -> str | None:
    """A spare of this process under the rank's ``spares/`` of ``ctx``, taken."""
    root = spares_dir(ctx)
    with _spares_lock:
        for i in range(len(_spares) - 1, -1, -1):
            if os.path.dirname(_spares[i]) == root:
                return _spares.pop(i)
    return None


def spares_dir(ctx: TaskContext) -> str:
    """RANK_DIR/spares, beside tasks/ (which holds shards alone)."""
    return os.path.join(rank_dir(ctx.run_dir, ctx.rank), SPARES)


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
        remove_tree(kept)
    os.rename(work_dir, kept)
    return kept


def checked_id(task_id: str) -> str:
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(f"task id {task_id!r} cannot name a directory (letters, digits, '_', '.', '-' only)")
    return task_id


def remove_tree(path: str) -> None:
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
