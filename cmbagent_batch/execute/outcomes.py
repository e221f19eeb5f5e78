"""What a finished submission says: one ``Outcome`` per attempt it held, whether it ran, failed in the
worker, was cancelled, or went down with a broken process pool."""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.execute.admission import Unit
from cmbagent_batch.execute.runs import Pools
from cmbagent_batch.states import OutcomeReason


class Outcomes:
    """Reads finished submissions (on the scheduler thread), and remembers how many attempts each broken
    process pool held when it broke: when several went down together, which one killed it is unknown."""

    def __init__(self, pools: Pools) -> None:
        self._pools = pools
        self._broken: dict[int, int] = {}  # broken executor -> attempts it held when it broke

    def of(self, future: Future[Any], unit: Unit, in_flight: Iterable[Unit], terminated: bool,
           ) -> tuple[list[Outcome], bool]:
        """One outcome per member of ``unit`` (every one fails alike when the submission failed), and
        whether the submission was cancelled before it started. ``in_flight``: the submissions not handled
        yet (this one included); ``terminated``: the runner has told the running attempts to end."""
        try:
            result = future.result()
            return (list(result) if unit.batch else [result]), False
        except BrokenProcessPool:
            key = id(unit.executor)
            if key not in self._broken:  # attempts the pool held when it broke (counted at its first casualty)
                self._broken[key] = sum(len(u.members) for u in in_flight if u.executor is unit.executor)
            self._pools.replace_broken(unit.executor)  # a no-op when another casualty already replaced it
            reason = OutcomeReason.TERMINATED_BY_RUNNER if terminated else OutcomeReason.WORKER_DIED
            outcome = Outcome.because(reason, worker_died=True)
        except CancelledError:  # by the executor, or by a worker that held it back (see Pools.hold)
            return [Outcome.because(OutcomeReason.CANCELLED)] * len(unit.members), True
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable argument
            outcome = Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return [outcome] * len(unit.members), False

    def several_lost(self, executor: Executor) -> bool:
        """Whether ``executor`` broke with more than one attempt in it."""
        return self._broken.get(id(executor), 0) > 1
