"""Slurm's commands (sbatch, scontrol, squeue, sacct, scancel), run with a time limit, their failures
turned into ``SlurmError`` with what Slurm said."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from cmbagent_batch.errors import ExitCode, SlurmError

TIMEOUT_S = 60  # a slurmctld that does not answer in a minute is down; its commands retry within that

ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                           "RESV_DEL_HOLD", "SPECIAL_EXIT"})


def run(argv: list[str], what: str) -> str:
    """``argv``'s standard output; ``SlurmError`` naming ``what`` with Slurm's own message otherwise."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise SlurmError(f"{argv[0]} not found on PATH: {what} needs a Slurm client (a login node of the "
                         "cluster, or `slurm/local-cluster.sh up` for a local one)")
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{what}: `{' '.join(argv)}` did not answer in {TIMEOUT_S} s (is slurmctld up?)",
                         exit_code=ExitCode.FAILED) from None
    except OSError as exc:
        raise SlurmError(f"{what}: cannot run {exe}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        said = " ".join(line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip())
        raise SlurmError(f"{what}: `{' '.join(argv)}` failed (exit {proc.returncode}): {said or 'no message'}")
    return proc.stdout


def sbatch(script_path: str, *extra: str) -> str:
    """Submit; the new job's id."""
    out = run(["sbatch", "--parsable", *extra, script_path], "submitting the job")
    job_id = out.strip().split(";", 1)[0]  # --parsable: "ID" or "ID;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id", exit_code=ExitCode.INTERNAL)
    return job_id


def requeue(job_id: str) -> None:
    run(["scontrol", "requeue", job_id], f"requeueing job {job_id}")


def cancel(job_id: str) -> None:
    run(["scancel", job_id], f"cancelling job {job_id}")


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says of a job now; ``source`` names the command that said it."""

    job_id: str
    state: str
    source: str
    fields: dict[str, str]


def show_job(job_id: str) -> JobInfo | None:
    """``scontrol show job`` (None once slurmctld has forgotten the job)."""
    try:
        out = run(["scontrol", "show", "job", "-o", job_id], f"asking for job {job_id}")
    except SlurmError as exc:
        if "Invalid job id" in str(exc):
            return None
        raise
    fields = parse_show(out)
    return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), "scontrol", fields) if fields else None


def parse_show(text: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=Value`` pairs; a value may hold spaces only as the last key)."""
    fields: dict[str, str] = {}
    key = None
    for token in text.strip().split(" "):
        name, eq, value = token.partition("=")
        if eq and name and name.replace(":", "").replace("/", "").isalnum():
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


def accounting(job_id: str) -> JobInfo | None:
    """``sacct`` from the accounting database, else from the job completion log (``-c``); None when
    neither is kept or knows the job."""
    for flags, source in ((["-X"], "sacct"), (["-c"], "sacct -c")):
        try:
            out = run(["sacct", *flags, "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed,Start,End"],
                      f"asking the accounting for job {job_id}")
        except SlurmError:
            continue
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        rows = [r for r in rows if r[0] == job_id]
        if rows:
            _, state, code, elapsed, start, end = (rows[-1] + [""] * 6)[:6]
            return JobInfo(job_id, state.split(" ")[0], source,
                           {"ExitCode": code, "Elapsed": elapsed, "Start": start, "End": end})
    return None
