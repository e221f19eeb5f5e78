"""``RankExecutor``: rank 0's ``concurrent.futures.Executor`` over the worker ranks of one MPI job.

The caller's threads only pickle a call and hand it to one communication thread through a queue; that
thread alone talks MPI (so MPI_THREAD_SERIALIZED is enough, MPI_THREAD_MULTIPLE is not relied on). It
sends each call to the least loaded worker with a free slot, the highest priority first
(``submit_with_priority``; submission order among equals), and completes the futures as results come
back. It sleeps on its queue between polls (see ``wire.PollWait``), so a submit wakes it at once, but
while every worker is full (``full``: a new call is not urgent then, and waits for its next look). While
calls are in flight it costs up to a few percent of a core (a tenth of that while the workers are full),
and nothing when none is.

``stop_tasks`` and ``hold_tasks`` keep what has not started from starting: the calls queued here are
cancelled, those sent ahead to a worker come back failed with ``CancelledError``; a stop also
terminates the running calls, a hold lets them go on.

A call may be bound to a node (``submit_call(..., node=NAME)``, after ``route``): it then goes to the
least loaded worker of those ``route`` gave for that node, and waits on rank 0 while they are all full,
without holding back the calls for other nodes (each node's waiting calls are kept apart, most urgent
first). That is how a task placed on a node by rank 0's booking runs there.
"""

from __future__ import annotations

import heapq
import itertools
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cmbagent_batch.backends.mpi.failures import BrokenRankExecutor, decode_failure, local_failure
from cmbagent_batch.backends.mpi.slots import Pace, SlotTable
from cmbagent_batch.backends.mpi.wire import HEADER, Link, PollWait, Tag, load_mpi
from cmbagent_batch.errors import NoWorkerRanks

T = TypeVar("T")


AHEAD = 1  # calls sent to a worker beyond its slots, unless told otherwise
GAP_KNOWN = 16  # calls ended before their pace sets how long the thread may poll for none (``full``)


class RankFuture(Future[T]):
    """A ``Future`` that says where its call ran: ``rank`` is set when the call is sent to a worker
    (None while queued, or if cancelled before), ``host`` when its outcome arrives. A call sent to a
    worker that a stop or a hold kept from starting there fails with ``CancelledError``."""

    def __init__(self) -> None:
        super().__init__()
        self.rank: int | None = None
        self.host: str | None = None
        self.on_started: Callable[[], None] | None = None  # called when its worker says it started


@dataclass(slots=True, order=True)
class _Call:
    key: tuple[float, int]  # (-priority, call id): rank 0 sends the most urgent queued call first
    future: RankFuture[Any] = field(compare=False)
    payload: bytes = field(compare=False)  # call id + pickled (fn, args, kwargs)
    node: str | None = field(compare=False, default=None)  # the node it must run on (``route``)

    @property
    def id(self) -> int:
        return self.key[1]


@dataclass(frozen=True, slots=True)
class _Shutdown:
    cancel_futures: bool


_STOP = "stop"  # inbox item: cancel the queued calls, send stop-tasks to every worker
_HOLD = "hold"  # inbox item: cancel the queued calls, send hold to every worker


