"""``serve``: the loop of a worker rank, running the calls rank 0's ``RankExecutor`` sends it.

The calling thread is the only one of the process that talks MPI: it receives calls, hands them to a
thread pool of ``slots_per_rank`` threads (rank 0 sends calls ahead, which wait in the pool's queue so
that a thread never waits a round trip for its next call), and sends back what those threads leave in a
queue. A stop or a hold cancels the calls that have not started (and calls ``on_stop`` or ``on_hold``). It
sleeps on that queue between polls (see ``wire.PollWait``), so a finished call is sent at once.

A signal handled while it sleeps there could leave it asleep past its timeout, until a call ends (a
hold from rank 0 would then wait too): ``SimpleQueue.get(timeout=...)`` waits with no deadline once a
signal handler has run during the wait and the timeout has passed (seen with CPython 3.11). So the
handlers ``serve`` installs (``on_signal``) also put a wake-up in that queue.
"""

from __future__ import annotations

import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from cmbagent_batch.backends.mpi.failures import encode_failure
from cmbagent_batch.backends.mpi.wire import HEADER, Link, PollWait, Tag, load_mpi

_Outcome = tuple[Tag, bytes]  # RESULT, FAILURE, NOT_STARTED or STARTED, with the call id in front


def serve(comm: Any, slots_per_rank: int, *, on_stop: Callable[[], None] | None = None,
          on_hold: Callable[[], None] | None = None,
          on_signal: Mapping[int, Callable[[], None]] | None = None, about: str = "") -> None:
    """Run the calls rank 0 sends over ``comm``, ``slots_per_rank`` at a time, until rank 0 says shutdown.

    ``on_stop`` is called on this (the MPI) thread when rank 0 asks to terminate the running calls: it
    should make them end soon (e.g. kill their subprocesses) and return promptly, and leave a state that
    a call just starting also sees (it may have been received before the stop, and not be running yet).
    An exception from it is printed to stderr and the loop goes on. When rank 0 asks to hold, the calls
    received that have not started are answered ``NOT_STARTED``, ``on_hold`` is called (on this thread:
    it should keep the running calls from starting what they hold back, and return promptly), and the
    running ones go on. Returns once rank 0 has said shutdown and every call this rank received has ended
    and its outcome is sent.

    ``on_signal``: what this rank does when it gets each of these signals (say ``{SIGTERM: on_stop}``),
    called from handlers that ``serve`` installs while it runs (when it runs on the main thread).

    Its first message, the hello, gives this rank's host and ``about`` (one line: anything rank 0 should
    know of this rank, which ``RankExecutor.hellos`` returns).

    A call that raises ``concurrent.futures.CancelledError`` goes back as not started (say, held back by
    ``on_hold``); its future on rank 0 fails with ``CancelledError`` as if the hold had found it waiting.
    A call's other exceptions, or a result that cannot be pickled, go back to rank 0 as a failure; the loop
    goes on. If rank 0 dies instead of saying shutdown, this loop waits for it: MPI launchers (Hydra,
    ``srun``) then end the whole job, which is what ends this rank.
    """
    mpi = load_mpi()
    rank = comm.Get_rank()
    if rank == 0:
        raise ValueError("serve runs on the worker ranks; rank 0 holds the RankExecutor")
    if slots_per_rank < 1:
        raise ValueError(f"slots per rank must be at least 1, not {slots_per_rank}")
    link = Link(mpi, comm)
    if "\n" in about:
        raise ValueError(f"a worker's hello is one line, not {about!r}")
    link.send(HEADER.pack(0) + f"{mpi.Get_processor_name()}\n{about}".encode(), 0, Tag.HELLO)
    done: queue.SimpleQueue[_Outcome | None] = queue.SimpleQueue()  # None: only wakes the loop
    previous = _handle_signals(on_signal or {}, lambda: done.put(None))
    pool = ThreadPoolExecutor(slots_per_rank, thread_name_prefix=f"rank{rank}-call")
    running = 0
    waiting: list[tuple[Future[None], bytes]] = []  # calls handed to the pool, with their headers
    closing = False
    poll_wait = PollWait()
    outcome: _Outcome | None = None
    try:
        while True:
            busy = False
            while (msg := link.receive(0)) is not None:
                busy = True
                _, tag, data = msg
                if tag == Tag.CALL:
                    waiting = [(f, h) for f, h in waiting if not f.done()]
                    waiting.append((pool.submit(_call, data, done.put), bytes(data[:HEADER.size])))
                    running += 1
                elif tag in (Tag.STOP, Tag.HOLD):
                    for future, head in waiting:  # sent ahead, not started: they never start
                        if future.cancel():
                            done.put((Tag.NOT_STARTED, head))
                    waiting = []
                    _call_hook(on_stop if tag == Tag.STOP else on_hold, rank)
                elif tag == Tag.SHUTDOWN:
                    closing = True
            if outcome is None:
                outcome = _next(done)
            while outcome is not None:
                link.send(outcome[1], 0, outcome[0])
                if outcome[0] is not Tag.STARTED:  # a start is not an end
                    running -= 1
                busy = True
                outcome = _next(done)
            link.progress()
            if closing and not running and not link.sending:
                return
            if busy:
                poll_wait.reset()
            try:
                outcome = done.get(timeout=poll_wait.next())
            except queue.Empty:
                outcome = None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _handle_signals(actions: Mapping[int, Callable[[], None]], wake: Callable[[], None]) -> dict[int, Any]:
    """Install a handler for each signal that does its action, then wakes the loop; return the
    handlers it replaced (none off the main thread, where Python cannot set any)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(action: Callable[[], None]) -> Callable[[int, Any], None]:
        def handle(signum: int, frame: Any) -> None:
            try:
                action()
            finally:
                wake()

        return handle

    return {signum: signal.signal(signum, handler(action)) for signum, action in actions.items()}


def _next(done: queue.SimpleQueue[_Outcome | None]) -> _Outcome | None:
    try:
        return done.get_nowait()
    except queue.Empty:
        return None


_this_call = threading.local()  # on a pool thread: how its call tells rank 0 that it started


def start_reporter() -> Callable[[], None]:
    """For the call running on this thread: what tells rank 0, once, that its work has begun (say, its
    attempt got a slot). Outside a call, it does nothing."""
    put, head = getattr(_this_call, "started", (None, b""))
    sent: list[bool] = []

    def started() -> None:
        if put is not None and not sent:
            sent.append(True)
            put((Tag.STARTED, head))

    return started


def _call(data: bytearray, put: Callable[[_Outcome], None]) -> None:
    """Run one call on a pool thread and queue its outcome, pickled, for the MPI thread."""
    head = bytes(data[:HEADER.size])
    _this_call.started = (put, head)
    try:
        fn, args, kwargs = pickle.loads(memoryview(data)[HEADER.size:])
        value = fn(*args, **kwargs)
    except CancelledError:  # the call says it did not start (e.g. a hold kept it from its slot)
        put((Tag.NOT_STARTED, head))
        return
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a call ends the call, not the worker
        put((Tag.FAILURE, head + encode_failure(exc)))
        return
    try:
        out = head + pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - PicklingError, TypeError, AttributeError, RecursionError...
        put((Tag.FAILURE, head + encode_failure(exc, prefix="cannot send the result back to rank 0: ")))
        return
    put((Tag.RESULT, out))


def _call_hook(hook: Callable[[], None] | None, rank: int) -> None:
    if hook is None:
        return
    try:
        hook()
    except Exception:  # noqa: BLE001 - the worker keeps serving; the hook's failure is shown
        print(f"cmbagent-batch: rank {rank}: the stop or hold hook failed:\n{traceback.format_exc()}",
              file=sys.stderr)
