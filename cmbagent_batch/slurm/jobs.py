"""``RUN_DIR/slurm/jobs.json``: the Slurm jobs that worked on a run directory, oldest first.

Each event is one entry: a submission (``submit``), a requeue of the same job id (``requeue``) or a new
job submitted to continue after the last (``resubmit``), and a ``cancel``. Written atomically; ``run``
copies it into ``run.json`` and ``status`` reads it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cmbagent_batch.errors import JobsRecordError
from cmbagent_batch.rundir.atomic import write_json_atomic
from cmbagent_batch.rundir.layout import read_json

FORMAT = 1


def slurm_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "slurm")


def path(run_dir: str) -> str:
    return os.path.join(slurm_dir(run_dir), "jobs.json")


def load(run_dir: str) -> dict[str, Any] | None:
    """The record, or None when no job was submitted for this run directory.

    Raises OSError for an unreadable file, ``JobsRecordError`` for one that is not a record, and
    ``ValueError`` (the JSON decoder's) for one that is not JSON."""
    p = path(run_dir)
    if not os.path.exists(p):
        return None
    data = read_json(p)
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise JobsRecordError(f"{p}: not a jobs record (expected an object with 'events')")
    return data


def add(run_dir: str, event: str, job_id: str, **extra: Any) -> dict[str, Any]:
    """Append one event and write the record back; returns it."""
    data = load(run_dir) or {"format": FORMAT, "events": []}
    entry = {"event": event, "job_id": job_id, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    entry.update(extra)
    data["events"].append(entry)
    os.makedirs(slurm_dir(run_dir), exist_ok=True)
    write_json_atomic(path(run_dir), data)
    return data


def current_job(data: dict[str, Any]) -> str | None:
    """The job id that works (or worked last) on the run directory."""
    ids = [e["job_id"] for e in data["events"] if e["event"] in ("submit", "resubmit")]
    return ids[-1] if ids else None


def requeues(data: dict[str, Any]) -> int:
    """Requeues and resubmissions since the last ``submit`` (what the requeue limit counts)."""
    n = 0
    for e in data["events"]:
        if e["event"] == "submit":
            n = 0
        elif e["event"] in ("requeue", "resubmit"):
            n += 1
    return n


def last_submit(data: dict[str, Any]) -> dict[str, Any] | None:
    subs = [e for e in data["events"] if e["event"] == "submit"]
    return subs[-1] if subs else None


def summary(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``run.json`` keeps of it."""
    if data is None:
        return None
    sub = last_submit(data) or {}
    return {"job_id": current_job(data), "requeues": requeues(data), "requeue_max": sub.get("requeue_max"),
            "script": sub.get("script"), "jobs": sorted({e["job_id"] for e in data["events"]}, key=int),
            "events": data["events"]}
