"""The command line's grammar: every command, flag and help text, and the typed options each command gets.

Each subcommand's ``options`` default turns the parsed ``argparse.Namespace`` into that command's frozen
options (``cli/options.py``); no command sees the Namespace.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cmbagent_batch import __version__
from cmbagent_batch.cli import options as o

if TYPE_CHECKING:
    from cmbagent_batch.spec.config import Flags

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")


def _usage(parse: Callable[[str], T], text: str) -> T:
    """A number parser as an argparse ``type``: its ValueError's message becomes the usage error."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The number parsers are imported when a flag is given: importing ``spec`` would slow every command's start.


def positive_int(text: str) -> int:
    from cmbagent_batch.spec.numbers import positive_int

    return _usage(positive_int, text)


def count(text: str) -> int:
    from cmbagent_batch.spec.numbers import count

    return _usage(count, text)


def positive_float(text: str) -> float:
    from cmbagent_batch.spec.numbers import positive_float

    return _usage(positive_float, text)


def grace_seconds(text: str) -> float:
    from cmbagent_batch.spec.numbers import grace_seconds

    return _usage(grace_seconds, text)


def usd(text: str) -> float:
    from cmbagent_batch.spec.numbers import usd

    return _usage(usd, text)


FLAG_SETTINGS = {
    "backend": ("execution.backend", "--backend"),
    "mode": ("execution.mode", "--mode"),
    "workers": ("execution.max_workers", "--workers"),
    "task_timeout": ("execution.task_timeout", "--task-timeout"),
    "retries": ("execution.retries", "--retries"),
    "keep_going": ("execution.keep_going", "--keep-going/--fail-fast"),
    "run_dir": ("job.run_dir", "--run-dir"),
    "cache_dir": ("analysis.cache_dir", "--cache-dir"),
}


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """Flags that override the spec and CMBAGENT_* variables (shared by config, plan and run)."""
    g = p.add_argument_group("overrides (win over the spec and CMBAGENT_* variables)")
    g.add_argument("--backend", choices=("auto", "local", "mpi"), help="where tasks run")
    g.add_argument("--mode", choices=("auto", "sequential", "parallel"), help="execution mode")
    g.add_argument("--workers", type=positive_int, metavar="N", help="most tasks running at once")
    g.add_argument("--task-timeout", type=positive_float, metavar="SECONDS", help="default per-task timeout")
    g.add_argument("--retries", type=count, metavar="N", help="default extra attempts after a failure")
    keep = g.add_mutually_exclusive_group()
    keep.add_argument("--keep-going", dest="keep_going", action="store_true", default=None,
                      help="after a failure, finish every independent branch")
    keep.add_argument("--fail-fast", dest="keep_going", action="store_false",
                      help="after a failure, stop launching tasks")
    g.add_argument("--run-dir", metavar="DIR", help="run directory")
    g.add_argument("--cache-dir", metavar="DIR", help="dependency-analysis cache directory")


