"""The ``cmbagent-batch`` command line: parse, run the command, and the one handler that maps errors to
exit codes (``errors.ExitCode``): 0 ok, 1 some tasks or an analysis failed, 2 bad spec or usage (no
traceback), 3 internal error (traceback written to a log file whose path is printed), 130 interrupted.

Each command's module is imported when that command runs, so ``validate`` starts fast.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence

from cmbagent_batch import __version__
from cmbagent_batch.cli import options as o
from cmbagent_batch.cli.parser import parse
from cmbagent_batch.errors import BatchError, ExitCode, SpecError, UsageError


def dispatch(opts: o.Options) -> int:
    """Run the command ``opts`` are for."""
    match opts:
        case o.ValidateOptions():
            from cmbagent_batch.cli.validate import validate

            return validate(opts)
        case o.ConfigOptions():
            from cmbagent_batch.cli.config import config

            return config(opts)
        case o.PlanOptions():
            from cmbagent_batch.cli.plan import plan

            return plan(opts)
        case o.RunOptions():
            from cmbagent_batch.cli.run import run

            return run(opts)
        case o.StatusOptions():
            from cmbagent_batch.cli.status import status

            return status(opts)
        case o.ReportOptions():
            from cmbagent_batch.cli.report import report

            return report(opts)
        case o.ExportOptions():
            from cmbagent_batch.cli.export import export

            return export(opts)
        case o.SubmitOptions():
            from cmbagent_batch.cli.submit import submit

            return submit(opts)
        case o.CancelOptions():
            from cmbagent_batch.cli.submit import cancel

            return cancel(opts)
        case o.AfterStepOptions():
            from cmbagent_batch.cli.submit import after_step

            return after_step(opts)
        case o.SchemaOptions():
            from cmbagent_batch.cli.schema import schema

            return schema(opts)
        case _:
            from cmbagent_batch.cli.ledger import ledger

            return ledger(opts)


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
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit code as a plain int."""
    return int(_handled(parse(None if argv is None else list(argv))))


def _handled(opts: o.Options) -> int:
    """The one error handler: every error becomes its exit code, a bug also a crash log."""
    try:
        return dispatch(opts)
    except SpecError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return ExitCode.USAGE
    except UsageError as exc:
        print(f"cmbagent-batch: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except BatchError as exc:
        print(f"cmbagent-batch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cmbagent-batch: interrupted", file=sys.stderr)
        return ExitCode.SIGINT
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a report
        path = _crash_log(exc)
        print(f"cmbagent-batch: internal error: {type(exc).__name__}: {exc}\n"
              f"The traceback is in {path}; please include it in a bug report.", file=sys.stderr)
        return ExitCode.INTERNAL
