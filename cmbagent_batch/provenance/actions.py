"""One task of a run as Provenance Run Crate entities: its run (a CreateAction of its entry's tool, with
start and end, inputs and outputs, its status and error) and the step run that ordered it (a
ControlAction), with what is known of it as PropertyValues (``resourceUsage``): where it ran (rank, host,
shared by the tasks that ran there), its state and attempts, and its measures (wall and CPU seconds, peak
RSS, exit code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmbagent_batch.ledger.entry import utc_timestamp
from cmbagent_batch.provenance.vocab import MEGABYTE, SECOND, action_status, fragment, property_value, ref, refs
from cmbagent_batch.states import TaskState

_DONE = frozenset({TaskState.SUCCEEDED, TaskState.SKIPPED})
_MEASURES = (("wall_s", SECOND), ("cpu_s", SECOND), ("peak_rss_mb", MEGABYTE), ("exit_code", None))


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the journals say of one task of the run."""

    id: str
    entry: int  # its entry in $.tasks: its step and tool
    state: TaskState
    in_run: bool  # its last record is of this run (else: of an earlier run, or none)
    record_run: str | None  # the run of its last record
    attempts: int
    rank: int
    host: str | None
    start: float | None  # when its first attempt of that run started
    end: float | None  # its last record
    reason: str | None
    measures: dict[str, Any]  # wall_s, cpu_s, peak_rss_mb, exit_code (None: not known)


def task_entities(t: TaskFacts, inputs: list[str], outputs: list[str]) -> list[dict[str, Any]]:
    """The task's CreateAction, ControlAction and PropertyValues."""
    action_id = fragment("task", t.id)
    usage = [property_value(fragment("rank", str(t.rank)), "rank", t.rank),
             property_value(fragment("state", t.state.value), "state", t.state.value),
             property_value(fragment("attempts", str(t.attempts)), "attempts", t.attempts)]
    if t.host:
        usage.append(property_value(fragment("host", t.host), "host", t.host))
    usage += [property_value(fragment("task", t.id, name), name, t.measures[name], unit)
              for name, unit in _MEASURES if t.measures.get(name) is not None]
    action: dict[str, Any] = {"@id": action_id, "@type": "CreateAction", "name": f"Run of task {t.id}",
                              "description": describe(t), "instrument": ref(fragment("tool", str(t.entry))),
                              "actionStatus": action_status(t.state),
                              "resourceUsage": refs([pv["@id"] for pv in usage])}
    if t.start is not None:
        action["startTime"] = utc_timestamp(t.start)
    if t.end is not None and t.attempts and t.state not in (TaskState.RUNNING, TaskState.RETRYING):
        action["endTime"] = utc_timestamp(t.end)
    if t.state not in _DONE and t.reason:
        action["error"] = t.reason
    if inputs:
        action["object"] = refs(inputs)
    if outputs:
        action["result"] = refs(outputs)
    control = {"@id": fragment("task", t.id, "control"), "@type": "ControlAction", "name": f"orchestrate task {t.id}",
               "instrument": ref(fragment("step", str(t.entry))), "object": ref(action_id),
               "actionStatus": action["actionStatus"]}
    return [action, control, *usage]


def describe(t: TaskFacts) -> str:
    """The task's state in words, as ``status`` gives it."""
    if t.state is TaskState.SKIPPED or (t.state is TaskState.SUCCEEDED and not t.in_run):
        return f"skipped: succeeded in run {t.record_run}, unchanged since (its outputs are that run's)"
    said = f"{t.state.value} after {t.attempts} attempt{'s' if t.attempts != 1 else ''}" if t.attempts else \
        f"{t.state.value}, not run"
    return f"{said}: {t.reason}" if t.reason and t.state not in _DONE else said
