"""``cmbagent-batch submit`` and ``cancel``, and ``_after-step`` (what the job script runs once its step
has ended)."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any

from cmbagent_batch.cli.console import warn
from cmbagent_batch.cli.options import AfterStepOptions, CancelOptions, SubmitOptions
from cmbagent_batch.cli.slurm_status import load_record
from cmbagent_batch.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from cmbagent_batch.slurm.script import SbatchOptions
    from cmbagent_batch.spec.config import Flags
    from cmbagent_batch.spec.model import JobSpec


def submit(opts: SubmitOptions) -> int:
    from cmbagent_batch.plan.cached import writable_cache_dir
    from cmbagent_batch.rundir.atomic import writable_dir
    from cmbagent_batch.rundir.layout import resolve_run_dir
    from cmbagent_batch.slurm import client, jobs
    from cmbagent_batch.slurm.script import JobScript, options, render, template_text
    from cmbagent_batch.spec import load_spec
    from cmbagent_batch.spec.config import effective_config

    flags: dict[str, tuple[str, str]] = {}
    if opts.run_dir:
        flags["job.run_dir"] = (os.path.abspath(opts.run_dir), "--run-dir")
    if opts.cache_dir:
        flags["analysis.cache_dir"] = (os.path.abspath(opts.cache_dir), "--cache-dir")
    spec = effective_config(load_spec(opts.spec), os.environ, flags).spec
    sbatch = options(dataclasses.asdict(spec.slurm), dataclasses.asdict(opts.slurm))
    run_dir = os.path.abspath(resolve_run_dir(spec))
    spec_path = os.path.abspath(opts.spec)
    for what, value in (("spec path", spec_path), ("run directory", run_dir)):
        if "\n" in value:
            raise UsageError(f"the {what} {value!r} holds a newline, which a job script cannot carry")
    writable_cache_dir(opts.spec, opts.cache_dir)  # the places written, checked before anything is
    if not opts.dry_run:
        writable_dir(run_dir, "run directory")
    run_args = ["--run-dir", run_dir] + (["--cache-dir", os.path.abspath(opts.cache_dir)] if opts.cache_dir else [])
    job = JobScript(job_name=spec.job.name, spec=spec_path, run_dir=run_dir, work_dir=os.path.dirname(spec_path),
                    python=sys.executable, run_args=tuple(run_args), kill_grace=spec.execution.kill_grace)
    text = render(template_text(), sbatch, job)
    if opts.dry_run:
        _warn_ranks(sbatch)
        sys.stdout.write(text)
        _summary(opts, spec, flags, offline=True)
        print(f"cmbagent-batch: not submitted (--dry-run); the script would go to {run_dir}/slurm/", file=sys.stderr)
        return ExitCode.OK
    record = jobs.load(run_dir)
    _refuse_if_active(record, run_dir)
    _warn_ranks(sbatch)
    _summary(opts, spec, flags, offline=False)  # an uncached LLM analysis runs now, not on a compute node
    n = sum(1 for e in (record or {"events": []})["events"] if e["event"] == "submit") + 1
    script = os.path.join(jobs.slurm_dir(run_dir), f"job-{n:03d}.sbatch")
    os.makedirs(jobs.slurm_dir(run_dir), exist_ok=True)
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(script, 0o755)
    job_id = client.sbatch(script)
    record = jobs.add(run_dir, "submit", job_id, script=script, requeue_max=sbatch.requeue,
                      options={k: v for k, v in dataclasses.asdict(sbatch).items() if v not in (None, ())})
    _note_in_manifest(run_dir, jobs.summary(record))
    print(job_id)
    print(f"cmbagent-batch: submitted job {job_id}; script {script}; logs {jobs.slurm_dir(run_dir)}/slurm-{job_id}"
          f".out|.err; `cmbagent-batch status {run_dir}` follows it", file=sys.stderr)
    return ExitCode.OK


def _warn_ranks(sbatch: SbatchOptions) -> None:
    if (sbatch.nodes or 1) * (sbatch.ntasks_per_node or 1) < 2:
        warn("the job asks for a single MPI rank (set slurm.ntasks_per_node or --ntasks-per-node): every "
             "task then runs on rank 0")
    if sbatch.mpi == "none":
        warn("slurm.mpi is none: srun then starts every rank as rank 0 of its own job, unless the MPI "
             "library finds its ranks another way")


def _refuse_if_active(record: dict[str, Any] | None, run_dir: str) -> None:
    from cmbagent_batch.slurm import client, jobs

    job_id = jobs.current_job(record) if record else None
    if job_id is None:
        return
    info = client.show_job(job_id)
    if info is not None and info.state in client.ACTIVE_STATES:
        raise UsageError(f"job {job_id} ({info.state}) already works on {run_dir}; wait for it or "
                         f"`cmbagent-batch cancel {run_dir}` first")


def _summary(opts: SubmitOptions, spec: JobSpec, flags: Flags, offline: bool) -> None:
    """The plan summary and the LLM cost estimate, on stderr."""
    from cmbagent_batch.errors import AnalysisError
    from cmbagent_batch.plan import render
    from cmbagent_batch.plan.cached import cached_plan, job_estimate
    from cmbagent_batch.plan.estimate import render as render_estimate

    try:
        plan = cached_plan(opts.spec, flags, opts.cache_dir, warn, offline=offline)
    except AnalysisError as exc:
        if not offline:
            raise
        print(f"plan: the LLM dependency analysis is not cached ({exc.__class__.__name__}); `cmbagent-batch plan "
              f"{opts.spec}` makes and caches it, or the job does when it starts", file=sys.stderr)
    else:  # its head: the levels and edges of a 10^4-task job would bury the script
        head = render.text(plan).split("\n\n", 1)[0]
        sys.stderr.write(head + "\n" + f"(`cmbagent-batch plan {opts.spec}` shows the levels and edges)\n")
    if any(t.kind == "agent" for t in spec.tasks) or "llm" in spec.analysis.sources:
        sys.stderr.write(render_estimate(job_estimate(spec, opts.spec, opts.cache_dir, warn)))


def _note_in_manifest(run_dir: str, summary: dict[str, Any] | None) -> None:
    from cmbagent_batch.rundir.atomic import write_json_atomic
    from cmbagent_batch.rundir.layout import read_json

    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        manifest = read_json(path)
        manifest["slurm"] = summary
        write_json_atomic(path, manifest)


def cancel(opts: CancelOptions) -> int:
    from cmbagent_batch.rundir.atomic import writable_dir
    from cmbagent_batch.slurm import client, jobs

    record = load_record(opts.run_dir)
    if record is None or jobs.current_job(record) is None:
        raise UsageError(f"no Slurm job was submitted for {opts.run_dir} (no {jobs.path(opts.run_dir)})")
    job_id = jobs.current_job(record)
    assert job_id is not None
    info = client.show_job(job_id)
    if info is not None and info.state not in client.ACTIVE_STATES:
        print(f"job {job_id} has already ended ({info.state}); nothing to cancel")
        return ExitCode.OK
    writable_dir(jobs.slurm_dir(opts.run_dir), "Slurm directory")  # where the cancel is recorded
    client.cancel(job_id)
    jobs.add(opts.run_dir, "cancel", job_id)
    print(f"cancelled job {job_id}; `cmbagent-batch submit` continues the run later")
    return ExitCode.OK


def after_step(opts: AfterStepOptions) -> int:
    from cmbagent_batch.slurm.walltime import after_step as after

    return after(os.path.abspath(opts.run_dir), opts.job_id, opts.exit_code, opts.requeue_max)
