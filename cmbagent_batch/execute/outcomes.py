"""What a finished submission says: one ``Outcome`` per attempt it held, whether it ran, failed in the
worker, or was cancelled."""

from __future__ import annotations

import traceback
from concurrent.futures import CancelledError, Future
from typing import Any

from cmbagent_batch.attempt import Outcome
from cmbagent_batch.execute.admission import Unit
from cmbagent_batch.states import OutcomeReason


def outcomes_of(future: Future[Any], unit: Unit) -> tuple[list[Outcome], bool]:
    """One outcome per member of ``unit`` (every one fails alike when the submission failed), and whether
    the submission was cancelled before it started."""
    try:
        result = future.result()
        return (list(result) if unit.batch else [result]), False
    except CancelledError:  # by the executor, or by a worker that held it back (see Pools.hold)
        return [Outcome.because(OutcomeReason.CANCELLED)] * len(unit.members), True
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable argument
        outcome = Outcome(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return [outcome] * len(unit.members), False
