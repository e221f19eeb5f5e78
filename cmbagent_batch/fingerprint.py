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
from dataclasses import dataclass
from typing import Iterable

from cmbagent_batch.analysis.cache import digest
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


def fingerprints(order: list[str], tasks: dict[str, TaskSpec], deps: dict[str, tuple[str, ...]],
                 external: dict[str, list[str]], base_dir: str) -> dict[str, Fingerprint]:
    """Fingerprints of all tasks; ``order`` must be topological (dependencies first)."""
    out: dict[str, Fingerprint] = {}
    no_deps = digest([])
    for tid in order:
        ds = deps.get(tid, ())
        dep_part = digest([[d, out[d].value] for d in ds]) if ds else no_deps
        ext = external.get(tid)
        out[tid] = Fingerprint(
            spec=spec_digest(tasks[tid]),
            deps=dep_part,
            inputs=external_inputs_digest(ext, base_dir) if ext else "",
        )
    return out
