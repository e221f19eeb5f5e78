"""How rank 0 and the worker ranks talk: message tags, framing, receiving, sending and the poll back-off.

Every message is raw bytes (``Isend`` / matched ``Improbe`` + ``Recv``): the sender pickles, so the loop
threads only move bytes, and a payload that does not unpickle fails one call instead of a loop. Calls and
results start with an 8-byte call id. Sends never block (a blocking send of a large message to a rank
that is itself sending a large message to us would deadlock); the outbox keeps each buffer until MPI is
done with it. Receives poll with ``Improbe``: a blocking ``Recv`` or ``Waitany`` in MPICH spins a core
while it waits, and rank 0's core is also the scheduler's.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from types import ModuleType
from typing import Any

from cmbagent_batch.errors import MPIUnavailable

HEADER = struct.Struct("<Q")  # the call id in front of a call or a result

# Polling: a loop that found something polls again at once; after a quiet poll it waits POLL_MAX (on its
# queue, so a local event still wakes it at once). POLL_MAX bounds the latency a loop adds to a message
# (one poll interval at each end of a round trip) and sets the idle CPU: about 3% of a core per loop at
# 1 ms, 1.5% at 2 ms (measured with MPICH 5 on 2 cores, see bench/bench_mpi_executor.py). Waits growing
# from 1 us instead cost more than they save when ranks oversubscribe the cores, as shell tasks make them
# do: ten wake-ups in each quiet millisecond, each waiting for a core (16 shell slots over 4 ranks on 2
# cores, bench/bench_mpi.py's DAG: slots busy 80% of the makespan with them, 89% without, medians of 6).
POLL_MAX = 0.001
# A wake-up itself costs 25 to 30 us of CPU here (the timed wait and the thread switch; the probe 0.2 us),
# so a loop polling every POLL_MAX spends about 3% of a core, whatever it finds. A loop whose peers have
# work in hand (rank 0, when every worker holds a call waiting behind each it runs) has nothing urgent to
# hear for a while: the caller says how long (``PollWait.next``), and it waits that long, at most
# POLL_RELAXED (2% of the wake-ups, at 20 ms).
POLL_RELAXED = 0.02


class Tag(IntEnum):
    """Kinds of message, as MPI tags."""

    CALL = 101
    """rank 0 -> worker: call id + pickled (fn, args, kwargs)."""
    STOP = 102
    """rank 0 -> worker: terminate the running calls now (the worker's ``on_stop`` hook); the calls sent
    ahead that have not started never start."""
    SHUTDOWN = 103
    """rank 0 -> worker: leave the loop once the running calls have ended; no call follows."""
    HOLD = 104
    """rank 0 -> worker: the calls sent ahead that have not started never start; the running ones go on."""
    HELLO = 201
    """worker -> rank 0, first message: the worker's host name."""
    RESULT = 202
    """worker -> rank 0: call id + pickled return value."""
    FAILURE = 203
    """worker -> rank 0: call id + pickled failure (see ``failures.encode_failure``)."""
    NOT_STARTED = 204
    """worker -> rank 0: call id; a stop or a hold kept the call from starting."""
    STARTED = 205
    """worker -> rank 0: call id; the call's work has begun (``worker.start_reporter``). Before its end."""


def load_mpi() -> ModuleType:
    """``mpi4py.MPI``, imported now (initialising MPI), or ``MPIUnavailable`` saying what to install."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise MPIUnavailable() from None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # mpi4py there, but no MPI library it can load
        raise MPIUnavailable(f"mpi4py cannot load an MPI library: {exc}") from exc
    return MPI


class PollWait:
    """How long a loop waits before its next poll: nothing right after a poll that found something
    (``reset``), else ``longest`` seconds (``POLL_MAX`` when not given, read when the loop starts), or as
    long as the caller says nothing it may hear is urgent, from ``longest`` to ``most`` seconds
    (``POLL_RELAXED``)."""

    def __init__(self, longest: float | None = None, most: float | None = None) -> None:
        self.longest = POLL_MAX if longest is None else longest
        self.most = max(self.longest, POLL_RELAXED if most is None else most)
        self._found = True

    def reset(self) -> None:
        self._found = True

    def next(self, relaxed: float | None = None) -> float:
        """How long to wait now; ``relaxed``: how long nothing the loop may hear is urgent (None: from now)."""
        if self._found:
            self._found = False
            return 0.0
        return self.longest if relaxed is None else min(self.most, max(self.longest, relaxed))


class Link:
    """One rank's end of the traffic on ``comm``: non-blocking sends and polled receives."""

    def __init__(self, mpi: ModuleType, comm: Any) -> None:
        self._mpi = mpi
        self._comm = comm
        self._status = mpi.Status()
        self._sending: list[Any] = []  # requests not complete yet
        self._buffers: list[bytes] = []  # their buffers, alive until then

    def send(self, data: bytes, dest: int, tag: Tag) -> None:
        req = self._comm.Isend([data, self._mpi.BYTE], dest, int(tag))
        if not req.Test():  # small messages are usually done at once (eager protocol)
            self._sending.append(req)
            self._buffers.append(data)

    def progress(self) -> None:
        """Let MPI move pending sends along and forget those that are complete."""
        if not self._sending:
            return
        done = self._mpi.Request.Testsome(self._sending)
        if done:
            gone = set(done)
            self._sending = [r for i, r in enumerate(self._sending) if i not in gone]
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in gone]

    @property
    def sending(self) -> int:
        """How many sends are not complete yet."""
        return len(self._sending)

    def receive(self, source: int) -> tuple[int, int, bytearray] | None:
        """The next message from ``source`` (``MPI.ANY_SOURCE`` for any) as (source, tag, bytes), or None."""
        status = self._status
        msg = self._comm.Improbe(source, self._mpi.ANY_TAG, status)
        if msg is None:
            return None
        buf = bytearray(status.Get_count(self._mpi.BYTE))
        msg.Recv([buf, self._mpi.BYTE])
        return status.Get_source(), status.Get_tag(), buf
