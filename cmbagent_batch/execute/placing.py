"""Where a run's tasks may go: the inventory (declared in the spec, else the Slurm allocation's, else this
machine's) and rank 0's booking of it, for jobs whose tasks have shapes (``resources``) to place.

A job whose tasks all take one core and no memory reservation (the default shape), with no declared
inventory, books nothing: its tasks are counted against the workers and the machine's cores as before, at
no cost per task. Any other job books every task's cores, GPUs and memory per node (``place.booking``), and
a task that can never fit is refused before anything starts, or skipped with the tasks that depend on it
when its entry says ``when_unplaceable: skip``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from cmbagent_batch.errors import Problem, SpecError
from cmbagent_batch.place.booking import Booking
from cmbagent_batch.place.inventory import Inventory, declared, discover
from cmbagent_batch.spec.model import JobSpec, Unplaceable
from cmbagent_batch.spec.tasks import DEFAULT_RESOURCES, by_entry
from cmbagent_batch.spec.yamlio import read_yaml


def needs_booking(spec: JobSpec) -> bool:
    """Whether the job has a shape to place or a declared inventory to keep to (a look at each entry)."""
    if spec.execution.inventory is not None:
        return True
    for t, _ in by_entry(spec.tasks):
        r = t.resources
        if r is not DEFAULT_RESOURCES and (not r.single or r.memory_mb is not None):
            return True
    return False


def inventory_of(spec: JobSpec, env: Mapping[str, str]) -> Inventory:
    """The declared inventory, else the one discovered."""
    inv = spec.execution.inventory
    if inv is not None:
        return declared(inv.cpus, inv.gpus, inv.memory_mb, socket.gethostname())
    return discover(env)


@dataclass(frozen=True)
class Placing:
    """A run's inventory, rank 0's booking of it, and the tasks skipped as they can never fit there."""

    inventory: Inventory
    booking: Booking
    skipped: Mapping[str, str]  # task id -> why it can never fit (its entry says ``when_unplaceable: skip``)


def misfits(spec: JobSpec, inventory: Inventory) -> dict[str, str]:
    """The tasks that can never fit ``inventory`` and are skipped (``when_unplaceable: skip``), with why;
    ``SpecError`` (exit 2) naming the others, at their ``resources``."""
    skipped: dict[str, str] = {}
    refused: list[tuple[str, int, str]] = []
    for t, ids in by_entry(spec.tasks):
        why = inventory.never_fits(t.resources)
        if why is None or not ids:
            continue
        if t.when_unplaceable is Unplaceable.SKIP:
            skipped.update(dict.fromkeys(ids, why))
        else:
            refused.append((ids[0], t.entry, why))
    if refused:
        doc = read_yaml(spec.path)  # read again to say where (a refusal is rare; the document is not kept)
        problems = []
        for tid, entry, why in refused:
            line, column = doc.locate(("tasks", entry, "resources"))
            problems.append(Problem(spec.path, line, column, f"$.tasks[{entry}].resources",
                                    f"{why}: it can never run here (when_unplaceable: skip would skip it)",
                                    task=tid))
        raise SpecError(problems)
    return skipped


def booking_for(spec: JobSpec, env: Mapping[str, str]) -> Placing | None:
    """The inventory and rank 0's booking of it for the job, or None when it books nothing (see the module
    docstring)."""
    if not needs_booking(spec):
        return None
    inventory = inventory_of(spec, env)
    skipped = misfits(spec, inventory)
    return Placing(inventory, Booking(inventory), skipped)
