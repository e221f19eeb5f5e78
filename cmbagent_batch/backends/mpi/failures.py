"""What goes wrong in the MPI backend, and how a worker's failure travels to rank 0.

A call that raises on a worker comes back as a :class:`RemoteTaskError` saying where it failed (rank and
host) and keeping the worker's traceback text, as mpi4py's ``futures/_core.py`` (``_format_exc``) does.
Its ``__cause__`` is the original exception when that survives a pickle round trip, and the original's
own ``__cause__`` is a :class:`WorkerTraceback`, so ``traceback.format_exc()`` on rank 0 prints the
worker's traceback first, then the original exception, then the ``RemoteTaskError``.
"""

from __future__ import annotations

import pickle
import traceback
from concurrent.futures import BrokenExecutor

__all__ = ["BrokenRankExecutor", "RemoteTaskError",
           "WorkerTraceback", "decode_failure", "encode_failure", "local_failure", "type_name"]


class BrokenRankExecutor(BrokenExecutor):
    """The thread of rank 0 that talks to the workers failed; no call can complete any more."""


class WorkerTraceback(Exception):
    """The traceback of a failure on a worker, as text, with a line saying where it was printed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class RemoteTaskError(Exception):
    """A call submitted to a worker rank raised, or its result could not be sent back.

    ``type_name`` is the original exception's class (``ValueError``, ``pkg.mod.MyError``), ``message``
    its ``str()``, ``traceback`` the worker's formatted traceback, ``rank`` and ``host`` where it ran.
    """

    def __init__(self, type_name: str, message: str, traceback: str, rank: int, host: str) -> None:
        super().__init__(type_name, message, traceback, rank, host)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.rank = rank
        self.host = host

    def __str__(self) -> str:
        what = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f"{what} [rank {self.rank} on {self.host}]"


def type_name(exc: BaseException) -> str:
    """The exception's class as a user reads it: bare for builtins, with its module otherwise."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure itself
        return f"<unprintable {type(exc).__name__}>"


def encode_failure(exc: BaseException, prefix: str = "") -> bytes:
    """The failure of a call, pickled for rank 0 (on the worker; never raises).

    Only builtins travel besides the pickled exception, which is pickled apart so that rank 0 can
    read the rest even when the exception's class cannot be rebuilt there.
    """
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # noqa: BLE001
        tb = f"{type_name(exc)}: {_text(exc)} (its traceback could not be formatted)\n"
    try:
        original: bytes | None = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - not every exception pickles (it may hold a lock, a socket...)
        original = None
    return pickle.dumps((type_name(exc), prefix + _text(exc), tb, original), pickle.HIGHEST_PROTOCOL)


def decode_failure(data: bytes | bytearray | memoryview, rank: int, host: str, size: int) -> RemoteTaskError:
    """Rebuild on rank 0 the failure that ``encode_failure`` sent from ``rank``."""
    name, message, tb, original = pickle.loads(data)
    error = RemoteTaskError(name, message, tb, rank, host)
    where = WorkerTraceback(f'\n### Worker {rank} of {size} on {host}\n"""\n{tb}"""')
    cause: BaseException | None = None
    if original is not None:
        try:
            cause = pickle.loads(original)
        except Exception:  # noqa: BLE001 - e.g. a class whose __init__ takes other arguments than its args
            cause = None
    if isinstance(cause, BaseException):
        cause.__cause__ = where  # pickling dropped the worker-side chain; the text keeps it
        error.__cause__ = cause
    else:
        error.__cause__ = where
    return error


def local_failure(exc: BaseException, what: str, rank: int, host: str) -> RemoteTaskError:
    """A failure on rank 0 about a call that ran on ``rank`` (e.g. its result cannot be unpickled here)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = RemoteTaskError(type_name(exc), f"{what}: {_text(exc)}", tb, rank, host)
    error.__cause__ = exc
    return error
