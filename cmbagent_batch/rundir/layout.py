"""The run directory: its layout and its lock (files in it are written by ``atomic.py`` and ``jsonl.py``).

    RUN_DIR/
      layout.json                    the layout of the run directory (``Layout``), written before its first task
      run.json                       manifest (schemas/run.schema.json), rewritten atomically
      journal/rank-NNNN.jsonl        state journal per rank (append-only)
      ranks/rank-NNNN/tasks/S/TASK/  work directories: data codebase logs outputs temp chats cost
      ranks/rank-NNNN/superseded/S/TASK/  what the task's previous attempt left in its work directory
      ranks/rank-NNNN/spares/PID-N/  empty work directories kept for a process's next tasks, during a run
      ranks/rank-NNNN/scratch/PID/   where a worker process's python tasks run, during a run
      outputs/S/TASK/...             published outputs
      superseded/S/TASK-<time>-<id>/ outputs of an earlier run of a task that ran again (the newest
                                     job.keep_superseded of each task are kept: ``prune_superseded``)
      local-model/MODEL-rank-NNNN.log  output of the server of a local model (provider: local), per rank
      .lock                          held by the run using the directory

S = ``shard(TASK)``: at most 4,096 shards, a few hundred tasks each at 2*10^6 tasks. A run directory made
before shards (no layout.json; a run.json, journal/, ranks/ or outputs/) keeps its flat paths, without S/.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.attempt import Sharding
from cmbagent_batch.errors import UsageError
from cmbagent_batch.rundir.atomic import write_json_atomic
from cmbagent_batch.spec.model import JobSpec


def resolve_run_dir(spec: JobSpec) -> str:
    """The spec's run directory, absolute (a relative one is relative to the spec file's directory)."""
    base = os.path.dirname(os.path.abspath(spec.path))
    return os.path.normpath(os.path.join(base, os.path.expandvars(os.path.expanduser(spec.job.run_dir))))


def rank_dir(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "ranks", f"rank-{rank:04d}")


def work_dir(run_dir: str, rank: int, task_id: str) -> str:
    return os.path.join(rank_dir(run_dir, rank), "tasks", task_id)


LAYOUT_FILE = "layout.json"
SUPERSEDED = "superseded"
SPARES = "spares"  # RANK_DIR/spares/PID-N: empty work directories a process keeps for its next tasks
SCRATCH = "scratch"  # RANK_DIR/scratch/PID: where a worker process's python tasks run
SHARD_DIGITS = 3  # 4,096 shards
SHARD_PATTERN = re.compile(f"[0-9a-f]{{{SHARD_DIGITS}}}")
# What a run directory holds once a run used it: one of these and no layout.json is of the flat layout.
_USED = ("run.json", "journal", "ranks", "outputs")


def shard(task_id: str) -> str:
    """The task's shard: the first 3 hex digits of the SHA-256 of its id
    (``printf %s TASK | sha256sum | cut -c1-3``)."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:SHARD_DIGITS]


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a run directory keeps each task's work directory and published outputs, by task id."""

    run_dir: str
    sharding: Sharding

    @classmethod
    def of(cls, run_dir: str) -> Layout:
        """The layout of ``run_dir``: the one its layout.json records; without one, the flat layout for a
        run directory that a run already used (made before shards), else (a new one) the sharded layout."""
        path = os.path.join(run_dir, LAYOUT_FILE)
        try:
            recorded = read_json(path)
        except FileNotFoundError:
            used = any(os.path.lexists(os.path.join(run_dir, name)) for name in _USED)
            return cls(run_dir, Sharding.FLAT if used else Sharding.SHARDED)
        except (OSError, ValueError) as exc:
            why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            raise UsageError(f"{path}: cannot read the run directory's layout ({why})") from None
        names = [s.value for s in Sharding]
        name = recorded.get("layout") if isinstance(recorded, dict) else None
        if name not in names:
            raise UsageError(f"{path}: unknown layout {name!r} (this version knows {', '.join(names)}); "
                             "was the run directory made by a newer cmbagent-batch?")
        return cls(run_dir, Sharding(name))

    def record(self) -> None:
        """Write layout.json, unless it is there: from the first task on, the run directory keeps its layout."""
        path = os.path.join(self.run_dir, LAYOUT_FILE)
        if not os.path.exists(path):
            shard_rule = {"shard": f"the first {SHARD_DIGITS} hex digits of the SHA-256 of the task id"}
            write_json_atomic(path, {"layout": self.sharding.value, **(shard_rule if self.sharded else {})})

    @property
    def sharded(self) -> bool:
        return self.sharding is Sharding.SHARDED

    def place(self, task_id: str) -> str:
        """The task's place under ``tasks/``, ``outputs/`` and ``superseded/``: S/TASK (flat: TASK)."""
        return f"{shard(task_id)}{os.sep}{task_id}" if self.sharded else task_id  # an id holds no separator

    def work_dir(self, rank: int, task_id: str) -> str:
        """RUN_DIR/ranks/rank-NNNN/tasks/S/TASK: the task's work directory on ``rank`` (asked for each
        record and attempt: the rank's part is made once)."""
        return f"{_tasks_dir(self.run_dir, rank)}{os.sep}{self.place(task_id)}"

    def kept_work_dir(self, rank: int, task_id: str) -> str:
        """RUN_DIR/ranks/rank-NNNN/superseded/S/TASK: what the task's previous attempt left on ``rank``."""
        return os.path.join(rank_dir(self.run_dir, rank), SUPERSEDED, self.place(task_id))

    def scratch(self, rank: int, pid: int) -> str:
        """RANK_DIR/scratch/PID: where the python tasks of worker process ``pid`` run, one at a time; what
        one leaves there becomes its work directory."""
        return os.path.join(rank_dir(self.run_dir, rank), SCRATCH, str(pid))

    def leftovers(self) -> list[str]:
        """Scratch directories that are not empty: what python tasks left when their run was killed (with
        SIGKILL, say) before the runner could move it to their work directories."""
        found = []
        for scratch in sorted(glob.glob(os.path.join(self.run_dir, "ranks", "rank-*", SCRATCH, "*"))):
            with contextlib.suppress(OSError), os.scandir(scratch) as entries:
                if next(entries, None) is not None:
                    found.append(scratch)
        return found

    def published(self, task_id: str) -> str:
        """RUN_DIR/outputs/S/TASK: the task's published outputs."""
        return os.path.join(self.run_dir, "outputs", self.place(task_id))

    def superseded(self, task_id: str) -> str:
        """RUN_DIR/superseded/S (flat: RUN_DIR/superseded): where the task's earlier output sets go."""
        return os.path.dirname(os.path.join(self.run_dir, SUPERSEDED, self.place(task_id)))

    def remove_empty_shards(self) -> None:
        """At the end of a run, on every rank: remove the empty shards of work directories, the spare work
        directories (``spares/PID-N``) and the empty scratch directories (``scratch/PID``). One ``rmdir``
        per shard made (at most 4,096 a rank)."""
        ranks = os.path.join(self.run_dir, "ranks")
        for rank in os.listdir(ranks) if self.sharded and os.path.isdir(ranks) else []:
            for sub, empty in (("tasks", SHARD_PATTERN.fullmatch), (SPARES, bool), (SCRATCH, bool)):
                where = os.path.join(ranks, rank, sub)
                try:
                    names = os.listdir(where)
                except OSError:
                    continue
                for name in names:
                    if empty(name):
                        with contextlib.suppress(OSError):  # not empty: a task in it kept something
                            os.rmdir(os.path.join(where, name))
            for sub in (SPARES, SCRATCH):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(ranks, rank, sub))

    def __reduce__(self) -> tuple[type[Layout], tuple[str, Sharding]]:
        return Layout, (self.run_dir, self.sharding)


