"""The Slurm side of a run directory, as ``status`` shows it and ``cancel`` reads it (not a command)."""

from __future__ import annotations

from typing import Any

from cmbagent_batch.errors import SlurmError, UsageError


def load_record(run_dir: str) -> dict[str, Any] | None:
    """The run directory's Slurm job record, None when nothing was submitted for it."""
    from cmbagent_batch.slurm import jobs

    try:
        return jobs.load(run_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {jobs.path(run_dir)}: {exc}") from None


def slurm_status(run_dir: str) -> dict[str, Any] | None:
    """The Slurm side of ``status``: the job, its state now (scontrol, else sacct), requeues, logs."""
    from cmbagent_batch.slurm import client, jobs
    from cmbagent_batch.slurm.script import job_logs

    summary = jobs.summary(load_record(run_dir))
    if summary is None:
        return None
    job_id = summary["job_id"]
    out = {k: summary[k] for k in ("job_id", "requeues", "requeue_max", "jobs")}
    out["logs"] = job_logs(jobs.slurm_dir(run_dir), job_id) if job_id is not None else []
    if job_id is None:
        return out
    try:
        info = client.show_job(job_id) or client.accounting(job_id)
    except SlurmError as exc:
        out.update(state="unknown", source=None, error=str(exc))
        return out
    if info is None:
        out.update(state="unknown", source=None,
                   error="slurmctld no longer knows the job and no accounting or job completion log has it")
        return out
    out.update(state=info.state, source=info.source)
    f = info.fields
    for key, name in (("Reason", "reason"), ("RestartCnt", "restart_count"), ("RunTime", "run_time"),
                      ("TimeLimit", "time_limit"), ("NodeList", "nodes"), ("ExitCode", "exit_code"),
                      ("Elapsed", "run_time")):
        if f.get(key) not in (None, "", "None", "(null)"):
            out[name] = f[key]
    if f.get("StdOut"):  # where Slurm says the job writes
        out["logs"] = list(dict.fromkeys((f["StdOut"], f.get("StdErr", f["StdOut"]))))
    return out


def slurm_lines(s: dict[str, Any]) -> list[str]:
    state = s.get("state", "unknown")
    line = f"Slurm job {s['job_id']}: {state}"
    if s.get("reason"):
        line += f" ({s['reason']})"
    if s.get("source"):
        line += f" [from {s['source']}]"
    lines = [line]
    if s.get("error"):
        lines.append(f"  {s['error']}")
    detail = [f"requeued {s['requeues']} of {s['requeue_max']} times" if s.get("requeue_max") is not None
              else f"requeued {s['requeues']} times"]
    for key, label in (("run_time", "run time"), ("time_limit", "time limit"), ("nodes", "nodes"),
                       ("exit_code", "exit code")):
        if s.get(key):
            detail.append(f"{label} {s[key]}")
    if len(s["jobs"]) > 1:
        detail.append(f"jobs {', '.join(s['jobs'])}")
    lines.append("  " + "; ".join(detail))
    if s["logs"]:
        lines.append(f"  log{'s' if len(s['logs']) > 1 else ''}: {' '.join(s['logs'])}")
    return lines
