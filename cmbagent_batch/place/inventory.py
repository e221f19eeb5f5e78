"""Where tasks can run: the nodes, and on each its CPUs, its GPUs (their ids) and its memory.

An inventory is declared in the spec (``execution.inventory``), read from the Slurm allocation the runner
is in (its ``SLURM_*`` variables and ``scontrol``), or this machine's (psutil, ``CUDA_VISIBLE_DEVICES``,
``nvidia-smi -L``): ``discover`` picks in that order. It is read once per run; whether a task's shape can
ever fit is answered from the distinct node shapes and kept per task shape, so a job of a million tasks
over a thousand nodes asks it at the cost of its few shapes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import takewhile

from cmbagent_batch.errors import SlurmError
from cmbagent_batch.slurm import client
from cmbagent_batch.spec.model import Resources

PROBE_TIMEOUT_S = 30  # nvidia-smi answers in well under a second where a driver is loaded


@dataclass(frozen=True, slots=True)
class Node:
    """One node tasks can run on."""

    name: str  # host name as the allocation names it (Slurm: as in its node list)
    cpus: int
    gpus: tuple[str, ...] = ()  # device ids as CUDA_VISIBLE_DEVICES lists them ("0", "1", or UUIDs)
    memory_mb: int | None = None  # None: unknown, memory is then not booked on it


class Source(Enum):
    """Where an inventory comes from."""

    DECLARED = "declared"
    """``execution.inventory`` in the spec: one node, as the user says it is."""
    LOCAL = "local"
    """This machine: the CPUs this process may use, its memory, its GPUs."""
    SLURM = "slurm"
    """The Slurm allocation the runner is in."""
    MPI = "mpi ranks"
    """The nodes the MPI worker ranks report."""

    @property
    def place(self) -> str:
        """How a refusal names it."""
        return _PLACES[self]


_PLACES = {Source.DECLARED: "declared inventory", Source.LOCAL: "this machine",
           Source.SLURM: "Slurm allocation", Source.MPI: "MPI ranks' nodes"}

_Shape = tuple[int, int, int | None]  # a node's CPUs, GPUs and memory


@dataclass(frozen=True, slots=True)
class Inventory:
    """The nodes tasks can run on, and where that was learnt."""

    nodes: tuple[Node, ...]
    source: Source
    gpu_note: str = ""  # where discovery found the GPUs, or why there are none (e.g. "nvidia-smi not found")
    _shapes: Counter[_Shape] = field(init=False, repr=False, compare=False)
    _refusals: dict[Resources, str | None] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_shapes", Counter((n.cpus, len(n.gpus), n.memory_mb) for n in self.nodes))

    def describe(self) -> str:
        """One line: ``1 node (vm): 4 CPUs, GPUs 0,1, 15,872 MB (declared)``; nodes alike are told once."""
        if not self.nodes:
            return f"no node ({self.source.value})"
        groups: dict[_Shape, list[Node]] = {}
        for node in self.nodes:
            groups.setdefault((node.cpus, len(node.gpus), node.memory_mb), []).append(node)
        count = _count(len(self.nodes), "node")
        if len(groups) == 1:
            (alike,) = groups.values()
            return f"{count} ({_names(alike)}): {self._shape_of(alike)} ({self.source.value})"
        shown = list(groups.values())
        parts = [f"{_names(alike)}: {self._shape_of(alike)}" for alike in shown[:3]]
        if len(shown) > 3:
            parts.append(f"{_count(sum(len(g) for g in shown[3:]), 'more node')} of "
                         f"{_count(len(shown) - 3, 'other shape')}")
        return f"{count}: {'; '.join(parts)} ({self.source.value})"

    def _shape_of(self, alike: list[Node]) -> str:
        first = alike[0]
        if all(n.gpus == first.gpus for n in alike):
            gpus = "no GPU" if not first.gpus else f"GPU{'s' if len(first.gpus) > 1 else ''} {','.join(first.gpus)}"
        else:
            gpus = _count(len(first.gpus), "GPU")
        if self.gpu_note:
            gpus += f" ({self.gpu_note})"
        memory = "memory not counted" if first.memory_mb is None else f"{first.memory_mb:,} MB"
        return f"{'each ' if len(alike) > 1 else ''}{_count(first.cpus, 'CPU')}, {gpus}, {memory}"

    def never_fits(self, r: Resources) -> str | None:
        """Why a task of shape ``r`` can never run here, naming what it asks and what there is; None when
        it can (memory counts only on nodes whose memory is known)."""
        try:
            return self._refusals[r]
        except KeyError:
            why = self._refusals[r] = self._why_not(r)
            return why

    def _why_not(self, r: Resources) -> str | None:
        place = self.source.place
        if r.nodes > len(self.nodes):
            return f"asks for {r.nodes:,} nodes; the inventory has {len(self.nodes):,} ({place})"
        on = "one node" if r.nodes == 1 else f"each of {r.nodes:,} nodes"
        asks = [(_CPUS, r.cpus_per_node)]  # (index in a node's shape, amount per node)
        if r.gpus_per_node:
            asks.append((_GPUS, r.gpus_per_node))
        if r.memory_mb is not None:
            asks.append((_MEMORY, r.memory_mb))
        for i, need in asks:
            enough = sum(n for shape, n in self._shapes.items() if _holds(shape[i], need))
            if enough >= r.nodes:
                continue
            if enough:
                fact = f"only {_count(enough, 'node')} {'has' if enough == 1 else 'have'} {_amount(i, need)} or more"
            elif i == _GPUS and not any(shape[_GPUS] for shape in self._shapes):
                fact = "no node has a GPU"
                place += f"; {self.gpu_note}" if self.gpu_note else ""
            else:
                fact = f"the largest node has {_amount(i, max(shape[i] or 0 for shape in self._shapes))}"
            return f"asks for {_amount(i, need)} on {on}; {fact} ({place})"
        enough = sum(n for shape, n in self._shapes.items() if all(_holds(shape[i], need) for i, need in asks))
        if enough >= r.nodes:
            return None
        said = [_amount(i, need) for i, need in asks]
        fact = "no node has" if not enough else f"only {_count(enough, 'node')} {'has' if enough == 1 else 'have'}"
        return f"asks for {', '.join(said[:-1])} and {said[-1]} on {on}; {fact} all of that ({place})"


_CPUS, _GPUS, _MEMORY = 0, 1, 2  # positions in a node's shape


def _amount(i: int, n: int) -> str:
    return f"{n:,} MB" if i == _MEMORY else _count(n, "GPU" if i == _GPUS else "CPU")


def _holds(has: int | None, need: int) -> bool:
    return has is None or has >= need  # an unknown amount (memory) is not booked, so it never refuses


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _names(nodes: Sequence[Node]) -> str:
    if len(nodes) <= 3:
        return ", ".join(n.name for n in nodes)
    return f"{nodes[0].name}, {nodes[1].name}, ..., {nodes[-1].name}"


def declared(cpus: int, gpus: Iterable[str | int] = (), memory_mb: int | None = None,
             host: str | None = None) -> Inventory:
    """What ``execution.inventory: {cpus, gpus, memory_mb}`` declares: one node, named by ``host``."""
    node = Node(host or socket.gethostname(), cpus, tuple(str(g) for g in gpus), memory_mb)
    return Inventory((node,), Source.DECLARED)


# -- this machine ------------------------------------------------------------------------------------------

Run = Callable[[Sequence[str], Mapping[str, str]], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``argv`` run to its end in ``env``, whose ``PATH`` finds it; ``FileNotFoundError`` when none does."""
    return subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False)


