"""The plan of a job: its DAG, levels, critical path and how the edges were found, as JSON-ready data.

The plan dict follows ``schemas/plan.schema.json``; the renderers in ``render.py`` read only it, so a
cached plan prints without the spec being parsed again.
"""

from __future__ import annotations

from typing import Any

from cmbagent_batch.errors import CycleError
from cmbagent_batch.plan.analysis.deps import Analysis, cycle_error
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.tasks import by_entry, task_ids

PLAN_FORMAT = 1


def build_dag(spec: JobSpec, analysis: Analysis) -> Dag:
    """The job's DAG; a cycle is a UsageError spelling it out with each edge's reason."""
    weights = {tid: t.estimate for t, ids in by_entry(spec.tasks) if t.estimate is not None for tid in ids}
    try:
        return Dag(task_ids(spec.tasks), analysis.edges, weights or None)
    except CycleError as exc:
        raise cycle_error(exc, analysis.edges) from None


def make_plan(spec: JobSpec, analysis: Analysis, dag: Dag) -> dict[str, Any]:
    """The plan with its tasks as columns (``task_columns``: ids sorted, and each one's kind, level and
    weight, a column whose values are all the same given once): a 10^6-task plan holds no dict per task.
    ``schema_form`` gives it as ``schemas/plan.schema.json`` says."""
    levels = dag.levels()
    kinds = {t.kind for t, _ in by_entry(spec.tasks)}
    if len(kinds) == 1:
        kind: str | list[str] = kinds.pop()
    else:
        of = {tid: t.kind for t, ids in by_entry(spec.tasks) for tid in ids}
        kind = [of[tid] for tid in dag.nodes]
    weights = dag.weights()
    length, path = dag.critical_path()
    total = sum(weights)
    return {
        "format": PLAN_FORMAT,
        "job": spec.job.name,
        "spec": {"path": spec.path, "sha256": spec.sha256},
        "task_columns": {"id": list(dag.nodes), "kind": kind, "level": dag.level_numbers(),
                         "weight": weights[0] if len(set(weights)) == 1 else weights},
        "edges": [
            {"from": e.src, "to": e.dst, "type": e.type, "source": e.source, "reason": e.reason}
            for e in dag.edges
        ],
        "levels": levels,
        "widths": [len(ids) for ids in levels],
        "critical_path": {"length": length, "tasks": path},
        "parallelism": {
            "max_width": max((len(ids) for ids in levels), default=0),
            "average": (total / length) if length else 0.0,
        },
        "analysis": analysis.info,
    }


def task_count(plan: dict[str, Any]) -> int:
    """How many tasks a plan has, in either form."""
    return len(plan["tasks"]) if "tasks" in plan else len(plan["task_columns"]["id"])


def schema_form(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as ``schemas/plan.schema.json`` says (``plan --format json``): one object per task."""
    if "tasks" in plan:
        return plan
    columns = plan["task_columns"]
    ids = columns["id"]
    kind, weight = columns["kind"], columns["weight"]
    kinds = [kind] * len(ids) if isinstance(kind, str) else kind
    weights = weight if isinstance(weight, list) else [weight] * len(ids)
    tasks = [{"id": tid, "kind": k, "level": lv, "weight": w}
             for tid, k, lv, w in zip(ids, kinds, columns["level"], weights)]
    out: dict[str, Any] = {}
    for key, value in plan.items():
        if key == "task_columns":
            out["tasks"] = tasks
        else:
            out[key] = value
    return out
