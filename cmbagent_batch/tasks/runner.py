"""One attempt of one task, start to finish, on whatever worker runs it.

A top-level, picklable function (it may run in a process-pool worker): prepare the work directory, link
the inputs, wait at the gate for a slot (thread pools), run the task, give the slot back, publish its
outputs, apply retention and measure what is left. It never raises for a task's own failure; it returns
an ``Outcome`` that says what went wrong.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Collection, Sequence
from typing import Any

from cmbagent_batch.attempt import WORK_SUBDIRS, Attempt, Gate, Outcome, Payload, Stopped, TaskContext
from cmbagent_batch.rundir.jsonl import DISK_FULL_ERRNOS
from cmbagent_batch.rundir.layout import Layout
from cmbagent_batch.states import OutcomeReason
from cmbagent_batch.tasks.agent import launch as agent
from cmbagent_batch.tasks.python import run_python
from cmbagent_batch.tasks.returns import ARRAYS_DIR
from cmbagent_batch.tasks.shell import ShellLaunch, terminations
from cmbagent_batch.tasks.workdir import (
    OutputError,
    cleanup,
    existing_outputs,
    make_work_dir,
    prepare,
    publish,
    stage_inputs,
    tree_size,
)

# Subdirectories made before a task starts; the rest are made when used (python: ctx.sub(name), shell:
# mkdir -p). On a journaled or network file system each mkdir (and the rmdir of an unused temp/ after
# success) costs 0.02 to 0.2 ms, as much as the runner's own work for a tiny task.
#
# The work directory itself is made before every attempt. A python task in a worker process runs with
# it as cwd, so it must exist before the call, and whether the call writes there cannot be known before.
# After a success that left nothing in it (``cleanup``), the empty directory is set aside as a spare and
# renamed into place for the next task (``workdir.remove_if_empty``), so no directory of a task that
# wrote nothing outlives the run. The shards' directories are made by their first task and stay until
# the run ends (``Layout.remove_empty_shards``): removing one with its last task would cost two more
# operations per task, as a shard rarely holds two running tasks.
SUBDIRS_UP_FRONT = {"shell": ("logs",), "python": ()}


def run_attempt(attempt: Attempt, gate: Gate | None = None, made: bool = False) -> Outcome:
    """Run ``attempt`` to its end; ``gate``: where it waits for a slot (this process's, not part of the
    attempt); ``made``: its work directory was just made (``run_attempts``)."""
    try:
        return _attempt(attempt, gate, made)
    finally:
        if gate is not None:
            gate.withdraw()  # if it never entered: attempts handed over after it need not wait for it


def run_attempts(attempts: Sequence[Attempt]) -> list[Outcome]:
    """A batch of attempts (tiny tasks, one worker), one after the other, their work directories made in
    one burst first (``make_work_dirs``)."""
    made = make_work_dirs(attempts)
    return [run_attempt(a, None, a.ctx.work_dir in made) for a in attempts]


def make_work_dirs(attempts: Sequence[Attempt]) -> set[str]:
    """Make the work directories of a batch in one burst; return those made. Two workers making
    directories in the same ``tasks/`` directory at the same time slow each other down (the directory's
    lock); bursts rarely meet, steady streams always do."""
    made: set[str] = set()
    for a in attempts:
        try:
            make_work_dir(a.ctx)
            made.add(a.ctx.work_dir)
        except OSError:
            pass  # exists (a rerun) or cannot be made: the attempt itself finds out and says so
    return made


def _attempt(attempt: Attempt, gate: Gate | None, made: bool) -> Outcome:
    if attempt.missing:
        return Outcome(ok=False, error="; ".join(attempt.missing))
    payload, ctx, base_env = attempt.payload, attempt.ctx, attempt.env
    seen = terminations()  # a stop while this attempt waits at the gate keeps it from starting
    try:
        # an empty directory (one left by an earlier attempt or run is set aside), then this attempt's inputs
        prepare(ctx, SUBDIRS_UP_FRONT.get(payload.kind, WORK_SUBDIRS), made)
        stage_inputs(ctx, attempt.links)
    except (OSError, ValueError) as exc:
        return _failed(f"cannot prepare the work directory {ctx.work_dir}", exc)
    ready: ShellLaunch | Outcome | None = None
    if payload.kind == "shell":
        ready = ShellLaunch.prepare(payload, ctx, base_env, seen)
    elif payload.kind == "agent":
        ready = agent.prepare(payload, ctx, base_env, seen)
    if isinstance(ready, Outcome):
        return ready
    try:
        spawned = _start(ready, gate)
        outcome, outputs, found = _run(payload, ctx, attempt.chdir, attempt.kill_grace, ready, spawned, gate)
        return _wrap_up(ctx, attempt.keep, outcome, outputs, found)
    except Stopped as exc:
        return Outcome.because(exc.reason)
    except OutputError as exc:  # an output removed between the check and publish
        return Outcome(ok=False, error=str(exc))
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            return _failed(f"cannot publish the outputs of {ctx.task_id}", exc)
        return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    except Exception as exc:  # noqa: BLE001 - a bug or an OS error on the worker: report it with its place
        return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def _failed(what: str, exc: Exception) -> Outcome:
    """An attempt the runner could not prepare or wrap up; a full file system says so (the run stops)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return Outcome(ok=False, error=f"{what}: {exc.strerror}{where}", reason=OutcomeReason.DISK_FULL)
    return Outcome(ok=False, error=f"{what}: {exc}")


