"""Run one attempt of a python task: import ``module:function``, call it, write its return value as JSON
(``return.json`` in the work directory; the conversion rules are in ``tasks/returns.py``).

Two modes, chosen by the scheduler through ``chdir``:

* process mode (``chdir=True``, one task per worker process at a time): the call runs with the work
  directory as cwd and the CMBAGENT_* variables (and the task's ``env``) in ``os.environ``; the cwd is
  restored afterwards, the variables when the worker's next task does not set them, and whatever the
  task itself changed in ``os.environ`` right after it. CPU time and peak
  RSS are the worker process's. ``payload.timeout`` is enforced with SIGALRM (the worker runs the call
  in its main thread): the call is interrupted the next time the interpreter runs Python code, so a
  long C call (one numpy operation) finishes first.
* thread mode (``chdir=False``): cwd and ``os.environ`` are shared by every thread of the scheduler
  process, so they are left alone; a callable finds its directory in ``ctx.work_dir`` (declare a
  ``ctx`` parameter). CPU time is this thread's; peak RSS is not measurable (0.0). A thread cannot be
  stopped: ``payload.timeout`` is not enforced here.

**Ranks.** A call placed inside a Slurm allocation starts its ranks as job steps (``subprocess`` and
``$CMBAGENT_LAUNCH``, from ``os.environ`` in process mode, from ``ctx.launch`` in thread mode). Their ids,
noted by each step's rank 0, are in the outcome (``Outcome.steps``), as for shell tasks. In process mode
a call interrupted at its timeout has its steps ended on every node before the attempt ends:
``scancel --signal=TERM``, then a plain ``scancel`` to those squeue still lists after ``kill_grace``
(``tasks.shell.end_steps``); the error says so (``timed out after 3 s (python call interrupted; job step
265.4 ended on every node)``). When its worker process is killed instead (a stop, a call that never
returned to Python, a crash), ``backends.processes`` ends them. In thread mode the timeout is not
enforced, so the steps run on; a stop ends them all the same (``tasks.shell.stopped_with_runner``): the
call's ``srun`` then returns, and a call that fails after it ends "terminated by the runner". A call in a
thread finds its launch in ``ctx.launch``, with ``CMBAGENT_TASK_DIR`` (``os.environ`` has neither), and
passes them to its ranks (``env={**os.environ, **dict(ctx.launch)}``); without ``CMBAGENT_TASK_DIR`` its
steps cannot note their ids, and its end names only those a stop ended. A ``squeue``
or ``scancel`` that fails is a warning in the error and in ``logs/stderr.log``.

``run_python`` never raises: every failure, including a failed import, is an ``Outcome``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from cmbagent_batch.attempt import Outcome, Payload, TaskContext
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.returns import encode
from cmbagent_batch.tasks.shell import (
    end_steps,
    log_step_problems,
    placed_steps,
    steps_ended,
    stopped_with_runner,
    task_environment,
    with_step_problems,
)

if TYPE_CHECKING:  # imported only by a task placed inside a Slurm allocation
    from cmbagent_batch.place.launch import TaskSteps

RETURN_FILE = "return.json"  # in the work directory; published as RUN_DIR/outputs/TASK/return.json
_CALL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_path_lock = threading.Lock()


class _Failed(Exception):
    """An attempt failed: ``error`` is the one-line reason, ``trace`` the worker traceback (if any)."""

    def __init__(self, error: str, trace: str | None = None, timed_out: bool = False,
                 reason: OutcomeReason | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.trace = trace
        self.timed_out = timed_out
        self.reason = reason


class _Timeout(BaseException):
    """Raised into the call by SIGALRM; a BaseException so ``except Exception`` in user code lets it through."""


def run_python(payload: Payload, ctx: TaskContext, chdir: bool, kill_grace: float = 5.0) -> Outcome:
    """Call ``payload.call`` with ``payload.args`` (and ``ctx=`` if it takes ``ctx``); see the module doc.

    The return value goes to ``return.json`` in the work directory (``Outcome.result_file``), converted
    to JSON as ``tasks/returns.py`` says; nothing is written for None. ``kill_grace``: how long the job
    steps of a call interrupted at its timeout have between SIGTERM and their cancel.
    """
    started = time.perf_counter()
    cpu_before = _cpu(chdir)
    result_file = error = trace = reason = None
    timed_out = False
    steps = _task_steps(payload, ctx)
    with stopped_with_runner(steps) if steps is not None and not chdir else contextlib.nullcontext() as stop:
        try:
            result_file = _attempt(payload, ctx, chdir, steps, kill_grace)
        except _Failed as failed:
            error, trace, timed_out, reason = failed.error, failed.trace, failed.timed_out, failed.reason
        except BaseException as exc:  # noqa: BLE001 - a fault of this runner: still an Outcome, never an exception
            error, trace = f"python runner failed: {_one_line(exc)}", _format(exc)
    step_ids: tuple[str, ...] = ()
    if steps is not None:
        step_ids = steps.finish()
        if timed_out:
            error = _timed_out(payload.timeout, steps_ended(steps, step_ids))
        elif stop is not None and stop.reason == "terminated" and error is not None:
            reason = OutcomeReason.TERMINATED_BY_RUNNER
            error = reason.message
        error = with_step_problems(error, steps)
        log_step_problems(steps, ctx.logs_dir)
    return Outcome(ok=error is None, error=error, traceback=trace, timed_out=timed_out,
                   wall_s=time.perf_counter() - started, cpu_s=_cpu(chdir) - cpu_before,
                   peak_rss_mb=_peak_rss_mb() if chdir else 0.0, result_file=result_file, reason=reason,
                   steps=step_ids)


def _task_steps(payload: Payload, ctx: TaskContext) -> TaskSteps | None:
    """The job steps the call's ``$CMBAGENT_LAUNCH`` starts (None: it starts none), their notes emptied in
    its ``logs`` directory, made for them (``step-note.sh`` appends there)."""
    steps = placed_steps(ctx, payload)
    if steps is not None:
        with contextlib.suppress(OSError):  # then begin says it cannot empty the notes
            os.makedirs(ctx.logs_dir, exist_ok=True)
        steps.begin()
    return steps


def _in_thread(ctx: TaskContext) -> TaskContext:
    """The context a call in a thread gets: a placed one's ``launch`` also holds ``CMBAGENT_TASK_DIR``, so
    that ``env={**os.environ, **dict(ctx.launch)}`` is all its ranks need (each step's rank 0 notes its id
    there)."""
    if not ctx.launch:
        return ctx
    return dataclasses.replace(ctx, launch=(*ctx.launch, ("CMBAGENT_TASK_DIR", ctx.work_dir)))


def _timed_out(timeout: float | None, ended: str = "") -> str:
    return f"timed out after {timeout or 0:g} s (python call interrupted{ended})"


def _attempt(payload: Payload, ctx: TaskContext, chdir: bool, steps: TaskSteps | None = None,
             kill_grace: float = 5.0) -> str | None:
    timeout = payload.timeout if chdir else None
    with _inside(ctx, payload) if chdir else contextlib.nullcontext():
        try:
            with _alarm(timeout):  # the import counts: a module may compute a lot when imported
                function = _load(payload.call, payload.python_path)
                args, kwargs = _arguments(function, payload.args, ctx if chdir else _in_thread(ctx))
                try:
                    value = function(*args, **kwargs)
                except _Timeout:
                    raise
                except BaseException as exc:  # noqa: BLE001 - user code; SystemExit, KeyboardInterrupt too: the task failed, not the worker
                    raise _Failed(_one_line(exc), _format(exc)) from None
        except _Timeout as exc:
            if steps is not None:  # ended on every node before the task's environment (its PATH) is left
                end_steps([steps], kill_grace)
            raise _Failed(_timed_out(timeout), _format(exc), True) from None
    if value is None:  # nothing returned: no file (10^4 tiny tasks should not cost 10^4 files)
        return None
    return _write_return(value, ctx)


_watcher: Callable[[float], None] | None = None


def watch_timeouts(watcher: Callable[[float], None] | None) -> None:
    """Tell ``watcher`` when each call with a timeout is due to end (on the monotonic clock, which every
    process shares), and 0.0 once it has: a worker process's parent kills a call that never returns to
    Python, which SIGALRM cannot interrupt."""
    global _watcher
    _watcher = watcher


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise ``_Timeout`` in the call after ``seconds`` (only the main thread can receive signals)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    if _watcher is not None:
        _watcher(time.monotonic() + seconds)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if _watcher is not None:
            _watcher(0.0)


def _load(call: str | None, python_path: tuple[str, ...]) -> Callable[..., Any]:
    if not call or not _CALL.fullmatch(call):
        raise _Failed(f"bad call {call!r}: expected 'module:function'")
    module_name, name = call.split(":")
    with _path_lock:  # prepend once per process, keeping the given order
        for entry in reversed(python_path):
            if not os.path.isabs(entry):
                entry = os.path.abspath(entry)
            if entry not in sys.path:
                sys.path.insert(0, entry)
    # No bytecode is written for the task's code: a .pyc is trusted by its source's modification time to the
    # second and its size, so an edit made within the second of a run (2 * x -> 3 * x) would rerun old code.
    sys.dont_write_bytecode = True
    try:
        module = importlib.import_module(module_name)
    except _Timeout:
        raise
    except ImportError as exc:
        raise _Failed(f"cannot import {call!r}: {exc}", _format(exc)) from None
    except BaseException as exc:  # noqa: BLE001 - the user's module raised while being imported (SyntaxError, SystemExit...)
        raise _Failed(f"cannot import {call!r}: {_one_line(exc)}", _format(exc)) from None
    try:
        function = getattr(module, name)
    except AttributeError:
        raise _Failed(f"cannot import {call!r}: module {module_name!r} has no attribute {name!r}") from None
    if not callable(function):
        kind = type(function).__name__
        raise _Failed(f"cannot import {call!r}: {module_name}.{name} is not callable (it is of type {kind!r})")
    return function  # type: ignore[no-any-return]


def _arguments(function: Callable[..., Any], args: Any, ctx: TaskContext) -> tuple[list[Any], dict[str, Any]]:
    args = _thaw(args)
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    if isinstance(args, dict):
        keywords = args
    elif isinstance(args, list):
        positional = args
    elif args is not None:
        raise _Failed(f"args must be a mapping, a list or null, not {type(args).__name__!r}")
    if _takes_ctx(function):
        if "ctx" in keywords:
            raise _Failed("args has a key 'ctx', which is reserved for the task context")
        keywords["ctx"] = ctx
    return positional, keywords


def _takes_ctx(function: Callable[..., Any]) -> bool:
    try:
        parameter = _ctx_parameter(function)
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


# Process mode: the worker's own values of the variables tasks have set, restored when a later task
# does not set them. A variable the next task sets anyway is not restored in between (10^4 tiny tasks
# in a row change only CMBAGENT_TASK_ID and CMBAGENT_TASK_DIR).
_original_env: dict[str, str | None] = {}
_home: str | None = None


def _apply_environment(overlay: dict[str, str]) -> None:
    environ = os.environ
    for name in [n for n in _original_env if n not in overlay]:
        value = _original_env.pop(name)
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    for name, value in overlay.items():
        if name not in _original_env:
            _original_env[name] = environ.get(name)
        if environ.get(name) != value:
            environ[name] = value


@contextlib.contextmanager
def _inside(ctx: TaskContext, payload: Payload) -> Iterator[None]:
    """Process mode: cwd = work dir and the task's environment (the cwd is restored on the way out)."""
    global _home
    previous = _home = _home or os.getcwd()  # a worker's cwd between tasks never changes
    try:
        os.chdir(ctx.work_dir)
    except OSError as exc:
        raise _Failed(f"cannot enter the work directory {ctx.work_dir}: {exc.strerror or exc}") from None
    _apply_environment(task_environment(ctx, payload, {}))
    as_set = _environment()
    out, err = _LazyLog(ctx, "stdout.log"), _LazyLog(ctx, "stderr.log")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.close()
        err.close()
        os.chdir(previous)
        if _environment() != as_set:  # the task changed os.environ itself: the next task must not see it
            _restore_environment(as_set)