def flags(args: argparse.Namespace) -> Flags:
    """The override flags given, as {setting: (value, "--flag")} (None: not given)."""
    out = {key: (getattr(args, attr), flag) for attr, (key, flag) in FLAG_SETTINGS.items() if hasattr(args, attr)}
    for key in ("job.run_dir", "analysis.cache_dir"):  # a path on the command line is relative to the cwd
        value, flag = out.get(key, (None, ""))
        if value is not None:
            out[key] = (os.path.abspath(value), flag)
    if getattr(args, "keep_going", None) is not None:
        out["execution.keep_going"] = (args.keep_going, "--keep-going" if args.keep_going else "--fail-fast")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmbagent-batch",
        description="Declarative, YAML-driven batch runner for HPC: shell, Python and LLM-agent tasks.",
    )
    parser.add_argument("--version", action="version", version=f"cmbagent-batch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check job specs and report every problem",
                       description="Check job specs; exit 0 when all are valid, 2 when not.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="job spec YAML files")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(options=lambda a: o.ValidateOptions(tuple(a.specs), a.format))

    p = sub.add_parser("config", help="print the effective configuration and where each value came from",
                       description="Print the effective configuration: schema defaults < spec < "
                                   "CMBAGENT_* environment variables < flags.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    _add_overrides(p)
    p.set_defaults(options=lambda a: o.ConfigOptions(a.spec, a.format, flags(a)))

    p = sub.add_parser("plan", help="build the dependency DAG and show levels, critical path, parallelism",
                       description="Build the dependency DAG (cached by content hash) and print it.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--format", choices=("text", "json", "dot", "mermaid"), default="text", help="output format")
    p.add_argument("--refresh-analysis", action="store_true", help="ignore cached analysis and analyse again")
    p.add_argument("--estimate", action="store_true",
                   help="print what the job's LLM calls may cost (low and high, with the assumptions); "
                        "makes no LLM call")
    _add_overrides(p)
    p.set_defaults(options=lambda a: o.PlanOptions(a.spec, a.format, a.refresh_analysis, a.estimate, a.cache_dir,
                                                   flags(a)))

    p = sub.add_parser("run", help="run the job's tasks on this machine (resumes an earlier run)",
                       description="Run the job: dependency-driven, resumable. Exit 0 when every task "
                                   "succeeded, 1 when some failed, 2 for a bad spec or flag, "
                                   "130/143/138 when interrupted by SIGINT/SIGTERM/SIGUSR1.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--fresh", action="store_true", help="start over: the old run directory is kept aside")
    p.add_argument("--only", nargs="+", metavar="TASK", default=None,
                   help="run only these tasks (globs allowed) and the dependencies they still need")
    p.add_argument("--dry-run", action="store_true", help="say what would run and why; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--walltime-grace", type=grace_seconds, default=0.0, metavar="SECONDS",
                   help="when SIGUSR1 (Slurm's warning before the walltime) arrives, no new task starts, running "
                        "tasks may go on for up to SECONDS, then the rest are terminated; the run exits 138 and "
                        "a rerun resumes (default 0: terminate at once). SIGINT and SIGTERM terminate at once")
    p.add_argument("--walltime-file", metavar="PATH",
                   help="the walltime warning may also come as this file appearing (checked every 0.5 s): the "
                        "job script of `submit` uses it, since a signal through srun would reach the tasks too")
    _add_overrides(p)
    p.set_defaults(options=_run_options)

    p = sub.add_parser("status", help="show the state of every task of a run",
                       description="Show each task's state, attempts, duration and, for failures, the last "
                                   "lines of its stderr.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--explain", action="store_true",
                   help="say whether each task will run next time, and why (compares with the spec file now)")
    p.set_defaults(options=lambda a: o.StatusOptions(a.run_dir, a.format, a.explain))

    _add_ledger(sub)
    _add_slurm(sub)

    p = sub.add_parser("schema", help="print a JSON Schema shipped with cmbagent-batch",
                       description="Print a JSON Schema (for editors: yaml-language-server, VS Code).")
    p.add_argument("name", nargs="?", default="job", choices=("job", "plan", "run", "ledger-entry"))
    p.set_defaults(options=lambda a: o.SchemaOptions(a.name))
    return parser


def _run_options(a: argparse.Namespace) -> o.RunOptions:
    return o.RunOptions(spec=a.spec, fresh=a.fresh, only=tuple(a.only) if a.only is not None else None,
                        dry_run=a.dry_run, quiet=a.quiet, walltime_grace=a.walltime_grace,
                        walltime_file=a.walltime_file, cache_dir=a.cache_dir, flags=flags(a))


def parse(argv: list[str] | None) -> o.Options:
    """The options of the command ``argv`` asks for (argparse exits 2 on a usage error, 0 on --help)."""
    args = build_parser().parse_args(argv)
    made: o.Options = args.options(args)
    return made


def _add_ledger(sub: Subparsers) -> None:
    p = sub.add_parser("ledger", help="summarize, verify, export, reprice, diff or report cost ledgers",
                       description="Offline commands on cost ledgers (RUN_DIR/ledger.jsonl, or a run directory).")
    cmds = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND", required=True)

    s = cmds.add_parser("summarize", help="calls, tokens and cost per model, task, agent, rank, attempt or day",
                        description="Sum calls, tokens and cost over one or more ledgers, by a key.")
    s.add_argument("ledgers", nargs="+", metavar="LEDGER", help="ledger files or run directories (summed)")
    s.add_argument("--by", choices=("model", "task", "agent", "rank", "attempt", "day"), default="model",
                   help="what to group by (default: model)")
    s.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    s.set_defaults(options=lambda a: o.LedgerSummarizeOptions(tuple(a.ledgers), a.by, a.format))

    v = cmds.add_parser("verify", help="check the hash chain; exit 1 at the first bad line",
                        description="Check that no entry was edited, deleted, moved or inserted and that the "
                                    "file was not cut. Compares the end with run.json beside the ledger, "
                                    "--run-json or --head/--entries when there is one. Exit 0 intact, 1 not.")
    v.add_argument("ledger", metavar="LEDGER", help="ledger file or run directory")
    v.add_argument("--run-json", metavar="FILE", help="the run.json whose ledger record to compare with")
    v.add_argument("--head", metavar="HASH", help="the hash the last line should have (with --entries)")
    v.add_argument("--entries", type=count, metavar="N", help="how many entries it should have (with --head)")
    v.set_defaults(options=lambda a: o.LedgerVerifyOptions(a.ledger, a.run_json, a.head, a.entries))

    e = cmds.add_parser("export", help="the entries as CSV or a JSON array",
                        description="Export the entries (price flattened into three columns in CSV).")
    e.add_argument("ledger", metavar="LEDGER", help="ledger file or run directory")
    e.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    e.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")
    e.set_defaults(options=lambda a: o.LedgerExportOptions(a.ledger, a.format, a.output))

    r = cmds.add_parser("reprice", help="the same calls priced with another price table",
                        description="Recompute every call's cost with another price table (the format of "
                                    "the shipped cmbagent_batch/prices/table.json) and compare by model.")
    r.add_argument("ledger", metavar="LEDGER", help="ledger file or run directory")
    r.add_argument("--prices", required=True, metavar="FILE", help="price table, JSON or YAML")
    r.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    r.add_argument("-o", "--output", metavar="NEW_LEDGER", help="also write a new, freshly chained ledger")
    r.set_defaults(options=lambda a: o.LedgerRepriceOptions(a.ledger, a.prices, a.format, a.output))

    d = cmds.add_parser("diff", help="what differs between two ledgers; exit 1 when they differ",
                        description="Compare two ledgers call by call. Exit 0 when they hold the same calls "
                                    "with the same content, 1 when not.")
    d.add_argument("a", metavar="A", help="ledger file or run directory")
    d.add_argument("b", metavar="B", help="ledger file or run directory")
    d.set_defaults(options=lambda a: o.LedgerDiffOptions(a.a, a.b))

    h = cmds.add_parser("report", help="an HTML cost report",
                        description="Write a self-contained HTML cost report of one or more ledgers.")
    h.add_argument("ledgers", nargs="+", metavar="LEDGER", help="ledger files or run directories")
    h.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    h.add_argument("--budget", type=usd, metavar="USD",
                   help="budget line to draw (default: budget_usd of run.json beside a single ledger)")
    h.set_defaults(options=lambda a: o.LedgerReportOptions(tuple(a.ledgers), a.output, a.budget))


SUBMIT_FLAGS = ("nodes", "ntasks_per_node", "cpus_per_task", "time", "partition", "account", "qos",
                "constraint", "mem", "dependency", "requeue", "signal_grace")


def _add_slurm(sub: Subparsers) -> None:
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
    p.set_defaults(options=_submit_options)

    p = sub.add_parser("cancel", help="cancel the Slurm job working on a run directory",
                       description="Cancel (scancel) the Slurm job that `submit` started for RUN_DIR, or the "
                                   "job that continues it after a requeue.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.set_defaults(options=lambda a: o.CancelOptions(a.run_dir))

    p = sub.add_parser("_after-step")  # no help: run by the job script, not by people
    p.add_argument("run_dir")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--requeue-max", type=int, required=True)
    p.add_argument("--job-id", required=True)
    p.set_defaults(options=lambda a: o.AfterStepOptions(a.run_dir, a.exit_code, a.requeue_max, a.job_id))


def _submit_options(a: argparse.Namespace) -> o.SubmitOptions:
    slurm = o.SlurmRequest(**{name: getattr(a, name) for name in SUBMIT_FLAGS}, sbatch_args=tuple(a.sbatch_arg))
    return o.SubmitOptions(spec=a.spec, dry_run=a.dry_run, slurm=slurm, run_dir=a.run_dir, cache_dir=a.cache_dir)
