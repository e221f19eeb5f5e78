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
from cmbagent_batch.tasks.metered import run_metered
from cmbagent_batch.tasks.places import adopt_scratch, carry_logs, take_scratch
from cmbagent_batch.tasks.python import run_python
from cmbagent_batch.tasks.returns import ARRAYS_DIR
from cmbagent_batch.tasks.shell import ShellLaunch, terminations
from cmbagent_batch.tasks.workdir import (
    OutputError,
    cleanup,
    existing_outputs,
    prepare,
    publish,
    stage_inputs,
    tree_size,
)

# Subdirectories made before a task starts; the rest are made when used (python: ctx.sub(name), shell:
# mkdir -p). On a journaled or network file system each mkdir (and the rmdir of an unused temp/ after
# success) costs 0.02 to 0.8 ms, more than the runner's own work for a tiny task.
#
# A python task in a worker process runs in the process's scratch directory (``_in_scratch``), renamed
# to its work directory only if it leaves something there: whether the call writes cannot be known
# before, and a task that writes nothing then costs no directory operation. Any other task runs in its
# work directory, made before every attempt; after a success that left nothing in it (``cleanup``), the
# empty directory is set aside as a spare and renamed into place for the process's next task
# (``places.retire``), so no directory of a task that wrote nothing outlives the run. The
# shards' directories are made by their first task that needs one and stay until the run ends
# (``Layout.remove_empty_shards``): removing one with its last task would cost two more operations per
# task, as a shard rarely holds two running tasks.
SUBDIRS_UP_FRONT = {"shell": ("logs",), "python": ()}


def run_attempt(attempt: Attempt, gate: Gate | None = None) -> Outcome:
    """Run ``attempt`` to its end; ``gate``: where it waits for a slot (this process's, not part of the
    attempt)."""
    try:
        if attempt.payload.models and not attempt.chdir:  # else its worker process's pool opened its grant
            return run_metered([attempt], lambda ready: [_attempt(ready[0], gate)])[0]
        return _attempt(attempt, gate)
    finally:
        if gate is not None:
            gate.withdraw()  # if it never entered: attempts handed over after it need not wait for it


def run_attempts(attempts: Sequence[Attempt]) -> list[Outcome]:
    """A batch of attempts (tiny tasks, one worker), one after the other: each gets its work directory as
    the one before ends, so the spare that one leaves (``places.retire``) is renamed into place
    rather than a new directory made."""
    return [run_attempt(a) for a in attempts]


def _attempt(attempt: Attempt, gate: Gate | None) -> Outcome:
    if attempt.missing:
        return Outcome(ok=False, error="; ".join(attempt.missing))
    ctx = attempt.ctx
    try:
        return _in_scratch(attempt) if attempt.chdir else _in_work_dir(attempt, gate)
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


def _in_work_dir(attempt: Attempt, gate: Gate | None) -> Outcome:
    """A shell or agent task, or a python task in a thread: it runs in its work directory."""
    payload, ctx, base_env = attempt.payload, attempt.ctx, attempt.env
    seen = terminations()  # a stop while this attempt waits at the gate keeps it from starting
    try:
        # an empty directory (one left by an earlier attempt or run is set aside), then this attempt's inputs
        prepare(ctx, SUBDIRS_UP_FRONT.get(payload.kind, WORK_SUBDIRS))
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
    spawned = _start(ready, gate)
    outcome, outputs, found = _run(payload, ctx, attempt.kill_grace, ready, spawned, gate)
    return _wrap_up(ctx, attempt.keep, outcome, outputs, found)


def _in_scratch(attempt: Attempt) -> Outcome:
    """A python task in a worker process (one attempt at a time there): it runs in the process's scratch
    directory (``places.take_scratch``), which becomes its work directory by one rename if it leaves
    anything there. A task that writes nothing costs no directory operation at all."""
    payload, ctx = attempt.payload, attempt.ctx
    try:
        scratch = take_scratch(ctx)
        if ctx.attempt > 1:  # the log of earlier attempts goes on (their work directory is set aside)
            carry_logs(ctx, scratch)
        inside = dataclasses.replace(ctx, work_dir=scratch)
        stage_inputs(inside, attempt.links)
    except (OSError, ValueError) as exc:
        return _failed(f"cannot prepare the work directory {ctx.work_dir}", exc)
    outcome = run_python(payload, inside, True, attempt.kill_grace)
    try:
        adopt_scratch(scratch, ctx)
    except OSError as exc:
        return _failed(f"cannot move what {ctx.task_id} left in {scratch} to its work directory {ctx.work_dir}", exc)
    if outcome.result_file:
        outcome = dataclasses.replace(outcome, result_file=os.path.join(ctx.work_dir, os.path.relpath(
            outcome.result_file, scratch)))
    outcome, outputs, found = _checked(payload, ctx, outcome)
    return _wrap_up(ctx, attempt.keep, outcome, outputs, found)


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


def _run(payload: Payload, ctx: TaskContext, kill_grace: float, ready: ShellLaunch | None, spawned: Any,
         gate: Gate | None) -> tuple[Outcome, list[str], list[str]]:
    """Run the task to its end and check its declared outputs, then give the slot back; return the
    outcome, the outputs to publish (the return value's file included) and the paths they matched."""
    ok = False
    try:
        if ready is not None:
            outcome = ready.wait(spawned, kill_grace)
            if payload.kind == "agent":
                outcome = agent.finish(outcome, ctx, payload.agent["model"] if payload.agent else {})
        else:
            outcome = run_python(payload, ctx, False, kill_grace)
        checked = _checked(payload, ctx, outcome)  # a missing output fails it before its slot is free
        ok = checked[0].ok
        return checked
    finally:
        if gate is not None:
            gate.leave(ok)


def _checked(payload: Payload, ctx: TaskContext, outcome: Outcome) -> tuple[Outcome, list[str], list[str]]:
    """A success whose declared outputs are all there, with them (the return value's file included) and
    the paths they matched; else a failure."""
    outputs = list(payload.outputs)
    if not outcome.ok:
        return outcome, outputs, []
    if outcome.result_file:  # the return value is published with the declared outputs, at the top
        outputs += _return_files(outcome.result_file, ctx.work_dir, outputs)
    try:
        return outcome, outputs, existing_outputs(ctx.work_dir, outputs)
    except OutputError as exc:
        return dataclasses.replace(outcome, ok=False, error=str(exc)), outputs, []


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
        if outcome.reason is None and _full(ctx.run_dir):  # say, a script's write failed: not its own fault
            outcome = dataclasses.replace(outcome, reason=OutcomeReason.DISK_FULL,
                                          error=f"{outcome.error} (its file system is full)")
        return dataclasses.replace(outcome, work_bytes=tree_size(ctx.work_dir), work_dir=ctx.work_dir)
    published = Layout(ctx.run_dir, ctx.sharding).published(ctx.task_id)
    output_bytes = 0
    if outputs or os.path.lexists(published):  # an earlier run's outputs get superseded
        publish(ctx, outputs, found)
        output_bytes = tree_size(published)
    return dataclasses.replace(outcome, work_bytes=cleanup(ctx, keep), output_bytes=output_bytes, work_dir=ctx.work_dir)
