"""The models' API keys, held away from tasks.

``hold_keys`` takes the API keys of the spec's models out of this process's environment, once,
before any task starts (on rank 0 after the dependency analysis, which calls its model itself; on a
worker rank at once). Nothing started afterwards inherits them: no shell, python or agent task, no
worker process. The gateway gets them through its stdin. Their values are also overwritten in the
process's initial environment block, which ``/proc/PID/environ`` shows to every process of the same
user whatever ``os.environ`` holds now (Linux). The processes that started the runner (a shell, ``srun``,
``mpiexec``, a batch script) keep them in theirs: a task of the same user can read those, as it could
before it ran.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmbagent_batch.spec.model import JobSpec

_held: dict[str, str] = {}
_held_names: frozenset[str] = frozenset()  # read for every task's environment: replaced, never copied


def key_names(spec: JobSpec) -> set[str]:
    """The variables holding the keys of the spec's models (``api_key_env``; ``OPENAI_API_KEY`` for a model
    that names none), but for local models, which need none."""
    from cmbagent_batch.spec.variables import DEFAULT_KEY_ENV  # here: task processes import this module

    return {m.api_key_env or DEFAULT_KEY_ENV for m in spec.llm.models.values() if m.provider != "local"}


def hold_keys(names: Iterable[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Take the variables ``names`` (the models' ``api_key_env``) out of ``environ`` into this process's
    keeping, for its gateway alone."""
    global _held_names
    taken = []
    for name in names:
        _held_names |= {name}
        value = environ.pop(name, None)
        if value is not None:
            _held[name] = value
            taken.append(name)
    if taken and environ is os.environ:
        _scrub_initial_environment(taken)


def _scrub_initial_environment(names: list[str]) -> None:
    """Overwrite the values of ``names`` in this process's initial environment block (Linux; elsewhere,
    or when ``/proc`` cannot be read, nothing is done)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 on: env_start and env_end are 50 and 51
        start, end = int(fields[47]), int(fields[48])
        with open("/proc/self/environ", "rb") as fh:
            block = fh.read(end - start)
    except (OSError, ValueError, IndexError):
        return
    for name in names:
        prefix = name.encode() + b"="
        at = block.find(prefix)
        while at >= 0:
            if at == 0 or block[at - 1] == 0:
                value = at + len(prefix)
                stop = block.find(b"\0", value)
                stop = len(block) if stop < 0 else stop
                ctypes.memset(start + value, ord("*"), stop - value)
            at = block.find(prefix, at + 1)


def held_names() -> frozenset[str]:
    """The variables held away from tasks: never set in a task's environment."""
    return _held_names


def held() -> dict[str, str]:
    """The keys held, by variable: for the gateway alone."""
    return dict(_held)