def _start(ready: ShellLaunch | None, gate: Gate | None) -> Any:
    """Wait for a slot, if there is a gate, and start bash for a shell task (the thread that frees the
    slot may do it for us). The log files are closed if bash does not start."""
    spawn = ready.spawn if ready is not None else None
    try:
        if gate is not None:
            return gate.enter(spawn)
        return spawn() if spawn is not None else None
    except BaseException:
        if ready is not None:
            ready.close()
        raise


def _run(payload: Payload, ctx: TaskContext, chdir: bool, kill_grace: float, ready: ShellLaunch | None,
         spawned: Any, gate: Gate | None) -> tuple[Outcome, list[str], list[str]]:
    """Run the task to its end and check its declared outputs, then give the slot back; return the
    outcome, the outputs to publish (the return value's file included) and the paths they matched."""
    outputs = list(payload.outputs)
    ok = False
    try:
        if ready is not None:
            outcome = ready.wait(spawned, kill_grace)
            if payload.kind == "agent":
                outcome = agent.finish(outcome, ctx, payload.agent["model"] if payload.agent else {})
        else:
            outcome = run_python(payload, ctx, chdir)
        if not outcome.ok:
            return outcome, outputs, []
        if outcome.result_file:  # the return value is published with the declared outputs, at the top
            outputs += _return_files(outcome.result_file, ctx.work_dir, outputs)
        found = existing_outputs(ctx.work_dir, outputs)  # a missing output fails it before its slot is free
        ok = True
        return outcome, outputs, found
    except OutputError as exc:
        return dataclasses.replace(outcome, ok=False, error=str(exc)), outputs, []
    finally:
        if gate is not None:
            gate.leave(ok)


def _full(path: str) -> bool:
    """Whether the file system holding ``path`` is full: less than 1 MiB, or 1% of it, left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < min(1 << 20, st.f_blocks * st.f_frsize // 100)


def _return_files(result_file: str, work_dir: str, declared: list[str]) -> list[str]:
    """``return.json`` (``RUN_DIR/outputs/S/TASK/return.json`` once published) and the directory of its large
    arrays if it has one; not again if the task declares them as outputs too."""
    files = [os.path.relpath(result_file, work_dir)]
    if os.path.isdir(os.path.join(work_dir, ARRAYS_DIR)):
        files.append(ARRAYS_DIR)
    return [f for f in files if f not in declared]


def _wrap_up(ctx: TaskContext, keep: Collection[str], outcome: Outcome, outputs: list[str],
             found: list[str]) -> Outcome:
    """Publish a success's outputs and apply retention; measure what is left in either case, and say where
    (``Outcome.work_dir``, for run.json)."""
    if not outcome.ok:
        if outcome.reason is None and _full(ctx.work_dir):  # say, a script's write failed: not its own fault
            outcome = dataclasses.replace(outcome, reason=OutcomeReason.DISK_FULL,
                                          error=f"{outcome.error} (its file system is full)")
        return dataclasses.replace(outcome, work_bytes=tree_size(ctx.work_dir), work_dir=ctx.work_dir)
    published = Layout(ctx.run_dir, ctx.sharding).published(ctx.task_id)
    output_bytes = 0
    if outputs or os.path.lexists(published):  # an earlier run's outputs get superseded
        publish(ctx, outputs, found)
        output_bytes = tree_size(published)
    return dataclasses.replace(outcome, work_bytes=cleanup(ctx, keep), output_bytes=output_bytes, work_dir=ctx.work_dir)
