"""The sbatch script of a job: its options (the spec's ``slurm:`` section, then the ``submit`` flags) and
one pure function that renders the template ``job.sbatch`` (``slurm/job.sbatch`` in the source tree).

Nothing here reads the clock, the environment or a file but the template: what a script says depends on
its arguments only, so golden files pin it down.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from cmbagent_batch.errors import ExitCode, UsageError
from cmbagent_batch.spec.checks import parse_slurm_time
from cmbagent_batch.spec.model import SlurmSpec

# After the drain, a walltime stop still terminates what runs (kill_grace), flushes the journals,
# merges the ledger and requeues: this much of signal_grace (at most a third of it) is kept for that.
STOP_RESERVE_S = 20
WALLTIME_EXIT = ExitCode.SIGUSR1  # what `run` exits with after a SIGUSR1 stop (128 + 10)

# sbatch options that the script sets itself: an --sbatch-arg may not set them too.
MANAGED = ("--output", "-o", "--error", "-e", "--open-mode", "--signal", "--job-name", "-J", "--parsable",
           "--wait", "-W", "--requeue", "--no-requeue", "--chdir", "-D")
# The job's one log in RUN_DIR/slurm/ (%j: the job id): its stdout and stderr together (no --error), so the
# progress lines, warnings and the final summary are in the order they came, in one place.
LOG = "slurm-%j.log"


SbatchOptions = SlurmSpec  # what the job asks Slurm for; None: left to the cluster's default


OPTION_NAMES = tuple(f.name for f in fields(SbatchOptions))


def options(spec_slurm: Mapping[str, Any], flags: Mapping[str, Any]) -> SbatchOptions:
    """The spec's ``slurm:`` values overridden by the flags given (None: not given). Unknown names are
    rejected, listing the valid ones; every value is checked."""
    unknown = sorted(set(spec_slurm) - set(OPTION_NAMES)) + sorted(set(flags) - set(OPTION_NAMES))
    if unknown:
        raise UsageError(f"unknown Slurm option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(OPTION_NAMES)}")
    merged = {k: v for k, v in spec_slurm.items() if v is not None}
    merged.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(merged.get("time"), int):
        merged["time"] = str(merged["time"])
    for key in ("extra_directives", "sbatch_args"):
        merged[key] = tuple(merged.get(key, ()))
    opts = SbatchOptions(**merged)
    _check(opts)
    return opts


def _check(opts: SbatchOptions) -> None:
    if opts.time is not None and parse_slurm_time(opts.time) is None:
        raise UsageError(f"--time {opts.time!r}: malformed Slurm time; use minutes, MM:SS, HH:MM:SS, D-HH, "
                         "D-HH:MM or D-HH:MM:SS")
    for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a whole number of at least 1")
    if opts.requeue < 0:
        raise UsageError(f"--requeue {opts.requeue}: expected a whole number of at least 0")
    if opts.signal_grace < 10:
        raise UsageError(f"slurm.signal_grace {opts.signal_grace}: expected at least 10 seconds")
    if opts.mpi not in ("pmi2", "pmix", "none"):
        raise UsageError(f"slurm.mpi {opts.mpi!r}: expected pmi2, pmix or none")
    limit = parse_slurm_time(opts.time) if opts.time else None
    if limit and opts.signal_grace >= limit:
        raise UsageError(f"slurm.signal_grace {opts.signal_grace} s is not shorter than the walltime "
                         f"{opts.time} ({limit} s): the job would be told to stop as it starts")
    for arg in opts.extra_directives + opts.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise UsageError(f"sbatch option {arg!r}: expected one option such as --mail-type=END")
        managed = _managed(arg)
        if managed is not None:
            what = "writes stderr to the --output log" if managed in ("--error", "-e") else f"sets {managed}"
            raise UsageError(f"sbatch option {arg!r}: cmbagent-batch {what} itself "
                             "(see `cmbagent-batch submit --help`)")


def _managed(arg: str) -> str | None:
    """The managed option ``arg`` sets, as sbatch reads it: a long option by any prefix of its name
    (``--err=x``), a short one with its value attached (``-ex.err``); None for any other option."""
    if arg.startswith("--"):
        name = arg.split("=", 1)[0]
        return next((m for m in MANAGED if m.startswith("--") and len(name) > 2 and m.startswith(name)), None)
    return arg[:2] if arg[:2] in MANAGED else None


def walltime_grace(opts: SbatchOptions, kill_grace: float) -> int:
    """Seconds the running tasks get after the walltime warning (``run --walltime-grace``)."""
    reserve = min(STOP_RESERVE_S, opts.signal_grace // 3)
    return max(0, int(opts.signal_grace - kill_grace - reserve))


@dataclass(frozen=True)
class JobScript:
    """Where the job runs and what it runs: the rest of the script, beside its options."""

    job_name: str
    spec: str  # absolute path of the spec file
    run_dir: str  # absolute
    work_dir: str  # the directory the job starts in (the spec file's)
    python: str  # the interpreter of the cmbagent-batch that submits (sys.executable, symlinks not resolved)
    run_args: tuple[str, ...]  # after `python -m cmbagent_batch run SPEC`
    kill_grace: float


def log_path(slurm_dir: str, job_id: str) -> str:
    """Where job ``job_id`` writes its log (stdout and stderr, every requeue appended)."""
    return f"{slurm_dir}/{LOG.replace('%j', job_id)}"


def job_logs(slurm_dir: str, job_id: str) -> list[str]:
    """The logs of job ``job_id``: its one log; a job submitted by an earlier version wrote two, .out and .err."""
    log = log_path(slurm_dir, job_id)
    older = [f"{slurm_dir}/slurm-{job_id}.{ext}" for ext in ("out", "err")]
    if not os.path.exists(log) and any(os.path.exists(p) for p in older):
        return older
    return [log]


def directives(opts: SbatchOptions, job: JobScript) -> list[str]:
    """The ``#SBATCH`` lines, in a fixed order; every value shell-quoted."""
    pairs: list[tuple[str, Any]] = [
        ("--job-name", job.job_name), ("--output", f"{job.run_dir}/slurm/{LOG}"),
        ("--open-mode", "append"),  # a requeued job adds to its log
        ("--signal", f"B:USR1@{opts.signal_grace}"),
        ("--partition", opts.partition), ("--account", opts.account), ("--qos", opts.qos),
        ("--nodes", opts.nodes), ("--ntasks-per-node", opts.ntasks_per_node),
        ("--cpus-per-task", opts.cpus_per_task), ("--time", opts.time), ("--mem", opts.mem),
        ("--constraint", opts.constraint), ("--dependency", opts.dependency),
    ]
    lines = [f"#SBATCH {name}={shlex.quote(str(value))}" for name, value in pairs if value is not None]
    if opts.requeue:
        lines.append("#SBATCH --requeue")  # scontrol requeue works even where the cluster's default is no
    for arg in opts.extra_directives + opts.sbatch_args:
        name, eq, value = arg.partition("=")
        lines.append(f"#SBATCH {name}={shlex.quote(value)}" if eq else f"#SBATCH {shlex.quote(name)}")
    return lines


