"""Run one attempt of a shell task: ``bash -c`` in its own process group, killed as a whole on timeout.

Every running group is in a registry so ``terminate_all`` can stop them (Ctrl-C, SIGTERM, walltime,
fail-fast). Stopping a group means SIGTERM (and SIGCONT, so stopped processes see it), then SIGKILL
after a grace period to whatever in the group is still alive. Processes a script leaves running in the
background when it exits are stopped the same way: nothing a task started outlives it, except what
leaves the group on purpose (``setsid``). A task placed in a Slurm allocation also has the job steps its
``$CMBAGENT_LAUNCH`` starts ended on every node with its group (``scancel``), and its end names them
(``place.launch.TaskSteps``).

The steps of a python task are ended here too (``end_steps``): it has no process group of its own (its
call runs in a worker process, or in a thread of the runner), so once its steps have had SIGTERM, squeue
tells when they have ended, asked at growing intervals (0.05 s, doubling, at most 1 s) until
``kill_grace`` has passed. A call in a thread registers its steps (``stopped_with_runner``), so that
``terminate_all`` ends them with the shell tasks' groups.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cmbagent_batch import watchdog
from cmbagent_batch.attempt import Outcome, Payload, TaskContext
from cmbagent_batch.gateway.keys import held_names
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS
from cmbagent_batch.states import OutcomeReason

if TYPE_CHECKING:  # not imported at run time: agent and worker processes load this module, not the spec
    from cmbagent_batch.place.launch import TaskSteps

_POLL_S = 0.05
_STEP_POLL_MAX_S = 1.0  # the longest pause between two squeue asking whether a python task's steps have ended


class _Group:
    """One running process group; its id is the pid of its leader, bash (``start_new_session``). Without
    one (``pgid`` None), a python call's job steps alone, whose end squeue tells."""

    __slots__ = ("closed", "pgid", "reason", "steps", "stopped")

    def __init__(self, pgid: int | None, steps: TaskSteps | None = None) -> None:
        self.pgid = pgid
        self.steps = steps  # the Slurm job steps the task started, ended with the group
        self.reason: str | None = None  # "timeout" or "terminated" once someone decided to stop it
        self.closed = False  # leader reaped and group empty: the id may be reused, never signal it
        self.stopped: threading.Event | None = None  # set once a stop took it; set when that stop is done


_lock = threading.Lock()
_running: set[_Group] = set()
_terminations = 0  # bumped by terminate_all; a task registered just after a snapshot it missed stops itself


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
    for name in held_names():  # the models' API keys: the gateway's alone
        env.pop(name, None)
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
        self.steps = task_steps(env)

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
        if self.steps is not None:
            self.steps.begin()
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
        outcome = _supervise(proc, self.payload.timeout, kill_grace, self.seen, started, self.close, self.steps)
        if self.steps is not None:
            log_step_problems(self.steps, self.ctx.logs_dir)
        return outcome


def task_steps(env: Mapping[str, str]) -> TaskSteps | None:
    """The Slurm job steps a task's ``$CMBAGENT_LAUNCH`` starts (None: it starts none, and nothing about Slurm
    is imported)."""
    if "srun" not in env.get("CMBAGENT_LAUNCH", ""):
        return None
    from cmbagent_batch.place.launch import TaskSteps

    return TaskSteps.of(env)


def placed_steps(ctx: TaskContext, payload: Payload) -> TaskSteps | None:
    """The job steps an attempt's ``$CMBAGENT_LAUNCH`` starts, noted in its work directory; None when it is
    not placed (nothing is computed for the many tasks that are not) or its prefix starts none."""
    if not ctx.launch:
        return None
    return task_steps(task_environment(ctx, payload, {}))


def with_step_problems(error: str | None, steps: TaskSteps | None) -> str | None:
    """A failure's ``error`` with what went wrong ending or reading its steps (squeue, scancel) as warnings."""
    if error is None or steps is None or not steps.problems:
        return error
    return error + "".join(f"; warning: {p}" for p in steps.problems)


def log_step_problems(steps: TaskSteps, logs_dir: str) -> None:
    """Say in the task's stderr log what went wrong ending or reading its steps, whatever its outcome."""
    if not steps.problems:
        return
    try:
        with open(os.path.join(logs_dir, "stderr.log"), "a") as log:
            log.writelines(f"cmbagent-batch: warning: {p}\n" for p in steps.problems)
    except OSError:
        pass  # the outcome's error says it


def terminate_all(grace: float) -> int:
    """Stop every running shell task's process group (TERM, then KILL after ``grace`` s); return how many.

    Blocks until the groups are gone or KILLed. Their attempts end with error ``terminated by the runner``.
    """
    global _terminations
    with _lock:
        _terminations += 1
        groups = sorted((g for g in _running if not g.closed), key=lambda g: (g.pgid is None, g.pgid or 0))
        for g in groups:
            g.reason = g.reason or "terminated"
    _stop(groups, grace)
    return len(groups)


# -- supervision -----------------------------------------------------------------------------------