@functools.lru_cache(maxsize=256)
def _tasks_dir(run_dir: str, rank: int) -> str:
    return os.path.join(rank_dir(run_dir, rank), "tasks")


def journal_dir(run_dir: str) -> str:
    """RUN_DIR/journal: the state journals and their index."""
    return os.path.join(run_dir, "journal")


def journal_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "journal", f"rank-{rank:04d}.jsonl")


def server_logs(run_dir: str) -> str:
    """The directory of the logs of local models' servers."""
    return os.path.join(run_dir, "local-model")


def journal_paths(run_dir: str) -> list[str]:
    directory = os.path.join(run_dir, "journal")
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".jsonl"))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def tail_lines(path: str, lines: int, window: int = 4096) -> list[str]:
    """The last ``lines`` non-blank lines among the last ``window`` bytes of a log file ([] if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - window))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class RunLock:
    """An exclusive ``flock`` on RUN_DIR/.lock: released by the kernel when the holder dies, so a
    lock left by a crash is never stale."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, ".lock")
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def acquire(self, wait_for_dead: float = 0.0) -> None:
        """Take the lock, or raise ``UsageError`` naming its holder. When the holder is a run on this host
        that is gone, its watchdog holds the lock while it ends that run's tasks: wait for it, up to
        ``wait_for_dead`` seconds (and say so)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        run_dir = os.path.dirname(self.path)

        def holder() -> str:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"

        def worth_waiting() -> str | None:
            held_by = holder()
            if not _gone(held_by):
                return None
            return f"the run that held {run_dir} ({held_by}) is gone; waiting for its tasks to be ended"

        if not _take(fd, wait_for_dead, worth_waiting):
            held_by = holder()
            os.close(fd)
            raise UsageError(f"run directory {run_dir} is in use by {held_by}; wait for that run to end, or use "
                             "another --run-dir")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd

    def note(self, text: str) -> None:
        """Add ``text`` to what the lock file says of its holder (say, the watchdog that holds it too)."""
        if self._fd is not None:
            os.write(self._fd, f" {text}".encode())

    def release(self, unlock: bool = True) -> None:
        """Let the lock go. ``unlock=False``: only close this process's descriptor, so that a process that
        shares the lock (the watchdog ending tasks still running) holds it until it is done."""
        if self._fd is not None:
            if unlock:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


TASKS_LOCK = ".tasks.lock"  # shared by the watchdogs of MPI worker ranks while they have tasks


def hold_tasks_lock(run_dir: str) -> int:
    """A shared ``flock`` on RUN_DIR/.tasks.lock (its descriptor), for an MPI worker rank and its watchdog
    to hold while the rank has tasks: the watchdog keeps it until it has ended them, even after the rank
    was killed, and a new run waits for it (``wait_for_earlier_tasks``)."""
    fd = os.open(os.path.join(run_dir, TASKS_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def wait_for_earlier_tasks(run_dir: str, limit: float) -> None:
    """Wait (saying so) while a watchdog of an earlier run's MPI worker rank, on any node that shares the
    lock, still ends that run's tasks; ``UsageError`` after ``limit`` seconds."""
    path = os.path.join(run_dir, TASKS_LOCK)
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        taken = _take(fd, limit, lambda: f"tasks of an earlier run in {run_dir} are still being ended; waiting")
    except OSError:
        return  # a file system without locks: nothing to wait for that can be known
    finally:
        os.close(fd)  # an exclusive lock taken here goes with it
    if not taken:
        raise UsageError(f"tasks of an earlier run in {run_dir} are still being ended (a watchdog holds {path}); "
                         "wait for them, or use another --run-dir")