def _environment() -> dict[Any, Any]:
    """A snapshot of ``os.environ``, cheap enough for every task (its raw mapping, where CPython has one)."""
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _restore_environment(snapshot: dict[Any, Any]) -> None:
    decode = os.fsdecode if isinstance(getattr(os.environ, "_data", None), dict) else str
    wanted = {decode(k): decode(v) for k, v in snapshot.items()}
    for name in [n for n in os.environ if n not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


class _LazyLog:
    """What a python task prints, appended to logs/NAME; the file is created on the first write only
    (most tasks print nothing, and 10^4 tiny tasks should not cost 2 * 10^4 files)."""

    def __init__(self, ctx: TaskContext, name: str) -> None:
        self._path = os.path.join(ctx.logs_dir, name)
        self._attempt = ctx.attempt
        self._fh: TextIO | None = None

    def write(self, text: str) -> int:
        if self._fh is None:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            # open for the attempt's whole length, across many writes
            self._fh = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self._fh.write(f"# attempt {self._attempt}\n")
        return self._fh.write(text)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _write_return(value: Any, ctx: TaskContext) -> str:
    """Write ``value`` as ``return.json`` in the work directory, by the rules of ``tasks/returns.py``;
    what those rules changed (NaN, a repr...) is appended to ``logs/stderr.log``. Fails only on an OS error."""
    path = os.path.join(ctx.work_dir, RETURN_FILE)
    try:
        text, notes = encode(value, ctx.work_dir)
        # Written in place: the work directory is this attempt's own, and only a successful attempt's files
        # are published (atomically), so a torn file here is never read as a result. O_NOFOLLOW: a staged
        # input of the same name is a symlink to another task's published file, replaced, never written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o666)
        except OSError:
            if not os.path.islink(path):
                raise
            os.unlink(path)
            fd = os.open(path, flags, 0o666)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        if notes:
            _log_notes(ctx, notes)
    except OSError as exc:
        full = OutcomeReason.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else None
        raise _Failed(f"cannot write the return value to {exc.filename or path}: {exc.strerror or exc}",
                      reason=full) from None
    return path


def _log_notes(ctx: TaskContext, notes: list[str]) -> None:
    os.makedirs(ctx.logs_dir, exist_ok=True)
    with open(os.path.join(ctx.logs_dir, "stderr.log"), "a", encoding="utf-8") as fh:
        fh.writelines(f"cmbagent-batch: attempt {ctx.attempt}: return value: {note}\n" for note in notes)


def _one_line(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    lines = str(exc).strip().splitlines()
    return f"{name}: {lines[0]}" if lines else name


def _format(exc: BaseException) -> str:
    """The traceback as text (it must survive pickling), without this module's own frame on top."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__ and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _thaw(value: Any) -> Any:
    """Plain dicts and lists from read-only mappings and tuples (frozen spec values)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _cpu(process: bool) -> float:
    if not process:
        return time.thread_time()
    t = os.times()  # one syscall for the process and its waited-for children
    return t.user + t.system + t.children_user + t.children_system


@functools.lru_cache(maxsize=256)
def _ctx_parameter(function: Any) -> Any:
    """The function's ``ctx`` parameter, if any (cached: inspect.signature is slow per call)."""
    return inspect.signature(function).parameters.get("ctx")


def _peak_rss_mb() -> float:
    """The worker process's peak RSS so far (the kernel keeps no per-call figure), or its children's."""
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return peak / unit
