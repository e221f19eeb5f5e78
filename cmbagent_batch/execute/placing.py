"""Where a run's tasks may go: the inventory (declared in the spec, else the Slurm allocation's, else this
machine's) and rank 0's booking of it, for jobs whose tasks have shapes (``resources``) to place.

A job whose tasks all take one core and no memory reservation (the default shape), with no declared
inventory, books nothing: its tasks are counted against the workers and the machine's cores as before, at
no cost per task. Any other job books every task's cores, GPUs and memory per node (``place.booking``), and
a task that can never fit is refused before anything starts, or skipped with the tasks that depend on it
when its entry says ``when_unplaceable: skip``.

**Under MPI** each worker rank says what node it is on (``worker_node``: the Slurm node it runs on, with
that node's CPUs; the declared node; or, outside Slurm, its machine as ``inventory.local`` sees it), and
rank 0 places tasks on nodes that have a worker: the allocation's nodes inside Slurm, the declared one
(all workers run its tasks), or else the nodes the workers reported (``Source.MPI``). A node of the
allocation with no worker rank on it gets no task, and the run says so. ``Placing.routes`` gives the
workers of each node, for rank 0's executor to send a placed task to one of them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from cmbagent_batch.errors import ExitCode, Problem, SlurmError, SpecError
from cmbagent_batch.place.booking import Booking
from cmbagent_batch.place.inventory import Inventory, Node, Source, declared, discover, local, slurm
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
    routes: Mapping[str, list[int]] = field(default_factory=dict)  # under MPI: node -> its worker ranks
    notes: tuple[str, ...] = ()  # what the run should say of the inventory (nodes left without a worker)


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


def booking_for(spec: JobSpec, env: Mapping[str, str], workers: Mapping[int, Node] | None = None) -> Placing | None:
    """The inventory and rank 0's booking of it for the job, or None when it books nothing (see the module
    docstring). ``workers``: under MPI, the node each worker rank reported (``worker_node``)."""
    if not needs_booking(spec):
        return None
    routes: dict[str, list[int]] = {}
    notes: tuple[str, ...] = ()
    if workers is None:
        inventory = inventory_of(spec, env)
    else:
        allocation = None if spec.execution.inventory is not None else slurm(env)
        inventory, routes, notes = on_workers(spec, workers, allocation)
    skipped = misfits(spec, inventory)
    return Placing(inventory, Booking(inventory), skipped, routes, notes)


def worker_node(spec: JobSpec, env: Mapping[str, str]) -> Node:
    """The node a worker rank of a job that books says it is on: the declared one; inside Slurm, its
    node's name and CPUs in the allocation (``SLURMD_NODENAME``, ``SLURM_CPUS_ON_NODE``); else this
    machine (``inventory.local``)."""
    inv = spec.execution.inventory
    if inv is not None:
        return declared(inv.cpus, inv.gpus, inv.memory_mb, socket.gethostname()).nodes[0]
    if env.get("SLURM_JOB_ID"):
        cpus = env.get("SLURM_CPUS_ON_NODE", "")
        return Node(env.get("SLURMD_NODENAME") or socket.gethostname(),
                    int(cpus) if cpus.isdigit() else os.cpu_count() or 1)
    return local(env).nodes[0]


def on_workers(spec: JobSpec, workers: Mapping[int, Node],
               allocation: Inventory | None) -> tuple[Inventory, dict[str, list[int]], tuple[str, ...]]:
    """The inventory under MPI (``allocation``: the Slurm allocation's, when in one), the workers of each
    of its nodes, and what to say of nodes without one."""
    inv = spec.execution.inventory
    if inv is not None:  # one node, as declared: every worker runs its tasks
        inventory = declared(inv.cpus, inv.gpus, inv.memory_mb, socket.gethostname())
        return inventory, {inventory.nodes[0].name: sorted(workers)}, ()
    on: dict[str, list[int]] = {}
    for rank, node in sorted(workers.items()):
        on.setdefault(node.name, []).append(rank)
    if allocation is None:
        seen = {node.name: node for node in workers.values()}
        return Inventory(tuple(seen[name] for name in on), Source.MPI), on, ()
    kept = tuple(node for node in allocation.nodes if node.name in on)
    left = [node.name for node in allocation.nodes if node.name not in on]
    notes = (f"no worker rank runs on node{'s' if len(left) > 1 else ''} {', '.join(left[:5])}"
             f"{' and more' if len(left) > 5 else ''} of the allocation: no task is placed there",) if left else ()
    if not kept:
        raise SlurmError(f"no worker rank runs on a node of the Slurm allocation "
                         f"({', '.join(n.name for n in allocation.nodes[:5])}): the workers say they are on "
                         f"{', '.join(sorted(on)[:5])} (SLURMD_NODENAME, else the host name)", ExitCode.FAILED)
    return Inventory(kept, Source.SLURM, allocation.gpu_note), {n.name: on[n.name] for n in kept}, notes