def _take(fd: int, limit: float, worth_waiting: Callable[[], str | None]) -> bool:
    """An exclusive ``flock`` on ``fd``. While another process holds it, wait (up to ``limit`` seconds)
    as long as ``worth_waiting()`` says why (said once); False when it does not, or the time is up."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            why = worth_waiting()
            if why is None or time.monotonic() >= deadline:
                return False
            if not said:
                print(f"cmbagent-batch: {why}", file=sys.stderr)
                said = True
            time.sleep(0.1)


def _gone(holder: str) -> bool:
    """Whether the holder a lock file names ("pid N on HOST since ...") is a process of this host that
    no longer runs."""
    parts = holder.split()
    if len(parts) < 4 or parts[0] != "pid" or not parts[1].isdigit() or parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def runner_gone(run_dir: str) -> bool:
    """Whether the run that last held RUN_DIR's lock is known to be gone: nobody holds the lock (not the
    run, nor its watchdog ending its tasks), and the lock file names a dead process of this host, or
    nothing (released). A holder on another host, whose lock may be local to its node, is not judged."""
    try:
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held, or a file system without locks: not known to be gone
            return False
        try:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return not holder or _gone(holder)
    finally:
        os.close(fd)


def set_aside(run_dir: str) -> str | None:
    """For --fresh: rename an existing run directory to RUN_DIR.old-<time> and return that name."""
    if not os.path.exists(run_dir):
        return None
    target = f"{run_dir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{run_dir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    probe = RunLock(run_dir)
    try:
        if os.path.exists(probe.path):
            probe.acquire(wait_for_dead=60)  # refuse to move a directory another run is using
            probe.release()
        os.rename(run_dir, target)
    except OSError as exc:  # a read-only file system, no permission: nothing has started yet
        raise UsageError(f"cannot move the run directory {run_dir} aside (--fresh): {exc.strerror or exc}") from None
    return target
