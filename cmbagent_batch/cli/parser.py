"""The command line's grammar: every command, flag and help text, and the typed options each command gets.

Each subcommand's ``options`` default turns the parsed ``argparse.Namespace`` into that command's frozen
options (``cli/options.py``); no command sees the Namespace.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cmbagent_batch import __version__
from cmbagent_batch.cli import options as o

if TYPE_CHECKING:
    from cmbagent_batch.spec.config import Flags

    Subparsers = argparse._SubParsersAction["Parser"]

T = TypeVar("T")
_NUMBER_OR_STDIN = re.compile(r"-(?:\d+\.?\d*|\.\d+)?")  # "-5", "-0.5", "-": arguments, not options


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors say what was meant, for every command and subcommand (each
    subparser is one of these): an unknown option gets the command's own usage, a did-you-mean and the
    list of its valid options; an unknown command or choice gets a did-you-mean. Exit 2, as argparse's.

    No option is abbreviated (``--p`` is not ``--prune-superseded``): a prefix gets the did-you-mean instead.
    ``hints`` maps an option to what to say when arguments are left over after it was given (``--only a b
    SPEC``: the option takes one value). ``passthrough`` names the option that hands options on to another
    program (``--sbatch-arg``): an unknown long option close to none of ours is shown passed that way.
    """

    def __init__(self, *args: Any, hints: Mapping[str, str] | None = None, passthrough: Passthrough | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        self.hints = dict(hints or {})
        self.passthrough = passthrough

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        """As argparse's, but an argument it does not know is an error here, in this (sub)command's usage,
        not later in the top level's."""
        given = list(args) if args is not None else sys.argv[1:]
        parsed, extras = super().parse_known_args(given, namespace)
        if extras:
            self.error(self._leftover_message(extras, given))
        return parsed, extras

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        shown = [str(c) for c in choices if not str(c).startswith("_")]  # _after-step is not for people
        hint = did_you_mean(str(value), shown, quote=True)
        if isinstance(action, argparse._SubParsersAction):
            raise argparse.ArgumentError(None, f"unknown command {value!r}{hint}; the commands are: {', '.join(shown)}")
        raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint}; choose from {', '.join(shown)}")

    def _leftover_message(self, extras: list[str], given: list[str]) -> str:
        """What is wrong with the arguments left over: unknown options (a value after one is taken as its
        value, not reported), else arguments too many. Whatever follows ``--`` is an argument, not an option."""
        end = given.index("--") if "--" in given else len(given)
        options = given[:end]
        unknown = [a.split("=", 1)[0] for a in extras
                   if a in options and a.startswith("-") and not _NUMBER_OR_STDIN.fullmatch(a)]
        if not unknown:
            lines = [f"unexpected argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"]
            if not set(extras) <= set(given[end:]):  # not only what was given after --
                lines += [hint for option, hint in self.hints.items()
                          if any(a == option or a.startswith(option + "=") for a in options)]
            return "\n".join(lines)
        actions = [a for a in self._actions if a.option_strings and a.help != argparse.SUPPRESS]
        longs = [o for a in actions for o in a.option_strings if o.startswith("--")]
        lines = [f"unknown option {o}{did_you_mean(o, longs) or self._passed_on(o, extras, given)}"
                 for o in dict.fromkeys(unknown)]
        names = ["/".join(sorted(a.option_strings, key=lambda o: (not o.startswith("--"), o))) for a in actions]
        return "\n".join(lines) + "\n" + textwrap.fill(f"valid options: {', '.join(names)}", width=100,
                                                        subsequent_indent="  ", break_on_hyphens=False)

    def _passed_on(self, option: str, extras: list[str], given: list[str]) -> str:
        """`` (pass sbatch options as --sbatch-arg=--gres=gpu:1)`` for an unknown long option, with the value
        given to it (``--gres=gpu:1``, or ``--gres gpu:1`` when gpu:1 was left over); '' without a passthrough."""
        if self.passthrough is None or not option.startswith("--"):
            return ""
        at = next(i for i, a in enumerate(given) if a == option or a.startswith(option + "="))
        written = given[at]
        after = given[at + 1] if at + 1 < len(given) else None
        if "=" not in written and after is not None and after in extras and not after.startswith("-"):
            written = f"{option}={after}"
        return f" (pass {self.passthrough.what} options as {self.passthrough.flag}={written})"


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An option that hands options on to another program: ``--sbatch-arg`` for sbatch."""

    what: str  # the program, as the message names it
    flag: str


def did_you_mean(word: str, candidates: Iterable[str], *, quote: bool = False) -> str:
    """`` (did you mean X?)`` for the candidate ``word`` begins, when only one does (``--dry`` and ``-d``:
    ``--dry-run``), else for the closest ('' when none is close). Options are compared without their dashes."""
    by_name = {c.lstrip("-"): c for c in candidates}
    name = word.lstrip("-")
    close = [c for n, c in by_name.items() if name and n.startswith(name)]
    if len(close) != 1:  # one letter wrong in two (--bi for --by) is close too
        cutoff = 0.5 if len(name) <= 2 else 0.6
        close = [by_name[n] for n in difflib.get_close_matches(name, by_name, n=1, cutoff=cutoff)]
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if quote else f" (did you mean {close[0]}?)"


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


# A comma outside [...]: "sim-[1,2]" is one glob (task ids hold no commas).
_PATTERN_SEP = re.compile(r",(?![^\[]*\])")
RUN_HINTS = {"--only": "--only takes one value: give several tasks as --only a,b or as --only a --only b"}


def task_patterns(text: str) -> list[str]:
    """``--only``'s value: task ids or globs, comma-separated."""
    patterns = [p.strip() for p in _PATTERN_SEP.split(text)]
    if not all(patterns):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty task name (write --only a,b)")
    return patterns


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
    parser = Parser(
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

    p = sub.add_parser("run", help="run the job's tasks on this machine (resumes an earlier run)", hints=RUN_HINTS,
                       description="Run the job: dependency-driven, resumable. Exit 0 when every task "
                                   "succeeded, 1 when some failed, 2 for a bad spec or flag, "
                                   "130/143/138 when interrupted by SIGINT/SIGTERM/SIGUSR1.")
    p.add_argument("spec", metavar="SPEC", help="job spec YAML file")
    p.add_argument("--fresh", action="store_true", help="start over: the old run directory is kept aside")
    p.add_argument("--prune-superseded", action="store_true",
                   help="first remove every earlier output set kept in RUN_DIR/superseded/ (without it, each run "
                        "keeps the newest job.keep_superseded per task, 3 by default)")
    p.add_argument("--only", action="extend", type=task_patterns, metavar="TASK[,TASK...]", default=None,
                   help="run only these tasks (globs allowed; repeat the flag or join tasks with commas) and "
                        "the dependencies they still need")
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
                       description="Show the counts of tasks by state and each task's state, attempts, "
                                   "duration and, for failures, the last lines of its stderr (of a run of more "
                                   "than 1,000 tasks, only the running and troubled ones: --all lists every one).")
    p.add_argument("run_dir", metavar="RUN_DIR|SPEC",
                   help="the run directory, or a job spec (its run directory, found as run finds it)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--explain", action="store_true",
                   help="say whether each task will run next time, and why (compares with the spec file now)")
    p.add_argument("--all", action="store_true",
                   help="list every task, however many (text format; json always lists every task)")
    p.set_defaults(options=lambda a: o.StatusOptions(a.run_dir, a.format, a.explain, a.all))

    p = sub.add_parser("export", help="write a run's provenance as a Workflow Run RO-Crate",
                       description="Write the provenance of a finished run as a Workflow Run RO-Crate "
                                   "(Provenance Run Crate 0.5): the spec and plan, every task's run with its "
                                   "inputs and outputs (sha256), the models and the ledger's head hash.")
    p.add_argument("run_dir", metavar="RUN_DIR|SPEC",
                   help="the run directory, or a job spec (its run directory, found as run finds it)")
    p.add_argument("--format", choices=("ro-crate",), default="ro-crate", help="what to write")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="the crate's directory, new or empty (default: RUN_DIR/ro-crate)")
    p.add_argument("--copy", action="store_true",
                   help="copy the outputs and inputs into the crate (default: referenced where they are)")
    p.add_argument("--license", metavar="URL", help="the crate's license, e.g. https://spdx.org/licenses/CC-BY-4.0")
    p.add_argument("--cache-dir", metavar="DIR", help="the analysis cache the run used (for its LLM edges)")
    p.set_defaults(options=lambda a: o.ExportOptions(a.run_dir, a.format, a.output, a.copy, a.license, a.cache_dir))

    p = sub.add_parser("report", help="write the run report: one self-contained HTML page of a run",
                       description="Write the run's report (summary, timeline, utilisation, tasks, costs, DAG) "
                                   "as one self-contained HTML file, RUN_DIR/report.html unless -o says where. "
                                   "A run writes it itself as it ends, and refreshes it while it runs.")
    p.add_argument("run_dir", metavar="RUN_DIR|SPEC",
                   help="the run directory, or a job spec (its run directory, found as run finds it)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write it (default RUN_DIR/report.html)")
    p.set_defaults(options=lambda a: o.ReportOptions(a.run_dir, a.output))

    _add_ledger(sub)
    _add_slurm(sub)

    p = sub.add_parser("schema", help="print a JSON Schema shipped with cmbagent-batch",
                       description="Print a JSON Schema (for editors: yaml-language-server, VS Code).")
    p.add_argument("name", nargs="?", default="job", choices=("job", "plan", "run", "ledger-entry"))
    p.set_defaults(options=lambda a: o.SchemaOptions(a.name))
    return parser


def _run_options(a: argparse.Namespace) -> o.RunOptions:
    return o.RunOptions(spec=a.spec, fresh=a.fresh, only=tuple(a.only) if a.only is not None else None,
                        prune_superseded=a.prune_superseded, dry_run=a.dry_run, quiet=a.quiet,
                        walltime_grace=a.walltime_grace, walltime_file=a.walltime_file, cache_dir=a.cache_dir,
                        flags=flags(a))


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
                                    "the shipped cmbagent_batch/spec/prices/table.json) and compare by model.")
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
        "submit", passthrough=Passthrough("sbatch", "--sbatch-arg"), help="write the job's sbatch script, submit it, and print the job id",
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