def _supervise(proc: subprocess.Popen[bytes], timeout: float | None, grace: float, seen: int,
               started: float, registered: Callable[[], None], steps: TaskSteps | None = None) -> Outcome:
    group = _Group(proc.pid, steps)
    watchdog.track(proc.pid)  # ended by the watchdog if this process dies first
    with _lock:
        _running.add(group)
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
        if _alive({proc.pid}):  # left in the background by the script
            _stop([group], grace)
    finally:
        with _lock:
            group.closed = True
            _running.discard(group)
        watchdog.untrack(proc.pid)
    code = proc.returncode
    rss_unit = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    reason: OutcomeReason | None = None
    step_ids = steps.finish() if steps is not None else ()
    if group.reason == "timeout":
        error: str | None = f"timed out after {timeout:g} s (process group killed{steps_ended(steps, step_ids)})"
    elif group.reason == "terminated" and code != 0:  # a script that ended 0 before the stop reached it did its work
        reason = OutcomeReason.TERMINATED_BY_RUNNER
        error = reason.message
    elif code > 0:
        error = f"exit code {code}"
    elif code < 0:
        error = f"killed by signal {-code} ({_signal_name(-code)})"
    else:
        error = None
    error = with_step_problems(error, steps)
    return Outcome(ok=error is None, error=error, exit_code=code, timed_out=group.reason == "timeout", wall_s=wall,
                   reason=reason, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / rss_unit,
                   steps=step_ids)


def steps_ended(steps: TaskSteps | None, step_ids: tuple[str, ...]) -> str:
    """``; job step 12.3 ended on every node``: the steps a stop signalled, for its message."""
    ids = [i for i in step_ids if steps is not None and i in steps.ended]
    if not ids:
        return ""
    return f"; job step{'s' if len(ids) > 1 else ''} {', '.join(ids)} ended on every node"


def _expire(group: _Group, grace: float) -> None:
    with _lock:
        if group.reason is not None or group.closed:
            return  # already being stopped, or already over
        group.reason = "timeout"
    _stop([group], grace)


def end_steps(stepped: Sequence[TaskSteps], grace: float, first: Callable[[], None] | None = None) -> None:
    """End job steps of python tasks on every node: ``scancel --signal=TERM``, then, once squeue no longer
    lists them or ``grace`` s have passed, a plain ``scancel`` to those still there. ``first`` is called as
    their ``busy`` locks are held (a stop signalling the worker processes that run their calls)."""
    _stop([_Group(None, steps) for steps in stepped], grace, first)


@contextlib.contextmanager
def stopped_with_runner(steps: TaskSteps) -> Iterator[_Group]:
    """While a python call runs in a thread of the runner, ``terminate_all`` ends its job steps (the call
    itself cannot be stopped); the group's ``reason`` says "terminated" once it did."""
    group = _Group(None, steps)
    with _lock:
        _running.add(group)
    try:
        yield group
    finally:
        with _lock:
            group.closed = True
            _running.discard(group)


def _stop(groups: list[_Group], grace: float, first: Callable[[], None] | None = None) -> None:
    """TERM the groups (and their Slurm job steps, on every node), wait up to ``grace`` s for them to
    empty, KILL whatever is still alive (and cancel the steps still there). A group without processes
    (``pgid`` None) has ended once squeue no longer lists the steps signalled. A group another stop has
    taken (a timeout and a runner's stop at once) is left to it, and waited for: its steps end once."""
    with _lock:
        others = [g.stopped for g in groups if g.stopped is not None]
        groups = [g for g in groups if g.stopped is None]
        for g in groups:
            g.stopped = threading.Event()
    try:
        _stop_taken(groups, grace, first)
    finally:
        for g in groups:
            g.stopped.set()  # type: ignore[union-attr]
    for event in others:
        event.wait()


def _stop_taken(groups: list[_Group], grace: float, first: Callable[[], None] | None) -> None:
    stepped = sorted((g.steps for g in groups if g.steps is not None), key=id)
    with contextlib.ExitStack() as held:
        for steps in stepped:  # their ids are read once this stop is done with them
            held.enter_context(steps.busy)
        if first is not None:
            first()
        for g in groups:
            _signal(g, signal.SIGTERM)
            _signal(g, signal.SIGCONT)
        for steps in stepped:
            steps.end(signal.SIGTERM)
        deadline = time.monotonic() + grace
        left = [g for g in groups if g.pgid is not None]
        listed = [g.steps for g in groups if g.pgid is None and g.steps is not None and g.steps.ended]
        pause, ask_at = _POLL_S, time.monotonic() + _POLL_S
        while True:
            live = _alive({g.pgid for g in left if g.pgid is not None and not g.closed})
            left = [g for g in left if g.pgid in live]
            if listed and time.monotonic() >= ask_at:
                listed = [steps for steps in listed if _still_listed(steps)]
                pause = min(2 * pause, _STEP_POLL_MAX_S)
                ask_at = time.monotonic() + pause
            if (not left and not listed) or time.monotonic() >= deadline:
                break
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        for g in left:
            _signal(g, signal.SIGKILL)
        for steps in stepped:  # srun waits for its step's tasks: a step outlives the group only if they did not end
            steps.end()


def _still_listed(steps: TaskSteps) -> bool:
    """Whether squeue still lists a step signalled; one that cannot be asked counts as listed, and says why."""
    from cmbagent_batch.errors import SlurmError

    try:
        return bool(steps.ended.intersection(steps.step.listed()))
    except SlurmError as exc:
        if str(exc) not in steps.problems:
            steps.problems.append(str(exc))
        return True


def _signal(group: _Group, sig: int) -> None:
    with _lock:
        if group.closed or group.pgid is None:
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
