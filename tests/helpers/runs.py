"""A run directory as a test reads it: run.json's summary with every task's detail beside it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmbagent_batch.rundir.layout import Layout
from cmbagent_batch.rundir.runview import run_tasks


def read_run(run_dir: Path | str) -> dict[str, Any]:
    """run.json, with "tasks": each task of the run by id, as the journals and their index say
    (``rundir.runview.run_tasks``: what run.json listed before it became a bounded summary)."""
    manifest: dict[str, Any] = json.loads((Path(run_dir) / "run.json").read_text())
    return {**manifest, "tasks": run_tasks(str(run_dir))}


def published(run_dir: Path | str, task: str) -> Path:
    """RUN_DIR/outputs/S/TASK (flat layout: RUN_DIR/outputs/TASK): the task's published outputs."""
    return Path(Layout.of(str(run_dir)).published(task))


def work_dir(run_dir: Path | str, task: str, rank: int = 0) -> Path:
    """RUN_DIR/ranks/rank-NNNN/tasks/S/TASK (flat layout: without S/): the task's work directory on ``rank``."""
    return Path(Layout.of(str(run_dir)).work_dir(rank, task))


def superseded_sets(run_dir: Path | str, tasks: Iterable[str]) -> list[Path]:
    """The earlier output sets of ``tasks`` (RUN_DIR/superseded/S/TASK-<time>-<id>), by name."""
    layout = Layout.of(str(run_dir))
    shards = {Path(layout.superseded(task)) for task in tasks}
    return sorted((p for d in shards if d.is_dir() for p in d.iterdir()), key=lambda p: p.name)


def kept_work_dir(run_dir: Path | str, task: str, rank: int = 0) -> Path:
    """RUN_DIR/ranks/rank-NNNN/superseded/S/TASK: what the task's previous attempt left on ``rank``."""
    return Path(Layout.of(str(run_dir)).kept_work_dir(rank, task))
