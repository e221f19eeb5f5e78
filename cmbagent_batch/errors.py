"""Every failure a user can cause or meet, as one exception family, and the exit codes they map to.

The CLI maps these to exit codes (``cli/main.py``): user mistakes exit 2 without a traceback.

    BatchError                      exit 2 unless said otherwise
    ├── UsageError                  a command line, variable or file argument is wrong, or a place is unwritable
    │   ├── PriceTableError         a price table file is not one (also a ValueError)
    │   └── JobsRecordError         RUN_DIR/slurm/jobs.json is not a jobs record (also a ValueError)
    ├── SpecError                   a job spec is invalid: every problem, in file order
    ├── CycleError                  the dependency graph has a cycle
    ├── AnalysisError               exit 1: LLM dependency analysis failed
    │   └── LlmAnalysisError        ... with the calls made before it did
    ├── LocalModelError             exit 1: a local model's server cannot start
    ├── LedgerError                 a ledger file is missing, unreadable or not a ledger
    ├── SlurmError                  a Slurm command is missing or refused (exit 2; 1 when it hangs)
    ├── MPIUnavailable              the MPI backend was chosen without a loadable mpi4py
    ├── NoWorkerRanks               an MPI job of one rank (the caller runs the tasks locally)
    ├── DiskFullError               exit 1: the run directory's file system is full, before anything started
    ├── SandboxError                an agent's code cannot be confined
    └── AgentFailure                an agent attempt fails with this message
        └── BudgetSpent             ... because a budget is spent
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

MISSING_MPI4PY = "the MPI backend needs mpi4py: pip install 'cmbagent-batch[mpi]'"


class ExitCode(IntEnum):
    """Every exit code of ``cmbagent-batch`` (and of the processes it starts and reads back)."""

    OK = 0
    """Done; every task succeeded or was up to date (``ledger diff``: the ledgers agree)."""
    FAILED = 1
    """Some tasks failed, an analysis failed (``analysis.fallback: error``), or ledgers differ."""
    USAGE = 2
    """A bad spec, flag, variable or file, or a place that cannot be written: a message naming the place,
    no traceback."""
    INTERNAL = 3
    """A bug: the traceback is written to a log file whose path is printed."""
    SIGINT = 130
    """Interrupted by SIGINT (128 + 2); a rerun continues."""
    SIGTERM = 143
    """Interrupted by SIGTERM (128 + 15); a rerun continues."""
    SIGUSR1 = 138
    """Stopped by SIGUSR1, Slurm's warning before the walltime (128 + 10); a requeue continues."""


class BatchError(Exception):
    """Base class of every error cmbagent-batch reports to the user."""

    exit_code: int = ExitCode.USAGE


class UsageError(BatchError):
    """A command line, environment variable or file argument is wrong, or a directory or file a command
    is to write cannot be written (checked before anything starts)."""


class PriceTableError(UsageError, ValueError):
    """A price table (the shipped one, or a file given to ``ledger reprice``) is not one; the message
    names the file and the entry. Also a ``ValueError``, as a parser's refusal of its input."""


class JobsRecordError(UsageError, ValueError):
    """``RUN_DIR/slurm/jobs.json`` exists but is not a jobs record. Also a ``ValueError``, like the
    JSON decoder's refusal of a file that is not JSON, so a reader handles both alike."""


class Severity(Enum):
    """How bad a problem is: an error stops the command (exit 2); a warning is printed and it goes on."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a spec, located in its file."""

    file: str
    line: int | None  # 1-based; None when the problem concerns the whole file
    column: int | None  # 1-based
    path: str  # JSON path, e.g. "$.tasks[3].depends_on[0]"
    message: str
    task: str | None = None  # the id of the task entry the path is in, as written (a matrix entry's template)
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        message = self.message if self.severity is Severity.ERROR else f"warning: {self.message}"
        if self.line is None:
            return f"{self.file}: {message}"
        where = self.path if self.task is None else f"{self.path} (task {self.task!r})"
        return f"{self.file}:{self.line}:{self.column}: {where}: {message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "task": self.task,
            "severity": self.severity.value,
            "message": self.message,
        }


class SpecError(BatchError):
    """A job spec is invalid; carries every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        # Stable sort by place only: problems at one place keep the order they were given in.
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.column or 0))
        super().__init__("\n".join(str(p) for p in self.problems))


class CycleError(BatchError):
    """The dependency graph has a cycle; ``cycle`` lists it, first id repeated at the end."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join(cycle))


class AnalysisError(BatchError):
    """LLM dependency analysis failed (endpoint error or unusable replies)."""

    exit_code = ExitCode.FAILED


class LlmAnalysisError(AnalysisError):
    """Analysis failed; ``calls`` holds the attempts made before it did (``plan.analysis.llm.LlmCall``
    records), for the cost ledger. Typed loosely: this module imports nothing of the package."""

    def __init__(self, message: str, calls: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.calls = tuple(calls)


class LocalModelError(BatchError):
    """A local model's server (``provider: local``) could not be started or is not installed."""

    exit_code = ExitCode.FAILED


class GatewayError(BatchError):
    """A rank's metering gateway could not be started, or stopped answering."""

    exit_code = ExitCode.FAILED


class LedgerError(BatchError):
    """A ledger file is missing, unreadable or not a ledger (exit 2)."""


class SlurmError(BatchError):
    """A Slurm command is missing or refused; ``exit_code`` 2 when the submission itself is wrong."""

    def __init__(self, message: str, exit_code: int = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MPIUnavailable(BatchError):
    """The MPI backend was chosen but mpi4py, or the MPI library under it, cannot be loaded."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(MISSING_MPI4PY if reason is None else f"{MISSING_MPI4PY} ({reason})")


class NoWorkerRanks(BatchError):
    """The MPI job has a single rank: there is no worker rank to run tasks on.

    The caller catches it to warn and run the tasks locally instead.
    """

    def __init__(self) -> None:
        super().__init__("the MPI job has 1 rank, so no worker rank to run tasks on "
                         "(start it with mpiexec -n 2 or more)")


class DiskFullError(BatchError):
    """The run directory's file system is full (or the quota used up) before the run could start."""

    exit_code = ExitCode.FAILED


class SandboxError(BatchError):
    """Code cannot be confined: Landlock is missing, a writable path does not exist, or the kernel refused."""


class AgentFailure(BatchError):
    """The attempt fails with this message (it says what went wrong; no traceback)."""


class BudgetSpent(AgentFailure):
    """A budget is spent: no further call is made."""
