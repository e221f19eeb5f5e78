"""What the report needs of the job spec that the run directory does not hold: each task's kind and matrix
values, and the DAG. A run hands over its own; ``report`` reads the spec named in run.json, offline (the
cached LLM analysis, never a model call)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.errors import BatchError
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.tasks import by_entry, entries_of


@dataclass(frozen=True)
class JobView:
    """The job as the report sees it: its spec and DAG (None when they could not be read, and ``note``
    says why, or says that the spec changed since the run)."""

    spec: JobSpec | None
    dag: Dag | None
    note: str = ""

    def kinds(self) -> dict[str, str]:
        """Each task's kind (one look per entry of the spec)."""
        if self.spec is None:
            return {}
        return {tid: t.kind for t, ids in by_entry(self.spec.tasks) for tid in ids}

    def matrix_values(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each task of a matrix entry with its matrix values."""
        if self.spec is None:
            return
        entries = entries_of(self.spec.tasks)
        if entries is None:
            yield from ((t.id, dict(t.matrix)) for t in self.spec.tasks if t.matrix)
            return
        for e in entries:
            if e.grid is not None:
                yield from zip(e.ids, e.grid.all_values())


def load_job(manifest: dict[str, Any], warn: Callable[[str], None]) -> JobView:
    """The job of the run ``manifest`` (run.json) describes, from its spec as the file is now."""
    from cmbagent_batch.plan.analysis.cache import Cache
    from cmbagent_batch.plan.analysis.deps import analyse
    from cmbagent_batch.plan.build import build_dag
    from cmbagent_batch.plan.cached import cache_dir
    from cmbagent_batch.spec.config import effective_config
    from cmbagent_batch.spec.loader import load_spec

    path = str((manifest.get("spec") or {}).get("path") or "")
    if not os.path.isfile(path):
        return JobView(None, None, f"the job spec {path or '(not named in run.json)'} is gone: task kinds and the "
                                   "DAG are not shown")
    try:
        spec = effective_config(load_spec(path), os.environ, {}).spec
        analysis = analyse(spec, Cache(cache_dir(path, None), warn), refresh=False, warn=warn, offline=True)
        dag = build_dag(spec, analysis)
    except (BatchError, OSError, ValueError) as exc:
        return JobView(None, None, f"the job spec {path} cannot be planned offline ({exc}): task kinds and the "
                                   "DAG are not shown")
    changed = spec.sha256 != (manifest.get("spec") or {}).get("sha256")
    return JobView(spec, dag, f"the job spec {path} changed since this run: task kinds and the DAG are the spec's "
                              "as it is now" if changed else "")
