"""Task fingerprints for resume: a task whose fingerprint is unchanged since it succeeded is skipped.

A fingerprint hashes three parts, kept apart so ``status --explain`` can say which one changed:
``spec`` (the fields that change what the task does), ``deps`` (the fingerprints of the tasks it
depends on, so editing one task reruns it and everything downstream) and ``inputs`` (size and
modification time of declared inputs that come from outside the job).
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from cmbagent_batch.plan.analysis.cache import digest
from cmbagent_batch.spec.model import TaskSpec, thaw

# Fields that do not change what a task produces (timeouts, retries, resources, estimates) are left out,
# so tuning them does not rerun finished work.
_FIELDS = ("kind", "run", "call", "args", "env", "inputs", "outputs", "agent", "instructions", "model",
           "max_turns", "code_execution", "matrix")


@dataclass(frozen=True)
class Fingerprint:
    spec: str
    deps: str
    inputs: str

    @functools.cached_property
    def value(self) -> str:
        return digest([self.spec, self.deps, self.inputs])

    def to_dict(self) -> dict[str, str]:
        return {"fp": self.value, "spec_fp": self.spec, "deps_fp": self.deps, "inputs_fp": self.inputs}


def spec_digest(task: TaskSpec) -> str:
    fields = {name: thaw(getattr(task, name)) for name in _FIELDS}
    if task.kind == "agent":
        fields["description"] = task.description
    return digest(fields)


def external_inputs_digest(patterns: Iterable[str], base_dir: str) -> str:
    """Size and mtime of the files outside the job that ``patterns`` match (relative to ``base_dir``)."""
    stats = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(base_dir, pattern))):
            try:
                st = os.stat(path)
            except OSError:
                continue
            stats.append([os.path.relpath(path, base_dir), st.st_size, st.st_mtime_ns])
    return digest(stats)


class Fingerprints(Mapping[str, Fingerprint]):
    """Every task's fingerprint, each computed when first asked for (with those of its dependencies).

    A fresh run asks for most of them once, when the task succeeds: 20,000 of them cost 0.2 s, which
    then overlaps the run instead of delaying its first launch. The external inputs are looked at up
    front, so a fingerprint describes the files as they were when the run started.
    """

    def __init__(self, tasks: dict[str, TaskSpec], deps: dict[str, tuple[str, ...]], inputs: dict[str, str]) -> None:
        self._tasks = tasks
        self._deps = deps
        self._inputs = inputs
        self._done: dict[str, Fingerprint] = {}

    def __getitem__(self, tid: str) -> Fingerprint:
        done = self._done.get(tid)
        if done is not None:
            return done
        if tid not in self._tasks:
            raise KeyError(tid)
        stack = [(tid, False)]  # iterative post-order: a chain of 10^5 tasks is no recursion
        while stack:
            t, ready = stack.pop()
            if t in self._done:
                continue
            deps = self._deps.get(t, ())
            if not ready:
                stack.append((t, True))
                stack.extend((d, False) for d in deps if d not in self._done)
                continue
            self._done[t] = Fingerprint(
                spec=spec_digest(self._tasks[t]),
                deps=digest([[d, self._done[d].value] for d in deps]) if deps else _NO_DEPS,
                inputs=self._inputs.get(t, ""),
            )
        return self._done[tid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


_NO_DEPS = digest([])


def fingerprints(tasks: dict[str, TaskSpec], deps: dict[str, tuple[str, ...]], external: dict[str, list[str]],
                 base_dir: str) -> Fingerprints:
    """Fingerprints of all tasks (``external``: the input patterns of each task that no task writes)."""
    inputs = {tid: external_inputs_digest(patterns, base_dir) for tid, patterns in external.items() if patterns}
    return Fingerprints(tasks, deps, inputs)