def render(template: str, opts: SbatchOptions, job: JobScript) -> str:
    """The job's sbatch script: ``template`` with its ``{{ name }}`` fields filled in."""
    grace = walltime_grace(opts, job.kill_grace)
    base = [shlex.quote(job.python), "-m", "cmbagent_batch"]
    warning = f"{job.run_dir}/slurm/walltime-warning"
    run = [*base, "run", shlex.quote(job.spec), "--backend", "mpi", "--walltime-grace", str(grace),
           "--walltime-file", shlex.quote(warning),
           *map(shlex.quote, job.run_args)]
    after = [*base, "_after-step", shlex.quote(job.run_dir), "--requeue-max", str(opts.requeue),
             "--job-id", '"$SLURM_JOB_ID"']
    values = {
        "directives": "\n".join(directives(opts, job)),
        "spec": job.spec,
        "run_dir": job.run_dir,
        "work_dir": shlex.quote(job.work_dir),
        "signal_grace": str(opts.signal_grace),
        "walltime_grace": str(grace),
        "mpi": opts.mpi,
        "warning_file": shlex.quote(warning),
        "run_command": " ".join(run),
        "after_step": " ".join(after),
    }
    return _fill(template, values)


_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _fill(template: str, values: Mapping[str, str]) -> str:
    missing = sorted({m.group(1) for m in _FIELD.finditer(template)} - set(values))
    if missing:
        raise ValueError(f"the sbatch template has unknown fields {missing}; known: {sorted(values)}")
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def template_text() -> str:
    """The shipped template (``cmbagent_batch/slurm/job.sbatch``)."""
    return resources.files("cmbagent_batch.slurm").joinpath("job.sbatch").read_text(encoding="utf-8")

