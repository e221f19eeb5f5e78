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

PLAN_FORMAT = 1


def build_dag(spec: JobSpec, analysis: Analysis) -> Dag:
    """The job's DAG; a cycle is a UsageError spelling it out with each edge's reason."""
    weights = {t.id: t.estimate for t in spec.tasks if t.estimate is not None}
    try:
        return Dag((t.id for t in spec.tasks), analysis.edges, weights or None)
    except CycleError as exc:
        raise cycle_error(exc, analysis.edges) from None


def make_plan(spec: JobSpec, analysis: Analysis, dag: Dag) -> dict[str, Any]:
    levels = dag.levels()
    level_of = {tid: i for i, ids in enumerate(levels) for tid in ids}
    length, path = dag.critical_path()
    total = sum(dag.weight(t) for t in dag.nodes)
    return {
        "format": PLAN_FORMAT,
        "job": spec.job.name,
        "spec": {"path": spec.path, "sha256": spec.sha256},
        "tasks": [
            {"id": t.id, "kind": t.kind, "level": level_of[t.id], "weight": dag.weight(t.id)}
            for t in sorted(spec.tasks, key=lambda t: t.id)
        ],
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
