"""``cmbagent-batch submit`` and ``cancel``, and ``_after-step`` (what the job script runs once its step
has ended)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cmbagent_batch.cli.console import problem, warn
from cmbagent_batch.cli.options import AfterStepOptions, CancelOptions, SubmitOptions
from cmbagent_batch.cli.slurm_status import load_record
from cmbagent_batch.errors import BatchError, ExitCode, UsageError

if TYPE_CHECKING:
    from cmbagent_batch.slurm.script import SbatchOptions
    from cmbagent_batch.spec.config import Flags
    from cmbagent_batch.spec.model import JobSpec


def submit(opts: SubmitOptions) -> int:
    from cmbagent_batch.plan.cached import cache_dir, writable_cache_dir
    from cmbagent_batch.plan.preflight import Checks, check
    from cmbagent_batch.rundir.atomic import write_new
    from cmbagent_batch.rundir.layout import resolve_run_dir
    from cmbagent_batch.slurm import client, jobs
    from cmbagent_batch.slurm.script import JobScript, log_path, options, render, template_text
    from cmbagent_batch.spec import load_spec
    from cmbagent_batch.spec.config import effective_config

    flags: dict[str, tuple[str, str]] = {}
    if opts.run_dir:
        flags["job.run_dir"] = (os.path.abspath(opts.run_dir), "--run-dir")
    if opts.cache_dir:
        flags["analysis.cache_dir"] = (os.path.abspath(opts.cache_dir), "--cache-dir")
    spec = effective_config(load_spec(opts.spec), os.environ, flags).spec
    check(spec, cache_dir(opts.spec, opts.cache_dir), Checks(os.environ, problem, submitting=True))  # before the queue
    sbatch = options(dataclasses.asdict(spec.slurm), dataclasses.asdict(opts.slurm))
    run_dir = os.path.abspath(resolve_run_dir(spec))
    spec_path = os.path.abspath(opts.spec)
    for what, value in (("spec path", spec_path), ("run directory", run_dir)):
        if "\n" in value:
            raise UsageError(f"the {what} {value!r} holds a newline, which a job script cannot carry")
    writable_cache_dir(opts.spec, opts.cache_dir)  # the places written, checked before anything is
    run_args = ["--run-dir", run_dir] + (["--cache-dir", os.path.abspath(opts.cache_dir)] if opts.cache_dir else [])
    job = JobScript(job_name=spec.job.name, spec=spec_path, run_dir=run_dir, work_dir=os.path.dirname(spec_path),
                    python=os.path.abspath(sys.executable), run_args=tuple(run_args), kill_grace=spec.execution.kill_grace)
    text = render(template_text(), sbatch, job)
    if opts.dry_run:
        _warn_ranks(sbatch)
        sys.stdout.write(text)
        _summary(opts, spec, flags, offline=True)
        print(f"cmbagent-batch: not submitted (--dry-run); the script would go to {run_dir}/slurm/", file=sys.stderr)
        return ExitCode.OK
    with _undone_if_refused(run_dir) as written:
        record = jobs.load(run_dir)
        _refuse_if_active(record, run_dir)
        _warn_ranks(sbatch)
        _summary(opts, spec, flags, offline=False)  # an uncached LLM analysis runs now, not on a compute node
        n = sum(1 for e in (record or {"events": []})["events"] if e["event"] == "submit") + 1
        while True:  # a script left by an earlier submit is never taken over: the next number is
            script = os.path.join(jobs.slurm_dir(run_dir), f"job-{n:03d}.sbatch")
            try:
                write_new(script, text.encode("utf-8"), executable=True)
                break
            except FileExistsError:
                n += 1
        written.append(script)
        job_id = client.sbatch(script)
    record = jobs.add(run_dir, "submit", job_id, script=script, requeue_max=sbatch.requeue,
                      options={k: v for k, v in dataclasses.asdict(sbatch).items() if v not in (None, ())})
    _note_in_manifest(run_dir, jobs.summary(record))
    print(job_id)
    print(f"cmbagent-batch: submitted job {job_id}; script {script}; log {log_path(jobs.slurm_dir(run_dir), job_id)}; "
          f"`cmbagent-batch status {run_dir}` follows it", file=sys.stderr)
    return ExitCode.OK


@contextlib.contextmanager
def _undone_if_refused(run_dir: str) -> Iterator[list[str]]:
    """Make RUN_DIR/slurm (the run directory checked writable) for the block, which lists the files it
    writes. When the job is refused (a check, the plan or sbatch fails with exit 2), those files are
    removed, and so are the directories made here, each if it holds nothing else: a refused submit leaves
    no empty run directory. A failure whose outcome is unknown (sbatch did not answer) leaves everything,
    as the job may run."""
    from cmbagent_batch.rundir.atomic import missing_dirs, remove_empty, writable_dir
    from cmbagent_batch.slurm.jobs import slurm_dir

    made = missing_dirs(slurm_dir(run_dir))
    writable_dir(run_dir, "run directory")
    os.makedirs(slurm_dir(run_dir), exist_ok=True)
    written: list[str] = []
    try:
        yield written
    except BatchError as exc:
        if exc.exit_code == ExitCode.USAGE:
            removed = [p for p in written if _removed(p)] + remove_empty(made)
            if removed:  # the last is the highest: what it held is gone with it
                print(f"cmbagent-batch: not submitted; removed {removed[-1]}, which this submit had made",
                      file=sys.stderr)
        raise


def _removed(path: str) -> bool:
    try:
        os.unlink(path)
    except OSError:  # gone already
        return False
    return True


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
