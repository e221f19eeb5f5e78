"""Every failure a user can cause or meet, as one exception family.

The CLI maps these to exit codes (see ``cli.py``): user mistakes exit 2 without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchError(Exception):
    """Base class of every error cmbagent-batch reports to the user."""

    exit_code = 2


class UsageError(BatchError):
    """A command line, environment variable or file argument is wrong."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a spec, located in its file."""

    file: str
    line: int | None  # 1-based; None when the problem concerns the whole file
    column: int | None  # 1-based
    path: str  # JSON path, e.g. "$.tasks[3].depends_on[0]"
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
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

    exit_code = 1


class LocalModelError(BatchError):
    """A local model's server (``provider: local``) could not be started or is not installed."""

    exit_code = 1
