"""The watchdog: a runner's tasks never outlive it.

Each process that starts tasks (the local runner, each MPI worker rank) starts one watchdog, a small
process in a session of its own, and tells it over a pipe about every process group it starts (a shell
or agent task's, a python worker process's) and every one that ended. When that pipe closes, the process
that started the tasks is gone, however it went: SIGKILL, the out-of-memory killer, a node's session
ending, or a normal exit. The watchdog then ends every group still registered (SIGTERM and SIGCONT,
SIGKILL after a grace period) and exits. After a normal exit no group is left, and it simply exits.

Why a watchdog:
* ``PR_SET_PDEATHSIG`` (Linux only) fires when the *thread* that started the child exits, not when the
  process exits. Tasks are started by pool threads. It also reaches only that child, not what the child
  started (a script's ``sleep``, a pool), while a process group holds them all.
* A subreaper (``PR_SET_CHILD_SUBREAPER``) only lets a live runner reap orphans.
* A cgroup needs a delegated hierarchy (systemd's, Slurm's) that login nodes and laptops do not have.
  Under Slurm the job's cgroup already ends everything when the job ends.

A pipe and a process work everywhere. The one case a watchdog cannot cover is its own SIGKILL. That is
unlikely: it is small, it ignores the signals a terminal or ``kill`` of the runner's group send, and it
lives outside that group.

The watchdog can also hold a lock (the same open file, inherited): the runner's holds the run directory's
lock, an MPI worker rank's a shared lock on ``RUN_DIR/.tasks.lock``, so that a rerun can neither take the
directory nor start a task while the tasks of a run that died are still being ended.

A group id cannot be reused while any process of the group lives, so signalling a registered group
reaches only what the task started, unless the whole group ended and its id went to a new process: a
group whose leader's process id now belongs to a process started at another time is left alone.

Besides its pipe, the watchdog watches its parent: a task that forks (a python task in a thread running
a ``fork`` pool) copies the pipe's write end, and would otherwise hide the runner's death.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence

_POLL_S = 0.05


class Watchdog:
    """This process's watchdog, seen from here: ``track`` and ``untrack`` process groups. Closing the
    pipe (``close``, or this process dying) makes it end the groups still tracked."""

    def __init__(self, grace: float, keep_fds: Sequence[int] = ()) -> None:
        self.grace = grace
        self.tracking = 0  # groups tracked and not untracked yet
        self._proc: subprocess.Popen[bytes] | None = None
        self._broken = True
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cmbagent_batch.watchdog", f"{grace:g}"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                pass_fds=tuple(keep_fds), close_fds=True)
        except OSError as exc:  # say, a process limit on a login node: the run goes on, unwatched
            print(f"cmbagent-batch: warning: cannot start the watchdog ({exc.strerror or exc}): tasks will not "
                  "be ended if this process is killed", file=sys.stderr)
            return
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        self._broken = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def usable(self) -> bool:
        return not self._broken

    def track(self, pgid: int) -> None:
        self.tracking += 1
        self._send(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        self.tracking -= 1
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        if self._broken:
            return
        try:
            os.write(self._fd, line)  # shorter than PIPE_BUF: one write, whole, whatever thread writes
        except OSError:
            self._broken = True  # it is gone (killed by hand): tasks go on, unwatched
            print(f"cmbagent-batch: warning: the watchdog (pid {self.pid}) is gone: tasks of this "
                  "process will not be ended if it is killed", file=sys.stderr)

    def close(self) -> bool:
        """This process is ending normally: the watchdog ends what is still tracked and exits. True when
        something was still tracked: then a lock it shares must stay held (closed, not unlocked) until it
        has ended that and exits."""
        global _current
        ending = self.tracking > 0
        with _lock:
            if _current is self:
                _current = None
        self._broken = True
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        return ending


_lock = threading.Lock()
_current: Watchdog | None = None


def start(grace: float, keep_fds: Sequence[int] = ()) -> Watchdog:
    """Start this process's watchdog, or return the one running (a closed or broken one is replaced).
    ``keep_fds``: descriptors it keeps open until it is done (a lock it then holds too)."""
    global _current
    with _lock:
        if _current is None or not _current.usable:
            _current = Watchdog(grace, keep_fds)
        return _current


def track(pgid: int) -> None:
    """Have this process's watchdog (started now if there is none) end the group ``pgid`` if this process
    dies before it is ``untrack``ed."""
    watchdog = _current or start(5.0)
    watchdog.track(pgid)


def untrack(pgid: int) -> None:
    if _current is not None:
        _current.untrack(pgid)


# --- the watchdog process --------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _ours(groups: dict[int, int]) -> dict[int, int]:
    """The groups whose id was not reused: their leader is the process registered (same start time), or
    gone (then the id cannot have been reused while a process of the group lives)."""
    out = {}
    for pgid, started in groups.items():
        now = _start_time(pgid)
        if now is None or started < 0 or now == started:
            out[pgid] = started
    return out


def live_groups(groups: Collection[int]) -> set[int]:
    """The process groups among ``groups`` with a live process: not a zombie, which only waits for its
    parent (all of them where there is no /proc to tell)."""
    if not os.path.isdir("/proc"):
        return set(groups)
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # state, ppid, pgrp, ... (the name may hold spaces)
        if int(fields[2]) in groups and fields[0] not in (b"Z", b"X"):
            out.add(int(fields[2]))
    return out


def _end(groups: dict[int, int], grace: float) -> None:
    """SIGTERM (and SIGCONT) every group, then SIGKILL what is left of them after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    first = True
    groups = _ours(groups)
    while True:
        members = live_groups(groups)
        if not members:
            return
        late = time.monotonic() >= deadline
        for pgid in members:
            for sig in ((signal.SIGKILL,) if late else (signal.SIGTERM, signal.SIGCONT) if first else ()):
                try:
                    os.killpg(pgid, sig)
                except OSError:
                    pass
        if late:
            return
        first = False
        time.sleep(_POLL_S)


def main(argv: Sequence[str]) -> int:
    grace = float(argv[0]) if argv else 5.0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # it follows its pipe, not the signals sent to the runner
    groups: dict[int, int] = {}  # pgid -> its leader's start time (-1: unknown, it was gone already)
    parent = os.getppid()
    pending = b""
    while os.getppid() == parent:  # a parent gone: the pipe may still be held by a task's fork
        try:
            ready, _, _ = select.select([0], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"+"):
                pgid = int(line[1:])
                started = _start_time(pgid)
                groups[pgid] = -1 if started is None else started
            elif line.startswith(b"-"):
                groups.pop(int(line[1:]), None)
    if groups:
        _end(groups, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
