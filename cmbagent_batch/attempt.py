"""One attempt of one task, start to finish, on whatever worker runs it.

A top-level, picklable function (it may run in a process-pool worker): prepare the work directory, link
the inputs, run the task, publish its outputs, apply retention. It never raises for a task's own failure;
it returns an ``Outcome`` that says what went wrong.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Collection, Mapping, Sequence

from cmbagent_batch.tasks.base import WORK_SUBDIRS, Outcome, Payload, TaskContext
from cmbagent_batch.tasks.python import run_python
from cmbagent_batch.tasks.shell import run_shell
from cmbagent_batch.tasks.workdir import OutputError, cleanup, prepare, publish, stage_inputs


# Subdirectories made before a task starts; the rest are made when used (python: ctx.sub(name), shell:
# mkdir -p). On a network or journaled file system each mkdir costs ~0.2 ms, which dominates tiny tasks.
SUBDIRS_UP_FRONT = {"shell": ("logs", "temp"), "python": ()}


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


def run_attempt(payload: Payload, ctx: TaskContext, links: Sequence[tuple[str, str]],
                base_env: Mapping[str, str], chdir: bool, keep: Collection[str], kill_grace: float = 5.0,
                missing: Sequence[str] = ()) -> Outcome:
    if missing:
        return Outcome(ok=False, error="; ".join(missing))
    try:
        prepare(ctx, SUBDIRS_UP_FRONT.get(payload.kind, WORK_SUBDIRS))
        stage_inputs(ctx, links)
    except (OSError, ValueError) as exc:
        return Outcome(ok=False, error=f"cannot prepare the work directory {ctx.work_dir}: {exc}")
    try:
        if payload.kind == "shell":
            outcome = run_shell(payload, ctx, base_env, kill_grace)
        elif payload.kind == "python":
            outcome = run_python(payload, ctx, chdir)
        else:
            outcome = Outcome(ok=False, error="agent tasks are not supported by this version of cmbagent-batch yet")
        if not outcome.ok:
            return outcome
        published = os.path.join(ctx.run_dir, "outputs", ctx.task_id)
        outputs = list(payload.outputs)
        if outcome.result_file:  # the return value is published with the declared outputs
            outputs.append(os.path.relpath(outcome.result_file, ctx.work_dir))
        if outputs or os.path.lexists(published):  # an earlier run's outputs get superseded
            try:
                publish(ctx, outputs)
            except OutputError as exc:
                return dataclasses.replace(outcome, ok=False, error=str(exc))
        cleanup(ctx, keep)
        return outcome
    except Exception as exc:  # noqa: BLE001 - a bug or an OS error on the worker: report it with its place
        return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
