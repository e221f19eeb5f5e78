"""Why each task of a run ran: the reason ``status --explain`` (and ``run --dry-run``) gives before the run,
kept as the run starts in ``RUN_DIR/journal/why.json`` (the latest run's; each run replaces it), so that
the report says the same after the run, when the journals say the task is up to date.

A task with no record in the journals "never ran": only the others are listed, so a first run of 10^6 tasks
writes a file of a few bytes and looks at no task."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from cmbagent_batch.execute.prepare import Prepared, stale_tasks, why_rerun
from cmbagent_batch.rundir.atomic import write_json_atomic
from cmbagent_batch.rundir.layout import journal_dir, read_json

NEVER_RAN = "never ran"  # prepare.why_rerun's reason for a task that has no record
FILE = "why.json"


def record_reasons(p: Prepared, selected: Iterable[str] | None, stale: set[str] | None = None) -> dict[str, str]:
    """Why each task the run is about to run (``stale``, default ``stale_tasks``; of ``selected`` when
    given) runs, kept in ``journal/why.json`` under the run's id; returns the reasons of the tasks that
    have a record."""
    stale = stale_tasks(p) if stale is None else stale
    wanted = stale if selected is None else stale & set(selected)
    known = [tid for tid in wanted if p.history.get(tid) is not None] if len(p.history) else []
    reasons = {tid: why_rerun(p, tid) or "" for tid in sorted(known)}
    os.makedirs(journal_dir(p.run_dir), exist_ok=True)
    write_json_atomic(os.path.join(journal_dir(p.run_dir), FILE),
                      {"run_id": p.run_id, "otherwise": NEVER_RAN, "tasks": reasons})
    return reasons


class Reasons:
    """The reasons kept for run ``run_id`` (none when the file is another run's, or missing)."""

    def __init__(self, run_dir: str, run_id: str) -> None:
        try:
            data: Any = read_json(os.path.join(journal_dir(run_dir), FILE))
        except (OSError, ValueError):
            data = None
        ok = isinstance(data, dict) and data.get("run_id") == run_id and isinstance(data.get("tasks"), dict)
        self.known = ok
        self._tasks: dict[str, str] = data["tasks"] if ok else {}
        self._otherwise = str(data.get("otherwise") or NEVER_RAN) if ok else ""

    def of(self, tid: str) -> str:
        """Why the run ran ``tid`` ("" when not kept)."""
        return self._tasks.get(tid, self._otherwise)
