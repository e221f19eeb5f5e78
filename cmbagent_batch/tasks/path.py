"""The ``PATH`` tasks see (``execution.path``): the runner's interpreter first, or as inherited."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: agent and worker processes load the tasks, not the spec
    from cmbagent_batch.spec.model import TaskPath


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
