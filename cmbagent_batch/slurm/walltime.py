"""What a job does when its step has ended: after a walltime stop with work left, requeue itself (or
submit a job that continues after it) while the requeue limit allows.

One place decides (``decide``, pure); ``act`` carries it out. The job script runs this on the batch
node once ``srun`` has returned, so every rank has written its journals and rank 0 has merged the ledger
and written ``run.json`` before the job is requeued.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.errors import SlurmError
from cmbagent_batch.rundir.layout import read_json
from cmbagent_batch.rundir.runview import current_states, run_history
from cmbagent_batch.slurm import client, jobs
from cmbagent_batch.slurm.script import WALLTIME_EXIT
from cmbagent_batch.states import StopReason, Tally


@dataclass(frozen=True)
class Decision:
    action: str  # "end" | "requeue" | "limit"
    why: str


def decide(step_exit: int, manifest: dict[str, Any] | None, requeues_done: int, requeue_max: int) -> Decision:
    """What to do after the job step ended with ``step_exit``; ``why`` says what the run's tasks came to,
    as the run's last line does (``run.json``'s counts)."""
    tally = Tally.from_json(manifest.get("counts") or {}) if manifest is not None else None
    tasks = f" ({tally.text()})" if tally is not None else ""
    if step_exit != WALLTIME_EXIT:
        if step_exit == 0:
            return Decision("end", f"the run finished{tasks}; nothing to requeue")
        return Decision("end", f"the run ended with exit code {step_exit}{tasks}; only a walltime stop is requeued")
    if tally is None or manifest is None or manifest.get("stop_reason") != StopReason.SIGUSR1.value:
        return Decision("end", f"exit code {WALLTIME_EXIT} but run.json records no walltime stop{tasks}")
    left = tally.left
    if left == 0:
        return Decision("end", f"the walltime stop came after the last task{tasks}")
    stopped = f"{left} task{'s' if left != 1 else ''} left{tasks}"
    if requeues_done >= requeue_max:
        return Decision("limit", f"{stopped}, but the job was requeued {requeues_done} "
                                 f"time{'s' if requeues_done != 1 else ''} already (limit {requeue_max}); "
                                 "continue with `cmbagent-batch submit`")
    return Decision("requeue", f"{stopped}; requeue {requeues_done + 1} of {requeue_max}")


def after_step(run_dir: str, job_id: str, step_exit: int, requeue_max: int) -> int:
    """Decide and act; returns the step's exit code (the job's own)."""
    record = jobs.load(run_dir) or {"events": []}
    manifest_path = os.path.join(run_dir, "run.json")
    manifest = read_json(manifest_path) if os.path.exists(manifest_path) else None
    if manifest is not None and manifest.get("status") == "running":  # its runner died without a word
        history = run_history(run_dir, manifest)
        counts = Tally.of(state for _, state in current_states(history, True))
        history.close()
        manifest = {**manifest, "counts": counts.to_json()}
    d = decide(step_exit, manifest, jobs.requeues(record), requeue_max)
    say(f"job {job_id}: {d.why}")
    if d.action == "requeue":
        act(run_dir, job_id, d, (jobs.last_submit(record) or {}).get("script"))
    return step_exit


def act(run_dir: str, job_id: str, d: Decision, script: str | None) -> None:
    """Requeue job ``job_id``, or where that is refused submit ``script`` to start after it."""
    # scontrol requeue makes slurmctld end this job, batch shell included: ignore its SIGTERM until the
    # requeue is recorded (SIGKILL follows only after the cluster's KillWait).
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        try:
            client.requeue(job_id)
        except SlurmError as exc:
            say(f"cannot requeue job {job_id} ({exc}); submitting a job that starts after it instead")
            if not script:
                say("no job script recorded in the run directory: not continued")
                return
            new_id = client.sbatch(script, f"--dependency=afterany:{job_id}")
            jobs.add(run_dir, "resubmit", new_id, after=job_id, why=d.why)
            say(f"submitted job {new_id}, to start when job {job_id} ends")
            return
        jobs.add(run_dir, "requeue", job_id, why=d.why)
        say(f"job {job_id} requeued")
    finally:
        signal.signal(signal.SIGTERM, previous)


def say(message: str) -> None:
    print(f"cmbagent-batch: {message}", file=sys.stderr, flush=True)
