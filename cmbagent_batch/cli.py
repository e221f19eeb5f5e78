"""The ``cmbagent-batch`` command line.

One handler maps errors to exit codes: 0 ok, 1 some tasks or an analysis failed, 2 bad spec or usage
(no traceback), 3 internal error (traceback written to a log file whose path is printed),
130 interrupted. Subcommands import what they need when they run, so ``validate`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from cmbagent_batch import __version__
from cmbagent_batch.errors import BatchError, SpecError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """Flags that override the spec and CMBAGENT_* variables (shared by config, plan and run)."""
    g = p.add_argument_group("overrides (win over the spec and CMBAGENT_* variables)")
    g.add_argument("--backend", choices=("auto", "local", "mpi"), help="where tasks run")
    g.add_argument("--mode", choices=("auto", "sequential", "parallel"), help="execution mode")
    g.add_argument("--workers", type=_positive_int, metavar="N", help="most tasks running at once")
    g.add_argument("--task-timeout", type=_positive_float, metavar="SECONDS", help="default per-task timeout")
    g.add_argument("--retries", type=_count, metavar="N", help="default extra attempts after a failure")
    keep = g.add_mutually_exclusive_group()
    keep.add_argument("--keep-going", dest="keep_going", action="store_true", default=None,
                      help="after a failure, finish every independent branch")
    keep.add_argument("--fail-fast", dest="keep_going", action="store_false",
                      help="after a failure, stop launching tasks")
    g.add_argument("--run-dir", metavar="DIR", help="run directory")
    g.add_argument("--cache-dir", metavar="DIR", help="dependency-analysis cache directory")


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


def _number(parse: Callable[[str], Any], minimum: float, what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, 1, "a whole number of at least 1")
_count = _number(int, 0, "a whole number of at least 0")
_positive_float = _number(float, 1e-9, "a finite number above 0")


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
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="print the effective configuration and where each value came from",
                       description="Print the effective configuration: schema defaults < spec < "
                                   "CMBAGENT_* environment variables < flags.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    _add_overrides(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plan", help="build the dependency DAG and show levels, critical path, parallelism",
                       description="Build the dependency DAG (cached by content hash) and print it.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--format", choices=("text", "json", "dot", "mermaid"), default="text", help="output format")
    p.add_argument("--refresh-analysis", action="store_true", help="ignore cached analysis and analyse again")
    p.add_argument("--estimate", action="store_true",
                   help="print what the job's LLM calls may cost (low and high, with the assumptions); "
                        "makes no LLM call")
    _add_overrides(p)
    p.set_defaults(func=cmd_plan)

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
    p.add_argument("--walltime-grace", type=_number(float, 0, "a number of seconds, 0 or more"), default=0.0,
                   metavar="SECONDS",
                   help="when SIGUSR1 (Slurm's warning before the walltime) arrives, no new task starts, running "
                        "tasks may go on for up to SECONDS, then the rest are terminated; the run exits 138 and "
                        "a rerun resumes (default 0: terminate at once). SIGINT and SIGTERM terminate at once")
    p.add_argument("--walltime-file", metavar="PATH",
                   help="the walltime warning may also come as this file appearing (checked every 0.5 s): the "
                        "job script of `submit` uses it, since a signal through srun would reach the tasks too")
    _add_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show the state of every task of a run",
                       description="Show each task's state, attempts, duration and, for failures, the last "
                                   "lines of its stderr.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--explain", action="store_true",
                   help="say whether each task will run next time, and why (compares with the spec file now)")
    p.set_defaults(func=cmd_status)

    from cmbagent_batch.ledger_cmd import add_parser as add_ledger_parser

    add_ledger_parser(sub)

    from cmbagent_batch.slurm_cmd import add_parsers as add_slurm_parsers

    add_slurm_parsers(sub, _positive_int, _count)

    p = sub.add_parser("schema", help="print a JSON Schema shipped with cmbagent-batch",
                       description="Print a JSON Schema (for editors: yaml-language-server, VS Code).")
    p.add_argument("name", nargs="?", default="job", choices=("job", "plan", "run", "ledger-entry"))
    p.set_defaults(func=cmd_schema)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    out = {key: (getattr(args, attr), flag) for attr, (key, flag) in FLAG_SETTINGS.items() if hasattr(args, attr)}
    for key in ("job.run_dir", "analysis.cache_dir"):  # a path on the command line is relative to the cwd
        value, flag = out.get(key, (None, ""))
        if value is not None:
            out[key] = (os.path.abspath(value), flag)
    if getattr(args, "keep_going", None) is not None:
        out["execution.keep_going"] = (args.keep_going, "--keep-going" if args.keep_going else "--fail-fast")
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from cmbagent_batch.spec import load_spec

    problems = []
    summaries = []
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        summaries.append(f"{path}: valid ({len(spec.tasks)} task{'s' if len(spec.tasks) != 1 else ''})")
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for line in summaries:
            print(line)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            bad = len({p.file for p in problems})
            print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {bad} file{'s' if bad != 1 else ''}",
                  file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK


def load_config(args: argparse.Namespace) -> Any:
    from cmbagent_batch.config import effective_config
    from cmbagent_batch.spec import load_spec

    return effective_config(load_spec(args.spec), os.environ, _flags(args))


def cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    table = config.to_dict()
    if args.format == "json":
        print(json.dumps(table, indent=2))
        return EXIT_OK
    width = max(len(k) for k in table)
    for key, entry in table.items():
        value = entry["value"]
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}}  {shown:<24}  {entry['source']}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from cmbagent_batch.plan_cmd import run_plan

    return run_plan(args, _flags(args))


def cmd_run(args: argparse.Namespace) -> int:
    from cmbagent_batch.run_cmd import cmd_run as run

    return run(args, _flags(args))


def cmd_status(args: argparse.Namespace) -> int:
    from cmbagent_batch.run_cmd import cmd_status as status

    return status(args)


def cmd_schema(args: argparse.Namespace) -> int:
    from cmbagent_batch.spec.schema import schema_text

    sys.stdout.write(schema_text(args.name))
    return EXIT_OK


def _crash_log(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for base in (os.path.join(os.path.expanduser("~"), ".cache", "cmbagent-batch"), "/tmp"):
        try:
            os.makedirs(base, exist_ok=True)
            path = os.path.join(base, f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(f"cmbagent-batch {__version__}\nargv: {sys.argv}\n\n{text}")
            return path
        except OSError:
            continue
    return "(could not write a log file)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SpecError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"cmbagent-batch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BatchError as exc:
        print(f"cmbagent-batch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cmbagent-batch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a report
        path = _crash_log(exc)
        print(f"cmbagent-batch: internal error: {type(exc).__name__}: {exc}\n"
              f"The traceback is in {path}; please include it in a bug report.", file=sys.stderr)
        return EXIT_INTERNAL
