"""Where attempts run: local pools (threads, and worker processes for python tasks) or the worker
ranks of an MPI job. ``make_backend`` is the one place that picks; the scheduler sees only its pools.

The backends are imported when a backend is made, so importing ``cmbagent_batch.backends.mpi`` (or this
package) stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmbagent_batch.backends.local import LocalPools
    from cmbagent_batch.backends.mpi.executor import RankExecutor
    from cmbagent_batch.backends.ranks import RankPools
    from cmbagent_batch.spec.model import ExecutionSpec


@dataclass(frozen=True)
class Backend:
    """The pools a run's attempts go to, and what the run needs to know of them."""

    pools: LocalPools | RankPools
    name: str  # "local" | "mpi" (run.json's "backend")
    processes: int  # processes of the job: 1, or the MPI ranks (run.json's "ranks")
    workers: int  # attempts that run at once (1 when ``execution.mode`` is sequential)
    memory_in_use: Callable[[], float]  # fraction of the memory in use where the attempts run
    prefetch_kinds: frozenset[str]  # kinds whose attempts may be handed over ahead of a free worker


def make_backend(ex: ExecutionSpec, ranks: RankExecutor | None = None, booked_cpus: int | None = None) -> Backend:
    """Local pools sized from ``ex``, or, given rank 0's ``ranks`` executor, pools over the worker ranks.
    ``booked_cpus``: the CPUs of the inventory a job books; on worker ranks, as many tasks as that run at
    once (each books one CPU at least), where the booking puts them."""
    sequential = ex.mode == "sequential"
    if ranks is not None:
        from cmbagent_batch.backends.ranks import RankPools

        rank_pools = RankPools(ranks, ex.tasks_per_rank, booked_cpus)
        kinds = frozenset() if sequential else rank_pools.prefetch_kinds()
        # The memory in use on rank 0's node says nothing of the workers' nodes.
        return Backend(rank_pools, "mpi", len(ranks.workers) + 1, 1 if sequential else rank_pools.workers,
                       _nothing_in_use, kinds)
    from cmbagent_batch.backends.local import LocalPools
    from cmbagent_batch.spec.model import Isolation

    workers = 1 if sequential else ex.max_workers or default_workers(ex.max_memory_mb)
    local = LocalPools(workers, ex.isolation is Isolation.PROCESS)
    return Backend(local, "local", 1, workers, memory_in_use, frozenset() if sequential else local.prefetch_kinds())


def default_workers(memory_per_worker_mb: float | None) -> int:
    """Workers from CPUs and, when a per-worker memory is set, from available memory."""
    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_per_worker_mb:
        by_memory = int(psutil.virtual_memory().available / (memory_per_worker_mb * 1024 * 1024))
        return max(1, min(cpus, by_memory))
    return max(1, cpus)


def memory_in_use() -> float:
    """The fraction of this node's memory in use now."""
    import psutil

    return float(psutil.virtual_memory().percent) / 100.0


def _nothing_in_use() -> float:
    return 0.0
