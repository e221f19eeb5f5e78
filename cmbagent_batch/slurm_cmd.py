"""``cmbagent-batch submit`` and ``cancel``, the Slurm part of ``status``, and ``_after-step`` (what the
job script runs once its step has ended)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from cmbagent_batch.errors import UsageError

SUBMIT_FLAGS = ("nodes", "ntasks_per_node", "cpus_per_task", "time", "partition", "account", "qos",
                "constraint", "mem", "dependency", "requeue", "signal_grace")


def add_parsers(sub: Any, positive_int: Any, count: Any) -> None:
    p = sub.add_parser(
        "submit", help="write the job's sbatch script, submit it, and print the job id",
        description="Render the job's sbatch script from the spec's slurm: section and these flags (flags "
                    "win), write it into the run directory and submit it with sbatch. The job runs "
                    "`cmbagent-batch run --backend mpi` under srun, stops cleanly before its walltime and "
                    "requeues itself (--requeue N). Prints the job id on stdout.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script (stdout), the plan summary and the LLM cost estimate (stderr); "
                        "submit nothing")
    g = p.add_argument_group("allocation (win over the spec's slurm: section)")
    g.add_argument("--nodes", "-N", type=positive_int, metavar="N", help="nodes")
    g.add_argument("--ntasks-per-node", type=positive_int, metavar="N", help="MPI ranks per node")
    g.add_argument("--cpus-per-task", type=positive_int, metavar="N", help="CPUs per rank")
    g.add_argument("--time", "-t", metavar="T", help="walltime: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS")
    g.add_argument("--partition", "-p", metavar="P", help="partition")
    g.add_argument("--account", "-A", metavar="A", help="account to charge")
    g.add_argument("--qos", "-q", metavar="Q", help="quality of service")
    g.add_argument("--constraint", "-C", metavar="C", help="node features")
    g.add_argument("--mem", metavar="M", help="memory per node, e.g. 16G")
    g.add_argument("--dependency", "-d", metavar="D", help="sbatch dependency, e.g. afterok:1234")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more sbatch option, e.g. --sbatch-arg=--mail-type=END (repeatable)")
    g.add_argument("--requeue", type=count, metavar="N", help="requeue after a walltime stop, N times at most")
    g.add_argument("--signal-grace", type=positive_int, metavar="SECONDS",
                   help="the walltime warning comes this long before the end (default 120)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: the spec's job.run_dir)")
    p.add_argument("--cache-dir", metavar="DIR", help="dependency-analysis cache directory")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("cancel", help="cancel the Slurm job working on a run directory",
                       description="Cancel (scancel) the Slurm job that `submit` started for RUN_DIR, or the "
                                   "job that continues it after a requeue.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("_after-step")  # no help: run by the job script, not by people
    p.add_argument("run_dir")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--requeue-max", type=int, required=True)
    p.add_argument("--job-id", required=True)
    p.set_defaults(func=cmd_after_step)


# --- submit ----------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from cmbagent_batch.config import effective_config
    from cmbagent_batch.rundir import resolve_run_dir
    from cmbagent_batch.slurm import client, jobs
    from cmbagent_batch.slurm.script import JobScript, options, render, template_text
    from cmbagent_batch.spec import load_spec

    flags: dict[str, tuple[Any, str]] = {}
    if args.run_dir:
        flags["job.run_dir"] = (os.path.abspath(args.run_dir), "--run-dir")
    if args.cache_dir:
        flags["analysis.cache_dir"] = (os.path.abspath(args.cache_dir), "--cache-dir")
    spec = effective_config(load_spec(args.spec), os.environ, flags).spec
    given = {name: getattr(args, name) for name in SUBMIT_FLAGS}
    opts = options(dataclasses.asdict(spec.slurm), {**given, "sbatch_args": tuple(args.sbatch_arg)})
    run_dir = os.path.abspath(resolve_run_dir(spec))
    spec_path = os.path.abspath(args.spec)
    for what, value in (("spec path", spec_path), ("run directory", run_dir)):
        if "\n" in value:
            raise UsageError(f"the {what} {value!r} holds a newline, which a job script cannot carry")
    run_args = ["--run-dir", run_dir] + (["--cache-dir", os.path.abspath(args.cache_dir)] if args.cache_dir else [])
    job = JobScript(job_name=spec.job.name, spec=spec_path, run_dir=run_dir, work_dir=os.path.dirname(spec_path),
                    python=sys.executable, run_args=tuple(run_args), kill_grace=spec.execution.kill_grace)
    text = render(template_text(), opts, job)
    if args.dry_run:
        _warn_ranks(opts)
        sys.stdout.write(text)
        _summary(args, spec, flags, offline=True)
        print(f"cmbagent-batch: not submitted (--dry-run); the script would go to {run_dir}/slurm/", file=sys.stderr)
        return 0
    record = jobs.load(run_dir)
    _refuse_if_active(record, run_dir)
    _warn_ranks(opts)
    _summary(args, spec, flags, offline=False)  # an uncached LLM analysis runs now, not on a compute node
    n = sum(1 for e in (record or {"events": []})["events"] if e["event"] == "submit") + 1
    script = os.path.join(jobs.slurm_dir(run_dir), f"job-{n:03d}.sbatch")
    os.makedirs(jobs.slurm_dir(run_dir), exist_ok=True)
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(script, 0o755)
    job_id = client.sbatch(script)
    record = jobs.add(run_dir, "submit", job_id, script=script, requeue_max=opts.requeue,
                      options={k: v for k, v in dataclasses.asdict(opts).items() if v not in (None, ())})
    _note_in_manifest(run_dir, jobs.summary(record))
    print(job_id)
    print(f"cmbagent-batch: submitted job {job_id}; script {script}; logs {jobs.slurm_dir(run_dir)}/slurm-{job_id}"
          f".out|.err; `cmbagent-batch status {run_dir}` follows it", file=sys.stderr)
    return 0


def _warn_ranks(opts: Any) -> None:
    from cmbagent_batch.plan_cmd import warn

    if (opts.nodes or 1) * (opts.ntasks_per_node or 1) < 2:
        warn("the job asks for a single MPI rank (set slurm.ntasks_per_node or --ntasks-per-node): every "
             "task then runs on rank 0")
    if opts.mpi == "none":
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


def _summary(args: argparse.Namespace, spec: Any, flags: dict[str, tuple[Any, str]], offline: bool) -> None:
    """The plan summary and the LLM cost estimate, on stderr."""
    from cmbagent_batch import render
    from cmbagent_batch.errors import AnalysisError
    from cmbagent_batch.estimate import render as render_estimate
    from cmbagent_batch.plan_cmd import cached_plan, job_estimate

    try:
        plan = cached_plan(args.spec, flags, args.cache_dir, offline=offline)
    except AnalysisError as exc:
        if not offline:
            raise
        print(f"plan: the LLM dependency analysis is not cached ({exc.__class__.__name__}); `cmbagent-batch plan "
              f"{args.spec}` makes and caches it, or the job does when it starts", file=sys.stderr)
    else:  # its head: the levels and edges of a 10^4-task job would bury the script
        head = render.text(plan).split("\n\n", 1)[0]
        sys.stderr.write(head + "\n" + f"(`cmbagent-batch plan {args.spec}` shows the levels and edges)\n")
    if any(t.kind == "agent" for t in spec.tasks) or "llm" in spec.analysis.sources:
        sys.stderr.write(render_estimate(job_estimate(spec, args.spec, args.cache_dir)))


def _note_in_manifest(run_dir: str, summary: dict[str, Any] | None) -> None:
    from cmbagent_batch.rundir import read_json, write_json_atomic

    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        manifest = read_json(path)
        manifest["slurm"] = summary
        write_json_atomic(path, manifest)


# --- cancel, status, after-step --------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    from cmbagent_batch.slurm import client, jobs

    record = _record(args.run_dir)
    job_id = jobs.current_job(record)
    assert job_id is not None
    info = client.show_job(job_id)
    if info is not None and info.state not in client.ACTIVE_STATES:
        print(f"job {job_id} has already ended ({info.state}); nothing to cancel")
        return 0
    client.cancel(job_id)
    jobs.add(args.run_dir, "cancel", job_id)
    print(f"cancelled job {job_id}; `cmbagent-batch submit` continues the run later")
    return 0


def _load(run_dir: str) -> dict[str, Any] | None:
    from cmbagent_batch.slurm import jobs

    try:
        return jobs.load(run_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {jobs.path(run_dir)}: {exc}") from None


def _record(run_dir: str) -> dict[str, Any]:
    from cmbagent_batch.slurm import jobs

    record = _load(run_dir)
    if record is None or jobs.current_job(record) is None:
        raise UsageError(f"no Slurm job was submitted for {run_dir} (no {jobs.path(run_dir)})")
    return record


def slurm_status(run_dir: str) -> dict[str, Any] | None:
    """The Slurm side of ``status``: the job, its state now (scontrol, else sacct), requeues, logs."""
    from cmbagent_batch.slurm import client, jobs

    summary = jobs.summary(_load(run_dir))
    if summary is None:
        return None
    job_id = summary["job_id"]
    out = {k: summary[k] for k in ("job_id", "requeues", "requeue_max", "jobs")}
    out["logs"] = [os.path.join(jobs.slurm_dir(run_dir), f"slurm-{job_id}.{ext}") for ext in ("out", "err")]
    if job_id is None:
        return out
    try:
        info = client.show_job(job_id) or client.accounting(job_id)
    except client.SlurmError as exc:
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
    if f.get("StdOut"):
        out["logs"] = [f["StdOut"], f.get("StdErr", f["StdOut"])]
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
    lines.append(f"  logs: {s['logs'][0]}" + (f" {s['logs'][1]}" if s['logs'][1] != s['logs'][0] else ""))
    return lines


def cmd_after_step(args: argparse.Namespace) -> int:
    from cmbagent_batch.slurm.walltime import after_step

    return after_step(os.path.abspath(args.run_dir), args.job_id, args.exit_code, args.requeue_max)