class RankExecutor(Executor):
    """Runs calls on the worker ranks (1..size-1) of ``comm``; create it on rank 0 only, while every
    other rank runs ``serve(comm, slots_per_rank)``.

    ``comm`` is used by this executor alone from now on (``run_in_world`` gives it a duplicate of
    COMM_WORLD); ``slots_per_rank`` must be the value the workers serve with; ``ahead``: calls sent to
    each worker beyond its slots, to wait there for a free one. With ``cover`` (seconds), a worker holds
    only ``least`` calls plus as many as it ends in ``cover`` seconds at the workers' recent pace, at most
    ``slots_per_rank + ahead`` (``slots.Pace``): short calls are sent far ahead, long ones are not kept
    waiting behind each other on one rank while another has a free slot. ``full``: the calls a worker
    holds when one waits there behind each call it runs. While every worker holds that many, an end heard
    late leaves no slot idle as long as the next end on that worker has not come too: the thread then
    polls every half of the time between two ends on a worker, at the workers' recent pace (from
    ``wire.POLL_MAX`` to ``wire.POLL_RELAXED``), instead of every ``POLL_MAX`` (0: always ``POLL_MAX``),
    and a call submitted meanwhile waits for its next poll. Future callbacks run on the communication
    thread: they must be quick and must not wait for other futures of this executor.
    Shut it down before MPI is finalised (``run_in_world`` does; so does ``with``): its thread is a
    daemon, and the workers leave their loops only when told.
    """

    def __init__(self, comm: Any, slots_per_rank: int, ahead: int = AHEAD, *, least: int = 1,
                 cover: float = 0.0, full: int = 0) -> None:
        mpi = load_mpi()
        if comm.Get_rank() != 0:
            raise ValueError(f"RankExecutor belongs on rank 0, not on rank {comm.Get_rank()}")
        if comm.Get_size() < 2:
            raise NoWorkerRanks()
        if mpi.Query_thread() < mpi.THREAD_SERIALIZED:
            raise RuntimeError("RankExecutor talks MPI from a thread of its own, which needs MPI "
                               "initialised with MPI_THREAD_SERIALIZED or more (mpi4py.rc.thread_level)")
        self._size = comm.Get_size()
        self._workers = list(range(1, self._size))
        self._per_rank = slots_per_rank
        # ``ahead`` calls more than its slots go to each worker: they wait there, and start the moment a
        # slot frees, instead of a round trip later (5 to 9 ms here, a third of a typical tiny task).
        most = slots_per_rank + ahead
        self._pace = Pace(len(self._workers), least if cover > 0 else most, most, cover)  # no cover: most
        self._slots = SlotTable(self._workers, self._pace.limit())
        self._full = full
        self._link = Link(mpi, comm)
        self._any_source = mpi.ANY_SOURCE
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[_Call | _Shutdown | str] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit against shutdown, and against the thread's waking up
        # Calls submitted while the thread waits out a relaxed poll (every worker full, see ``full``): a new
        # call is not urgent then, and waits for the thread's next look instead of waking it.
        self._unwoken: deque[_Call] = deque()
        self._dozing = False  # the thread waits out a relaxed poll (set by it; cleared under ``_lock``)
        self._closed = False
        self._broken: BaseException | None = None
        # State below belongs to the communication thread.
        self._queued: list[_Call] = []  # a heap
        self._in_flight: dict[int, RankFuture[Any]] = {}
        self._hosts: dict[int, str] = {}
        self._hellos: dict[int, str] = {}  # rank -> what its hello said after the host (``hellos``)
        self._all_hello = threading.Event()
        self._routes: dict[str, list[int]] = {}  # node -> the workers that run its calls (``route``)
        self._parked: dict[str, list[_Call]] = {}  # node -> its calls waiting for one of its workers (heaps)
        self._closing = False
        self._told_to_exit = False
        self._thread = threading.Thread(target=self._serve, name="rank0-mpi", daemon=True)
        self._thread.start()

    @property
    def workers(self) -> list[int]:
        """The worker ranks, in order."""
        return list(self._workers)

    @property
    def slots(self) -> int:
        """Calls that can run at once: slots per rank times the number of workers."""
        return self._per_rank * len(self._workers)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> RankFuture[T]:
        """Queue ``fn(*args, **kwargs)`` for a worker rank. The call is pickled now: a call that cannot
        be pickled gives a future that has already failed with the pickling error."""
        return self.submit_with_priority(0.0, fn, *args, **kwargs)

    def submit_with_priority(self, priority: float, fn: Callable[..., T], /, *args: Any,
                             **kwargs: Any) -> RankFuture[T]:
        """``submit``, and of the calls still queued on rank 0 (those waiting for a free worker slot), the
        one with the highest ``priority`` is sent first; submission order among equals."""
        return self.submit_call(fn, args, kwargs, priority=priority)

    def hellos(self, timeout: float | None = None) -> dict[int, tuple[str, str]]:
        """Every worker's host and what else its hello said (``serve``'s ``about``), by rank, once all have
        said hello; ``TimeoutError`` after ``timeout`` seconds without."""
        if not self._all_hello.wait(timeout):
            missing = sorted(set(self._workers) - set(self._hosts))
            raise TimeoutError(f"worker rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                               f"did not say hello within {timeout:g} s")
        return {rank: (self._hosts[rank], self._hellos[rank]) for rank in self._workers}

    def route(self, routes: dict[str, list[int]]) -> None:
        """The workers of each node, for the calls bound to a node (``submit_call(node=...)``). Call it
        before submitting any such call."""
        unknown = sorted({r for ranks in routes.values() for r in ranks} - set(self._workers))
        if unknown or any(not ranks for ranks in routes.values()):
            raise ValueError(f"routes name no worker or unknown ranks {unknown}: {routes}")
        self._routes = {node: sorted(ranks) for node, ranks in routes.items()}

    def submit_call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                    priority: float = 0.0, on_started: Callable[[], None] | None = None,
                    node: str | None = None) -> RankFuture[T]:
        """``submit_with_priority``; ``on_started`` is called on the communication thread if the worker
        says the call started (``worker.start_reporter``): it must be quick and must not raise. ``node``:
        it runs on one of the workers ``route`` gave for that node (``ValueError`` for a node it gave none)."""
        self._check_open()
        if node is not None and node not in self._routes:
            raise ValueError(f"no worker rank is routed to node {node!r} (routes: {sorted(self._routes)})")
        future: RankFuture[T] = RankFuture()
        future.on_started = on_started
        call_id = next(self._ids)
        try:
            payload = HEADER.pack(call_id) + pickle.dumps((fn, args, kwargs or {}), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - e.g. a lambda, or an argument holding a lock
            future.set_exception(exc)
            return future
        call = _Call((-priority, call_id), future, payload, node)
        with self._lock:
            self._check_open()
            if self._dozing:
                self._unwoken.append(call)
            else:
                self._inbox.put(call)
        return future

    def _check_open(self) -> None:
        if self._broken is not None:
            raise BrokenRankExecutor(f"the MPI backend is broken: {self._broken}") from self._broken
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def stop_tasks(self) -> None:
        """Ask every worker to terminate its running calls now (its ``on_stop`` hook) and cancel the calls
        still queued here (nothing more starts); the executor keeps serving new calls. Safe from a signal
        handler."""
        self._inbox.put(_STOP)

    def hold_tasks(self) -> None:
        """Start nothing more of what was submitted so far: cancel the calls still queued here, and have
        every worker cancel the calls sent ahead to it that have not started; the running calls go on,
        and the executor keeps serving new calls. Safe from a signal handler."""
        self._inbox.put(_HOLD)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Send the calls still queued (or cancel them, with ``cancel_futures``), then tell the workers
        to leave their loops once their running calls have ended; with ``wait``, return when all the
        results are in and the communication thread has ended."""
        with self._lock:
            self._closed = True
            self._inbox.put(_Shutdown(cancel_futures))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # The communication thread.

    def _serve(self) -> None:
        # Signals go to the other threads: a handler run while this one waits on its inbox could leave
        # it asleep past the wait's timeout, until the next submission (SimpleQueue.get in CPython 3.11).
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every future must learn that nothing will come
            self._break(exc)

    def _loop(self) -> None:
        poll_wait = PollWait()
        item: _Call | _Shutdown | str | None = None
        while True:
            busy = self._take(item)
            busy |= self._dispatch()
            if self._receive():  # results free slots: send what waits for them before sleeping
                busy = True
                self._dispatch()
            self._link.progress()
            if self._closing and not self._queued and not self._parked and not self._told_to_exit:
                for rank in self._workers:
                    self._link.send(HEADER.pack(0), rank, Tag.SHUTDOWN)
                self._told_to_exit = True
            if (self._told_to_exit and not self._in_flight and not self._link.sending
                    and len(self._hosts) == len(self._workers)):
                return  # every worker has said hello: nothing of theirs is left unreceived
            if busy:
                poll_wait.reset()
            # Workers only answer: with nothing in flight nor unsent, there is nothing to poll for.
            expecting = bool(self._in_flight) or self._link.sending > 0 or len(self._hosts) < len(self._workers)
            relaxed = self._relaxed() if expecting else None
            timeout = poll_wait.next(relaxed) if expecting else None
            self._dozing = relaxed is not None and bool(timeout)
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if self._dozing:  # from now on a submit wakes the thread; what came before is taken next
                with self._lock:
                    self._dozing = False

    def _relaxed(self) -> float | None:
        """How long no message is urgent: while every worker is full, half the time between two ends on a
        worker. None (urgent now): some worker may have a slot free soon, or has not said hello, or the
        workers are being told to leave, or their pace is not known yet."""
        if (not self._full or self._slots.least_load() < self._full or self._closing
                or len(self._hosts) < len(self._workers)):
            return None
        gap = self._pace.gap(known=GAP_KNOWN)
        return None if gap is None else gap / 2

    def _take(self, item: _Call | _Shutdown | str | None) -> bool:
        """Handle ``item`` and whatever else the caller has put in the inbox (the calls that did not wake
        the thread first); True if there was any."""
        took = bool(self._unwoken)
        while self._unwoken:
            heapq.heappush(self._queued, self._unwoken.popleft())
        if item is None:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return took
        while item is not None:
            if isinstance(item, _Call):
                heapq.heappush(self._queued, item)
            elif isinstance(item, _Shutdown):
                self._closing = True
                if item.cancel_futures:
                    self._cancel_queued()
            else:  # _STOP or _HOLD; a worker told to exit that has no call here may have left its loop already
                self._cancel_queued()  # both mean: start nothing more
                for rank in self._workers:
                    if not self._told_to_exit or self._slots.load(rank):
                        self._link.send(HEADER.pack(0), rank, Tag.STOP if item == _STOP else Tag.HOLD)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
        return True

    def _cancel_queued(self) -> None:
        while self._queued:
            _cancel(heapq.heappop(self._queued).future)
        for parked in self._parked.values():
            for call in parked:
                _cancel(call.future)
        self._parked.clear()

    def _dispatch(self) -> bool:
        """Send queued calls, the most urgent first, while some worker has a free slot; a call bound to a
        node whose workers are all full waits apart (``_parked``), and goes first when one of them frees."""
        sent = self._dispatch_parked() if self._parked else False
        while self._queued and self._slots.room():
            call = heapq.heappop(self._queued)
            rank = self._slots.take() if call.node is None else self._slots.take_among(self._routes[call.node])
            if rank is None:  # its node's workers are all full (only a call bound to a node waits so)
                assert call.node is not None
                heapq.heappush(self._parked.setdefault(call.node, []), call)
                continue
            sent |= self._send(call, rank)
        return sent

    def _dispatch_parked(self) -> bool:
        sent = False
        for node in list(self._parked):
            parked = self._parked[node]
            while parked and (rank := self._slots.take_among(self._routes[node])) is not None:
                sent |= self._send(heapq.heappop(parked), rank)
            if not parked:
                del self._parked[node]
        return sent

    def _send(self, call: _Call, rank: int) -> bool:
        """Send ``call`` to ``rank``, whose slot it took; False (the slot given back) if it was cancelled
        while queued."""
        if not call.future.set_running_or_notify_cancel():
            self._slots.give(rank)
            return False
        call.future.rank = rank
        self._in_flight[call.id] = call.future
        self._link.send(call.payload, rank, Tag.CALL)
        return True

    def _receive(self) -> bool:
        got = False
        while (msg := self._link.receive(self._any_source)) is not None:
            got = True
            rank, tag, data = msg
            if tag == Tag.HELLO:
                host, _, about = bytes(data[HEADER.size:]).decode().partition("\n")
                self._hosts[rank], self._hellos[rank] = host, about
                if len(self._hosts) == len(self._workers):
                    self._all_hello.set()
                continue
            (call_id,) = HEADER.unpack_from(data)
            if tag == Tag.STARTED:  # its end follows: the call stays in flight
                started = self._in_flight[call_id].on_started
                if started is not None:
                    started()
                continue
            future = self._in_flight.pop(call_id)
            self._slots.give(rank)
            self._pace.ended(time.monotonic())
            future.host = host = self._hosts.get(rank, "?")
            body = memoryview(data)[HEADER.size:]
            if tag == Tag.FAILURE:
                future.set_exception(decode_failure(body, rank, host, self._size))
                continue
            if tag == Tag.NOT_STARTED:
                future.set_exception(CancelledError(f"cancelled on rank {rank} before it started: "
                                                    "the run is stopping"))
                continue
            try:
                value = pickle.loads(body)
            except Exception as exc:  # noqa: BLE001 - e.g. its class cannot be imported on rank 0
                future.set_exception(local_failure(exc, "cannot unpickle its result on rank 0", rank, host))
            else:
                future.set_result(value)
        if got:
            self._slots.per_rank = self._pace.limit()
        return got

    def _break(self, exc: BaseException) -> None:
        """The loop failed: fail every future it held or would have taken, and refuse new calls."""
        with self._lock:
            self._broken = exc
            self._closed = True
        error = BrokenRankExecutor(f"the thread of rank 0 that talks MPI failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        futures: list[Future[Any]] = [*self._in_flight.values(), *(c.future for c in self._queued),
                                      *(c.future for c in self._unwoken),
                                      *(c.future for parked in self._parked.values() for c in parked)]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                futures.append(item.future)
        for future in futures:
            if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
                future.set_exception(error)
        print(f"cmbagent-batch: {error}", file=sys.stderr)


def _cancel(future: Future[Any]) -> None:
    """Cancel a queued call's future and wake whoever waits on it (``concurrent.futures.wait`` learns of a
    cancellation only through ``set_running_or_notify_cancel``)."""
    if future.cancel():
        future.set_running_or_notify_cancel()
