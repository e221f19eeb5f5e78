"""Placement under MPI: what node each worker rank says it is on, and the inventory rank 0 books from those
reports (the declared node, the Slurm allocation's nodes that have a worker, or the workers' own nodes)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cmbagent_batch.backends.ranks import hello_node, node_hello
from cmbagent_batch.errors import SlurmError
from cmbagent_batch.execute.placing import on_workers, worker_node
from cmbagent_batch.place.inventory import Inventory, Node, Source
from cmbagent_batch.spec.loader import load_spec
from cmbagent_batch.spec.model import JobSpec

SHAPED = """version: 1
job: {name: ranks}
execution: {backend: mpi%s}
tasks:
  - {id: quad, kind: shell, run: $CMBAGENT_LAUNCH true, resources: {ranks: 4}}
"""


def spec(tmp_path: Path, execution: str = "") -> JobSpec:
    path = tmp_path / "job.yaml"
    path.write_text(SHAPED % execution)
    return load_spec(str(path))


def test_a_worker_says_the_declared_node_else_its_slurm_node_else_its_machine(tmp_path: Path) -> None:
    declared = worker_node(spec(tmp_path, ", inventory: {cpus: 8, gpus: [0, 1]}"), {"SLURM_JOB_ID": "7"})
    assert (declared.cpus, declared.gpus) == (8, ("0", "1"))
    shaped = spec(tmp_path)
    in_slurm = worker_node(shaped, {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "nid001", "SLURM_CPUS_ON_NODE": "128"})
    assert in_slurm == Node("nid001", 128)
    here = worker_node(shaped, {"PATH": "", "CUDA_VISIBLE_DEVICES": ""})
    assert here.name == socket.gethostname() and here.cpus >= 1 and here.gpus == ()


def test_a_workers_hello_carries_its_node_and_a_job_that_books_nothing_says_none() -> None:
    node = Node("nid001", 64, ("0", "1"), 256_000)
    assert hello_node(node_hello(node)) == node
    assert "\n" not in node_hello(node)
    assert hello_node("") is None


def test_in_an_allocation_only_the_nodes_with_a_worker_are_booked_and_the_others_are_named(tmp_path: Path) -> None:
    allocation = Inventory((Node("n1", 4), Node("n2", 4), Node("n3", 4)), Source.SLURM)
    workers = {1: Node("n1", 4), 2: Node("n1", 4), 3: Node("n2", 4)}
    inventory, routes, notes = on_workers(spec(tmp_path), workers, allocation)
    assert inventory.nodes == (Node("n1", 4), Node("n2", 4)) and inventory.source is Source.SLURM
    assert routes == {"n1": [1, 2], "n2": [3]}
    assert notes == ("no worker rank runs on node n3 of the allocation: no task is placed there",)


def test_an_allocation_none_of_whose_nodes_has_a_worker_is_refused_naming_both(tmp_path: Path) -> None:
    allocation = Inventory((Node("n1", 4),), Source.SLURM)
    with pytest.raises(SlurmError) as caught:
        on_workers(spec(tmp_path), {1: Node("login7", 4)}, allocation)
    assert str(caught.value) == ("no worker rank runs on a node of the Slurm allocation (n1): the workers say "
                                 "they are on login7 (SLURMD_NODENAME, else the host name)")


def test_outside_slurm_the_workers_nodes_are_the_inventory_and_a_declared_node_goes_to_every_worker(
        tmp_path: Path) -> None:
    workers = {1: Node("a", 4, ("0",)), 2: Node("b", 2), 3: Node("a", 4, ("0",))}
    inventory, routes, notes = on_workers(spec(tmp_path), workers, None)
    assert inventory.nodes == (Node("a", 4, ("0",)), Node("b", 2)) and inventory.source is Source.MPI
    assert (routes, notes) == ({"a": [1, 3], "b": [2]}, ())
    assert inventory.describe() == "2 nodes: a: 4 CPUs, GPU 0, memory not counted; b: 2 CPUs, no GPU, memory not counted (mpi ranks)"
    declared, routes, _ = on_workers(spec(tmp_path, ", inventory: {cpus: 8}"), workers, None)
    assert declared.source is Source.DECLARED and routes == {declared.nodes[0].name: [1, 2, 3]}