def local(env: Mapping[str, str] = os.environ, *, run: Run = run_command, host: str | None = None) -> Inventory:
    """This machine: the CPUs this process may use, its total memory, and its GPUs (``local_gpus``)."""
    import psutil  # only here: validate and plan start without it

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (psutil.cpu_count() or 1)
    gpus, note = local_gpus(env, run)
    node = Node(host or socket.gethostname(), cpus, gpus, psutil.virtual_memory().total // 2**20)
    return Inventory((node,), Source.LOCAL, note)


def local_gpus(env: Mapping[str, str], run: Run = run_command) -> tuple[tuple[str, ...], str]:
    """This machine's GPU ids and where they come from (or why there are none): ``CUDA_VISIBLE_DEVICES``
    when set, else ``nvidia-smi -L``, else none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        if not visible.strip():
            return (), "CUDA_VISIBLE_DEVICES is empty"
        # CUDA uses the devices listed up to the first that is not one ("-1", Slurm's "NoDevFiles").
        ids = tuple(takewhile(lambda d: d != "" and not d.startswith("-") and d != "NoDevFiles",
                              (d.strip() for d in visible.split(","))))
        return (ids, "from CUDA_VISIBLE_DEVICES") if ids else ((), f"CUDA_VISIBLE_DEVICES={visible}")
    try:
        proc = run(["nvidia-smi", "-L"], env)
    except FileNotFoundError:
        return (), "nvidia-smi not found"
    except subprocess.TimeoutExpired:
        return (), f"nvidia-smi -L did not answer in {PROBE_TIMEOUT_S} s"
    except OSError as exc:
        return (), f"cannot run nvidia-smi: {exc.strerror or exc}"
    if proc.returncode != 0:
        said = " ".join(line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip())
        return (), f"nvidia-smi -L exited {proc.returncode}" + (f": {said}" if said else "")
    # One line per device, "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)"; MIG instances follow, indented.
    ids = tuple(m[1] for m in re.finditer(r"^GPU (\d+):", proc.stdout, re.MULTILINE))
    return (ids, "from nvidia-smi -L") if ids else ((), "nvidia-smi -L lists none")


# -- the Slurm allocation ----------------------------------------------------------------------------------

SlurmRun = Callable[[list[str], str], str]  # argv, what it is for -> standard output; SlurmError otherwise

# SLURM_JOB_CPUS_PER_NODE: "COUNT[(xNODES)][,COUNT[(xNODES)]...]", in node-list order ("72(x2),36").
_CPUS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")
# `scontrol show job -d` gives one line per run of nodes allocated alike (-o: all on one line), such as
#   Nodes=n[1-2] CPU_IDs=0-3 Mem=1000 GRES=gpu:a100:2(IDX:0-1)
# GRES lists each kind NAME[:TYPE]:COUNT(IDX:INDICES), comma-separated, or NAME[:TYPE](CNT:COUNT) for
# devices without an index; it is empty for none; older releases print GRES=gpu(IDX:0-1) or GRES_IDX=.
_DETAIL = re.compile(r"(?<!\S)Nodes=(\S+)\s+CPU_IDs=\S+\s+Mem=\d+(?:\s+GRES(?:_IDX)?=(\S*))?")
_GRES = re.compile(r"([^\s,:()]+)(?::[^\s,()]*)?\((IDX|CNT):([^)]*)\)")


def cpus_per_node(text: str, nodes: int) -> tuple[int, ...]:
    """``SLURM_JOB_CPUS_PER_NODE`` expanded, one count per node: ``72(x2),36`` is ``(72, 72, 36)``.
    ``ValueError`` when it is not that form or does not give ``nodes`` counts (checked before expanding)."""
    runs = []
    for item in text.split(","):
        m = _CPUS_ITEM.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"{item.strip()!r} is neither a CPU count nor COUNT(xNODES)")
        runs.append((int(m[1]), int(m[2] or 1)))
    if (total := sum(n for _, n in runs)) != nodes:
        raise ValueError(f"it counts {_count(total, 'node')}, the node list {nodes:,}")
    return tuple(c for c, n in runs for _ in range(n))


def job_gpus(detail: str) -> list[tuple[str, tuple[str, ...]]]:
    """From ``scontrol show job -d``: each run of nodes (a hostlist expression) with the GPU indices the
    job has on each of them; runs without GPUs are left out."""
    found = []
    for m in _DETAIL.finditer(detail):
        ids: list[str] = []
        for g in _GRES.finditer(m[2] or ""):
            if g[1] != "gpu" or g[3] == "N/A":
                continue
            if g[2] == "CNT":
                raise SlurmError(f"the job's GPUs on {m[1]} have no device index (GRES={m[2]}), so they cannot be "
                                 "told apart: declare them in execution.inventory")
            ids += _indices(g[3], m[0])
        if ids:
            found.append((m[1], tuple(ids)))
    return found


def _indices(text: str, line: str) -> list[str]:
    """``0-1,3`` -> ``["0", "1", "3"]``."""
    out = []
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit():
            raise SlurmError(f"scontrol show job -d: cannot read the GPU indices {text!r} in {line!r}")
        out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm(env: Mapping[str, str] = os.environ, *, run: SlurmRun = client.run) -> Inventory | None:
    """The allocation the runner is in (None outside one, without ``SLURM_JOB_ID``): its nodes from
    ``SLURM_JOB_NODELIST``, their CPUs from ``SLURM_JOB_CPUS_PER_NODE``, their memory from
    ``SLURM_MEM_PER_NODE`` (or ``SLURM_MEM_PER_CPU`` times their CPUs), their GPUs from ``scontrol show
    job -d``. ``SlurmError`` when one of them is missing or unreadable, or scontrol fails."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    nodelist = _variable(env, "SLURM_JOB_NODELIST")
    names = run(["scontrol", "show", "hostnames", nodelist], "reading the allocation's nodes").split()
    try:
        cpus = cpus_per_node(_variable(env, "SLURM_JOB_CPUS_PER_NODE"), len(names))
    except ValueError as exc:
        raise SlurmError(f"SLURM_JOB_CPUS_PER_NODE={env['SLURM_JOB_CPUS_PER_NODE']!r} is not the CPUs of "
                         f"SLURM_JOB_NODELIST={nodelist!r}: {exc}") from None
    per_node, per_cpu = _megabytes(env, "SLURM_MEM_PER_NODE"), _megabytes(env, "SLURM_MEM_PER_CPU")
    gpus: dict[str, tuple[str, ...]] = {}
    for hosts, ids in job_gpus(run(["scontrol", "show", "job", "-d", job_id], f"reading job {job_id}'s GPUs")):
        expanded = (hosts.split(",") if "[" not in hosts
                    else run(["scontrol", "show", "hostnames", hosts], "reading the allocation's nodes").split())
        gpus.update(dict.fromkeys(expanded, ids))
    nodes = tuple(Node(name, c, gpus.get(name, ()), per_node if per_node is not None else
                       per_cpu * c if per_cpu is not None else None) for name, c in zip(names, cpus, strict=True))
    return Inventory(nodes, Source.SLURM)


def _variable(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SlurmError(f"SLURM_JOB_ID={env['SLURM_JOB_ID']} is set but {name} is not: the Slurm job's "
                         "environment is incomplete")
    return value


def _megabytes(env: Mapping[str, str], name: str) -> int | None:
    """A memory variable in MB; None when unset or 0 (``--mem=0``: all of each node, amount not given)."""
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise SlurmError(f"{name}={value!r} is not a number of MB")
    return int(value) or None


def discover(env: Mapping[str, str] = os.environ, declared_inventory: Inventory | None = None, *,
             run: Run = run_command, slurm_run: SlurmRun = client.run) -> Inventory:
    """The declared inventory when there is one; else the Slurm allocation's inside one; else this machine's."""
    if declared_inventory is not None:
        return declared_inventory
    allocation = slurm(env, run=slurm_run)
    return allocation if allocation is not None else local(env, run=run)
