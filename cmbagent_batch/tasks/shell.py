"""Run one attempt of a shell task: ``bash -c`` in its own process group, killed as a whole on timeout.

Every running group is in a registry so ``terminate_all`` can stop them (Ctrl-C, SIGTERM, walltime,
fail-fast). Stopping a group means SIGTERM (and SIGCONT, so stopped processes see it), then SIGKILL
after a grace period to whatever in the group is still alive. Processes a script leaves running in the
background when it exits are stopped the same way: nothing a task started outlives it, except what
leaves the group on purpose (``setsid``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from cmbagent_batch import watchdog
from cmbagent_batch.attempt import Outcome, Payload, TaskContext
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS
from cmbagent_batch.states import OutcomeReason

if TYPE_CHECKING:  # not imported at run time: agent and worker processes load this module, not the spec
    from cmbagent_batch.spec.model import TaskPath

_POLL_S = 0.05


class _Group:
    """One running process group; its id is the pid of its leader, bash (``start_new_session``)."""

    __slots__ = ("closed", "pgid", "reason")

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.reason: str | None = None  # "timeout" or "terminated" once someone decided to stop it
        self.closed = False  # leader reaped and group empty: the id may be reused, never signal it


_lock = threading.Lock()
_running: dict[int, _Group] = {}
_terminations = 0  # bumped by terminate_all; a task registered just after a snapshot it missed stops itself


def interpreter_first(path: str | None, directory: str) -> str:
    """The value ``PATH`` (None: unset, the system default) with ``directory`` first; unchanged when it
    already is (other places of ``directory`` in it stay, so nothing given is lost). Pure."""
    current = os.defpath if path is None else path
    first = current.split(os.pathsep, 1)[0]
    if first and os.path.normpath(first) == os.path.normpath(directory):
        return current
    return directory + os.pathsep + current if current else directory


def use_task_path(rule: TaskPath, environ: MutableMapping[str, str] = os.environ,
                  executable: str = sys.executable) -> None:
    """Give this runner's ``PATH`` the form ``rule`` (``execution.path``) asks of the tasks, once, before
    anything starts: shell and agent tasks, python tasks' worker processes and what they start all
    inherit it, on every rank. ``interpreter`` puts the directory of ``executable`` first, as the runner
    was started (a virtual environment's ``bin/python`` is a symlink to the system python: not resolved,
    or the task's ``python`` would be the system one); ``inherit`` leaves ``PATH`` as it is, and so does
    an interpreter whose path Python does not know (``sys.executable`` empty)."""
    from cmbagent_batch.spec.model import TaskPath

    if rule is TaskPath.INTERPRETER and executable:
        environ["PATH"] = interpreter_first(environ.get("PATH"), os.path.dirname(os.path.abspath(executable)))


def task_environment(ctx: TaskContext, payload: Payload, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus the CMBAGENT_* variables of this attempt plus the task's own ``env`` (which wins, whole:
    ``env: {PATH: ...}`` replaces ``PATH``; ``$PATH`` in it is not expanded)."""
    env = dict(base)
    env.update(
        CMBAGENT_TASK_ID=ctx.task_id,
        CMBAGENT_TASK_DIR=ctx.work_dir,
        CMBAGENT_RUN_DIR=ctx.run_dir,
        CMBAGENT_RANK=str(ctx.rank),
        CMBAGENT_ATTEMPT=str(ctx.attempt),
        CMBAGENT_HOST=ctx.host,
    )
    for name, value in ctx.matrix.items():
        env[f"CMBAGENT_MATRIX_{name.upper()}"] = _env_text(value)
    env.update({k: str(v) for k, v in payload.env.items()})
    env.update(ctx.launch)  # after the task's env: two tasks running at once never share a GPU
    return env


def terminations() -> int:
    """How many times ``terminate_all`` ran: an attempt that saw a lower count must not start."""
    with _lock:
        return _terminations


@functools.lru_cache(maxsize=8)
def _bash(search: str) -> str | None:
    return shutil.which("bash", path=search)


def run_shell(payload: Payload, ctx: TaskContext, base_env: Mapping[str, str], kill_grace: float = 5.0,
              seen: int | None = None) -> Outcome:
    """Run ``payload.run`` with bash in the work directory; never raises for the script's failures.

    ``seen``: what ``terminations()`` said when the attempt began (default: now); if the runner
    terminated tasks since, bash is not started.

    stdout and stderr are appended to ``logs/stdout.log`` and ``logs/stderr.log`` after a line
    ``# attempt N``. CPU time and peak RSS come from ``wait4``: they cover bash and the descendants it
    waited for; peak RSS is that of the largest single process.
    """
    ready = ShellLaunch.prepare(payload, ctx, base_env, seen)
    if isinstance(ready, Outcome):
        return ready
    return ready.wait(ready.spawn(), kill_grace)


Spawned = tuple[subprocess.Popen[bytes], float]  # the process and when it was started (perf_counter)


class ShellLaunch:
    """A shell attempt ready to start: environment, bash and open log files. ``prepare`` does the file
    work, so that it can happen before the attempt waits for its slot; ``spawn`` starts bash (on any
    thread); ``wait`` supervises it to the end (on the attempt's own thread)."""

    def __init__(self, payload: Payload, ctx: TaskContext, argv: list[str], env: dict[str, str], out: Any,
                 err: Any, seen: int) -> None:
        self.payload, self.ctx, self.argv, self.env, self.out, self.err = payload, ctx, argv, env, out, err
        self.seen = seen

    @classmethod
    def prepare(cls, payload: Payload, ctx: TaskContext, base_env: Mapping[str, str],
                seen: int | None = None, argv: list[str] | None = None) -> ShellLaunch | Outcome:
        """``argv``: run this program instead of ``bash -c payload.run`` (agent tasks), supervised alike."""
        env = task_environment(ctx, payload, base_env)
        if argv is None:
            if not payload.run:
                return Outcome(ok=False, error="shell task has no 'run' command")
            search = env.get("PATH", os.defpath)
            bash = _bash(search)
            if bash is None:
                return Outcome(ok=False, error=f"bash not found on PATH ({search})")
            argv = [bash, "-c", payload.run]
        with contextlib.ExitStack() as stack:
            try:
                try:
                    out = stack.enter_context(open(os.path.join(ctx.logs_dir, "stdout.log"), "ab", buffering=0))
                except FileNotFoundError:  # logs/ is made with the work directory, unless called alone
                    os.makedirs(ctx.logs_dir, exist_ok=True)
                    out = stack.enter_context(open(os.path.join(ctx.logs_dir, "stdout.log"), "ab", buffering=0))
                err = stack.enter_context(open(os.path.join(ctx.logs_dir, "stderr.log"), "ab", buffering=0))
                for log in (out, err):
                    log.write(f"# attempt {ctx.attempt}\n".encode())
            except OSError as exc:
                full = OutcomeReason.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else None
                return Outcome(ok=False, error=f"cannot write the logs in {ctx.logs_dir}: {exc.strerror or exc}",
                               reason=full)
            stack.pop_all()
        return cls(payload, ctx, argv, env, out, err, terminations() if seen is None else seen)

    def close(self) -> None:
        self.out.close()
        self.err.close()

    def spawn(self) -> Spawned | Outcome:
        """Start bash (unless the runner terminated tasks since the attempt began)."""
        with _lock:
            if self.seen != _terminations:
                self.close()
                return Outcome.because(OutcomeReason.NOT_STARTED)
        started = time.perf_counter()
        try:
            proc = subprocess.Popen(self.argv, cwd=self.ctx.work_dir, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                    start_new_session=True)
        except OSError as exc:
            self.close()
            name = os.path.basename(self.argv[0])
            return Outcome(ok=False, error=f"cannot start {name} in {self.ctx.work_dir}: {exc.strerror or exc}")
        return proc, started

    def wait(self, spawned: Spawned | Outcome, kill_grace: float = 5.0) -> Outcome:
        """Supervise what ``spawn`` started to its end (the log files are closed once it is registered)."""
        if isinstance(spawned, Outcome):
            return spawned
        proc, started = spawned
        return _supervise(proc, self.payload.timeout, kill_grace, self.seen, started, self.close)


def terminate_all(grace: float) -> int:
    """Stop every running shell task's process group (TERM, then KILL after ``grace`` s); return how many.

    Blocks until the groups are gone or KILLed. Their attempts end with error ``terminated by the runner``.
    """
    global _terminations
    with _lock:
        _terminations += 1
        groups = [g for g in _running.values() if not g.closed]
        for g in groups:
            g.reason = g.reason or "terminated"
    _stop(groups, grace)
    return len(groups)


# -- supervision -----------------------------------------------------------------------------------


def _supervise(proc: subprocess.Popen[bytes], timeout: float | None, grace: float, seen: int,
               started: float, registered: Callable[[], None]) -> Outcome:
    group = _Group(proc.pid)
    watchdog.track(group.pgid)  # ended by the watchdog if this process dies first
    with _lock:
        _running[group.pgid] = group
        if _terminations != seen:  # terminate_all ran between our Popen and this registration
            group.reason = "terminated"
            threading.Thread(target=_stop, args=([group], grace), daemon=True).start()
    registered()
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, _expire, (group, grace))
        timer.daemon = True
        timer.start()
    try:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:  # someone else reaped it (SIGCHLD ignored, os.wait elsewhere)
            proc.returncode = -1
            return Outcome(ok=False, error=f"lost track of bash (pid {proc.pid}): it was reaped elsewhere")
        finally:
            if timer is not None:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if _alive({group.pgid}):  # left in the background by the script
            _stop([group], grace)
    finally:
        with _lock:
            group.closed = True
            del _running[group.pgid]
        watchdog.untrack(group.pgid)
    code = proc.returncode
    rss_unit = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    reason: OutcomeReason | None = None
    if group.reason == "timeout":
        error: str | None = f"timed out after {timeout:g} s (process group killed)"
    elif group.reason == "terminated" and code != 0:  # a script that ended 0 before the stop reached it did its work
        reason = OutcomeReason.TERMINATED_BY_RUNNER
        error = reason.message
    elif code > 0:
        error = f"exit code {code}"
    elif code < 0:
        error = f"killed by signal {-code} ({_signal_name(-code)})"
    else:
        error = None
    return Outcome(ok=error is None, error=error, exit_code=code, timed_out=group.reason == "timeout", wall_s=wall,
                   reason=reason, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / rss_unit)


def _expire(group: _Group, grace: float) -> None:
    with _lock:
        if group.reason is not None or group.closed:
            return  # already being stopped, or already over
        group.reason = "timeout"
    _stop([group], grace)


def _stop(groups: list[_Group], grace: float) -> None:
    """TERM the groups, wait up to ``grace`` s for them to empty, KILL whatever is still alive."""
    for g in groups:
        _signal(g, signal.SIGTERM)
        _signal(g, signal.SIGCONT)
    deadline = time.monotonic() + grace
    left = groups
    while True:
        live = _alive({g.pgid for g in left if not g.closed})
        left = [g for g in left if g.pgid in live]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    for g in left:
        _signal(g, signal.SIGKILL)


def _signal(group: _Group, sig: int) -> None:
    with _lock:
        if group.closed:
            return
        try:
            os.killpg(group.pgid, sig)
        except ProcessLookupError:
            pass


def _alive(pgids: set[int]) -> set[int]:
    """The groups among ``pgids`` with a process that is not a zombie (zombies wait for their parent)."""
    live = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
            live.add(pgid)
        except ProcessLookupError:
            pass
        except PermissionError:
            live.add(pgid)
    return watchdog.live_groups(live) if live else live


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)
