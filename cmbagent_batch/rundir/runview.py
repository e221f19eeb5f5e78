"""A run's tasks as its readers see them (``status``, the Slurm after-step, a script): run.json's
summary, the journals' history with the run's table (``history.py``), and where each task's directories
are (``layout.Layout``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from cmbagent_batch.rundir.history import History, load_history
from cmbagent_batch.rundir.layout import Layout, journal_dir, journal_paths, read_json
from cmbagent_batch.states import TaskState

# The states whose row says why (and whose stderr's end status shows).
UP_TO_DATE = "succeeded in an earlier run; unchanged"  # why a task that is up to date is skipped
TROUBLED = frozenset({TaskState.FAILED, TaskState.INTERRUPTED, TaskState.CANCELLED, TaskState.UPSTREAM_FAILED,
                      TaskState.BUDGET_EXCEEDED})


# The measures a success record leaves out when they are 0 (``execute/manifest.py``'s ``Recorder``).
_ZERO_LEFT_OUT = ("cpu_s", "work_bytes", "output_bytes")


def run_history(run_dir: str, manifest: dict[str, Any], warn: Callable[[str], None] | None = None) -> History:
    """The journals' history, with the table of the run ``manifest`` (run.json) describes: the index's,
    or, for a run.json of format 1, the one its "tasks" list."""
    history = load_history(journal_dir(run_dir), journal_paths(run_dir), warn)
    run_id = manifest.get("run_id")
    if history.run_id == run_id:
        return history
    listed = manifest.get("tasks")
    if isinstance(listed, dict):  # written by an earlier version: every task in run.json
        history.plan_run(str(run_id), (((tid,), _state(t.get("state")), t.get("reason") or "")
                                       for tid, t in listed.items()))
    else:  # the index of that run is gone: the tasks the journals know
        if warn is not None and history.ids:
            warn(f"{os.path.join(journal_dir(run_dir), 'index')} is not that of run {run_id}: the tasks "
                 "the run skipped without running them are not counted")
        history.plan_run(str(run_id), [([tid for i, tid in enumerate(history.ids) if history.state_of(i) is not None],
                                         TaskState.PENDING, "")])
    return history


def _state(value: Any) -> TaskState:
    try:
        return TaskState(value)
    except ValueError:
        return TaskState.INTERRUPTED


def current_states(history: History, runner_gone: bool) -> Iterator[tuple[int, TaskState]]:
    """Each task of the run (its position) and its state now: its last journal record's, else the
    state the run gave it as it started; one running when its runner is gone (killed without a word)
    was interrupted. ``status`` and the Slurm after-step count tasks with it, so both say the same."""
    for i in history.run_tasks():
        state = history.state_of(i) or history.planned_of(i)
        assert state is not None
        yield i, TaskState.INTERRUPTED if runner_gone and state is TaskState.RUNNING else state


def task_row(history: History, i: int, state: TaskState, layout: Layout, detail: bool = False,
             placed: bool = False) -> dict[str, Any]:
    """What is known of task ``i``: the run's view (id, state, attempts, rank, wall_s, work_dir, reason);
    ``detail``: also what its last record says (host, cpu_s, peak_rss_mb, work_bytes, output_bytes,
    fingerprint, error), read from its journal. ``placed``: the run booked its inventory, and its last
    record says where the task ran however it ended (read for each task listed)."""
    tid = history.ids[i]
    rank = history.rank[i]
    row: dict[str, Any] = {"id": tid, "state": state.value, "attempts": history.attempts[i],
                           "rank": rank if rank >= 0 else 0, "wall_s": history.wall_of(i),
                           "work_dir": layout.work_dir(max(rank, 0), tid)}
    record = history.record(i) if (detail or placed or state in TROUBLED
                                   or state is TaskState.RUNNING) else {}
    if isinstance(record.get("work_dir"), str):
        row["work_dir"] = record["work_dir"]
    if isinstance(record.get("placement"), dict):  # a job that books its inventory: where it ran, and how
        row["placement"] = record["placement"]
        row["launch"] = record.get("launch")
        if record.get("steps"):  # the Slurm job steps its $CMBAGENT_LAUNCH started
            row["steps"] = record["steps"]
    if history.in_run(i) or history.planned_of(i) is not state:  # its record says why
        row["reason"] = record.get("reason") or record.get("error") or None
    else:  # as the run planned it: skipped (and why), or pending
        row["reason"] = history.notes[history.note[i]] or None
    if detail:
        zeros = _ZERO_LEFT_OUT if "parts" in record else ()  # a success record that leaves its zeros out
        for key in ("host", "cpu_s", "peak_rss_mb", "work_bytes", "output_bytes", "exit_code", "timed_out"):
            row[key] = record.get(key, 0 if key in zeros else None)
        row["fingerprint"] = history.fp_of(i)
    return row


def run_tasks(run_dir: str, warn: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every task of the run in ``run_dir`` with its detail (``task_row``), by id: the per-task view that
    run.json held before it became a summary. Reads each task's last record: for a script or a test,
    not for 10^6 tasks."""
    manifest = read_json(os.path.join(run_dir, "run.json"))
    history = run_history(run_dir, manifest, warn)
    layout = Layout.of(os.path.abspath(run_dir))
    try:
        rows = {history.ids[i]: task_row(history, i, _run_state(history, i), layout, detail=True)
                for i in history.run_tasks()}
    finally:
        history.close()
    for row in rows.values():  # a local run's records leave the host out: the runner's
        row["host"] = row["host"] or manifest.get("host")
    return rows


def _run_state(history: History, i: int) -> TaskState:
    """The state the run left the task in: its record's if the run journaled one, else the state the
    run gave it as it started (skipped, or pending)."""
    state = history.state_of(i) if history.in_run(i) else None
    planned = history.planned_of(i)
    assert planned is not None
    return state or planned
