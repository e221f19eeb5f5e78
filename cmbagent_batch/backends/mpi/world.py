"""Running a program in every rank of an MPI job: rank 0 gets a ``RankExecutor``, the others serve it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cmbagent_batch.backends.mpi.executor import RankExecutor
from cmbagent_batch.backends.mpi.wire import load_mpi
from cmbagent_batch.backends.mpi.worker import serve
from cmbagent_batch.errors import NoWorkerRanks


def world() -> tuple[Any, int, int]:
    """``(MPI.COMM_WORLD, rank, size)``, initialising MPI if it is not yet (``MPIUnavailable`` without
    mpi4py)."""
    comm = load_mpi().COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def run_in_world(main: Callable[[RankExecutor], int], slots_per_rank: int,
                 on_stop: Callable[[], None] | None = None, **executor_options: Any) -> int:
    """Call ``main(executor)`` on rank 0 and return what it returns; serve it on every other rank
    (returning 0 there). Every rank of the job must call this. ``executor_options``: the
    ``RankExecutor``'s keyword arguments (``ahead``, ``least``, ``cover``).

    On rank 0 the executor is shut down when ``main`` returns; if ``main`` raises (Ctrl-C included),
    the workers are told to stop their running calls, queued calls are cancelled, and the exception
    propagates once the workers have left their loops. Workers ignore SIGINT while serving: stopping
    is rank 0's decision (Hydra's ``mpiexec`` passes Ctrl-C to every rank).

    Raises ``NoWorkerRanks`` on every rank of a job with a single rank (e.g. started without
    ``mpiexec``): the caller then runs its tasks locally. Raises ``MPIUnavailable`` without mpi4py.
    """
    comm, rank, size = world()
    if size < 2:
        raise NoWorkerRanks()
    own = comm.Dup()  # our messages never meet those of code that uses COMM_WORLD itself
    try:
        if rank != 0:
            with _sigint_ignored():
                serve(own, slots_per_rank, on_stop=on_stop)
            return 0
        executor = RankExecutor(own, slots_per_rank, **executor_options)
        try:
            result = main(executor)
        except BaseException:
            executor.stop_tasks()
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        executor.shutdown(wait=True)
        return result
    finally:
        own.Free()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
