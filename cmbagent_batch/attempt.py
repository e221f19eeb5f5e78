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
from typing import Any, Callable, Collection, Mapping, Sequence

from cmbagent_batch.tasks.base import WORK_SUBDIRS, Gate, Outcome, Payload, Stopped, TaskContext
from cmbagent_batch.tasks.python import run_python
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
# success) costs 0.02 to 0.2 ms, as much as the runner's own work for a tiny task.
SUBDIRS_UP_FRONT = {"shell": ("logs",), "python": ()}


def run_attempt(payload: Payload, ctx: TaskContext, links: Sequence[tuple[str, str]],
                base_env: Mapping[str, str], chdir: bool, keep: Collection[str], kill_grace: float = 5.0,
                missing: Sequence[str] = (), gate: Gate | None = None, made: bool = False) -> Outcome:
    try:
        return _attempt(payload, ctx, links, base_env, chdir, keep, kill_grace, missing, gate, made)
    finally:
        if gate is not None:
            gate.withdraw()  # if it never entered: attempts handed over after it need not wait for it


def run_attempts(calls: list[tuple[Callable[..., Outcome], tuple[Any, ...]]]) -> list[Outcome]:
    """A batch of ``run_attempt`` calls (tiny tasks, one worker process): their work directories are made
    in one burst first. Two workers making directories in the same ``tasks/`` directory at the same time
    slow each other down (the directory's lock); bursts rarely meet, steady streams always do."""
    made: set[str] = set()
    for _fn, args in calls:
        try:
            os.mkdir(args[1].work_dir)
            made.add(args[1].work_dir)
        except OSError:
            pass  # exists (a rerun) or cannot be made: the attempt itself finds out and says so
    return [fn(*args, made=args[1].work_dir in made) for fn, args in calls]


def _attempt(payload: Payload, ctx: TaskContext, links: Sequence[tuple[str, str]], base_env: Mapping[str, str],
             chdir: bool, keep: Collection[str], kill_grace: float, missing: Sequence[str],
             gate: Gate | None, made: bool) -> Outcome:
    if missing:
        return Outcome(ok=False, error="; ".join(missing))
    seen = terminations()  # a stop while this attempt waits at the gate keeps it from starting
    try:
        prepare(ctx, SUBDIRS_UP_FRONT.get(payload.kind, WORK_SUBDIRS), made)
        stage_inputs(ctx, links)
    except (OSError, ValueError) as exc:
        return Outcome(ok=False, error=f"cannot prepare the work directory {ctx.work_dir}: {exc}")
    outputs = list(payload.outputs)
    ready = ShellLaunch.prepare(payload, ctx, base_env, seen) if payload.kind == "shell" else None
    if isinstance(ready, Outcome):
        return ready
    try:
        try:
            spawn = ready.spawn if ready is not None else None
            if gate is not None:
                spawned = gate.enter(spawn)  # the thread that frees the slot may start bash for us
            else:
                spawned = spawn() if spawn is not None else None
        except BaseException:
            if ready is not None:
                ready.close()
            raise
        ok = False
        found: list[str] = []
        try:
            if ready is not None:
                outcome = ready.wait(spawned, kill_grace)
            elif payload.kind == "python":
                outcome = run_python(payload, ctx, chdir)
            else:
                outcome = Outcome(ok=False, error="agent tasks are not supported by this version of cmbagent-batch yet")
            if outcome.ok:
                if outcome.result_file:  # the return value is published with the declared outputs
                    outputs.append(os.path.relpath(outcome.result_file, ctx.work_dir))
                # a missing output fails the attempt before its slot is free
                found = existing_outputs(ctx.work_dir, outputs)
            ok = outcome.ok
        except OutputError as exc:
            outcome = dataclasses.replace(outcome, ok=False, error=str(exc))
        finally:
            if gate is not None:
                gate.leave(ok)
        if outcome.ok:
            published = os.path.join(ctx.run_dir, "outputs", ctx.task_id)
            output_bytes = 0
            if outputs or os.path.lexists(published):  # an earlier run's outputs get superseded
                publish(ctx, outputs, found)
                output_bytes = tree_size(published)
            return dataclasses.replace(outcome, work_bytes=cleanup(ctx, keep), output_bytes=output_bytes)
        return dataclasses.replace(outcome, work_bytes=tree_size(ctx.work_dir))
    except (Stopped, OutputError) as exc:  # OutputError: an output removed between the check and publish
        return Outcome(ok=False, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug or an OS error on the worker: report it with its place
        return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
