"""The MPI backend: one job's worker ranks as a ``concurrent.futures.Executor`` on rank 0.

Rank 0 runs the scheduler with a :class:`RankExecutor`; ranks 1..N-1 run :func:`serve`, each running up
to ``slots_per_rank`` calls at once in threads. :func:`run_in_world` sets both up. Importing this package
needs no mpi4py; calling into it without mpi4py raises :class:`MPIUnavailable`, which says what to
install. mpi4py is imported (and MPI initialised) only then.

Why not ``mpi4py.futures``: its workers run one call at a time, and it has no way to tell the workers to
terminate their running calls (walltime, Ctrl-C) without shutting down.
"""

from __future__ import annotations

from cmbagent_batch.backends.mpi.executor import RankExecutor, RankFuture
from cmbagent_batch.backends.mpi.failures import (
    BrokenRankExecutor,
    RemoteTaskError,
    WorkerTraceback,
)
from cmbagent_batch.backends.mpi.worker import serve
from cmbagent_batch.backends.mpi.world import run_in_world, world
from cmbagent_batch.errors import MISSING_MPI4PY, MPIUnavailable, NoWorkerRanks

__all__ = [
    "MISSING_MPI4PY",
    "BrokenRankExecutor",
    "MPIUnavailable",
    "NoWorkerRanks",
    "RankExecutor",
    "RankFuture",
    "RemoteTaskError",
    "WorkerTraceback",
    "run_in_world",
    "serve",
    "world",
]
