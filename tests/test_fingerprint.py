"""Fingerprints computed on demand: same values in any order, no recursion on long chains."""

from __future__ import annotations

from cmbagent_batch.plan.fingerprint import fingerprints
from cmbagent_batch.spec.loader import load_spec_bytes


def chain(n: int) -> tuple[dict, dict]:
    parts = ["version: 1\njob: {name: chain}\ntasks:\n"]
    for i in range(n):
        deps = f", depends_on: [t{i - 1:05d}]" if i else ""
        parts.append(f"  - {{id: t{i:05d}, kind: shell, run: 'echo {i}'{deps}}}\n")
    spec = load_spec_bytes("".join(parts).encode(), "chain.yaml")
    tasks = {t.id: t for t in spec.tasks}
    deps = {t.id: tuple(t.depends_on) for t in spec.tasks}
    return tasks, deps


def test_the_last_of_a_long_chain_first_gives_what_the_chain_in_order_gives() -> None:
    tasks, deps = chain(5000)  # deeper than the interpreter's recursion limit
    backwards = fingerprints(tasks, deps, {}, ".")
    last = backwards["t04999"].value
    forwards = fingerprints(tasks, deps, {}, ".")
    values = [forwards[tid].value for tid in sorted(tasks)]
    assert values[-1] == last
    assert len(set(values)) == 5000  # each depends on its whole upstream
    assert backwards["t00000"] == forwards["t00000"] and len(backwards) == 5000
