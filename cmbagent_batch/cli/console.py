"""What every command may print besides its output: warnings, on stderr."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"cmbagent-batch: warning: {message}", file=sys.stderr)


def problem(line: str) -> None:
    """A located problem (``FILE:LINE:COL: $.path: warning: ...``), as ``validate`` prints it."""
    print(line, file=sys.stderr)
