"""Numbers read from text (command-line flags, environment variables): one family of pure parsers.

Each raises ``ValueError`` with the message people read; the callers only add the place (a flag's
``argparse`` error, an environment variable's ``UsageError``). Flags and variables word it differently
(a flag's message repeats the text given, a variable's error already shows it), so the wording is a
parameter, the check is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)


@dataclass(frozen=True, slots=True)
class Wording:
    """What a parser says when the text is not a number, and when the number is out of range."""

    not_a_number: str
    out_of_range: str


def number(text: str, kind: Callable[[str], N], minimum: N, wording: Wording, *, above: bool = False) -> N:
    """``text`` as a ``kind`` of at least ``minimum`` (above it, with ``above``), finite; else a
    ``ValueError`` worded by ``wording``."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(wording.not_a_number) from None
    too_small = value <= minimum if above else value < minimum
    if too_small or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(wording.out_of_range)
    return value


def expected(what: str, text: str) -> Wording:
    """The command line's wording: "expected WHAT, got 'TEXT'" whatever is wrong."""
    message = f"expected {what}, got {text!r}"
    return Wording(message, message)


# --- the command line's flags -------------------------------------------------------------------------


def flag_number(kind: Callable[[str], N], minimum: N, what: str) -> Callable[[str], N]:
    """A parser for a flag's value: ``kind`` of at least ``minimum``, finite; "expected WHAT, got 'TEXT'"."""

    def parse(text: str) -> N:
        return number(text, kind, minimum, expected(what, text))

    return parse


positive_int = flag_number(int, 1, "a whole number of at least 1")
count = flag_number(int, 0, "a whole number of at least 0")
positive_float = flag_number(float, 1e-9, "a finite number above 0")
grace_seconds = flag_number(float, 0.0, "a number of seconds, 0 or more")
usd = flag_number(float, 0.0, "an amount of USD of at least 0")


# --- environment variables (the error names the variable and its value) -------------------------------


def env_whole(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""
    wording = Wording("expected a whole number", f"expected a number of at least {minimum}")

    def parse(text: str) -> int:
        return number(text.strip(), int, minimum, wording)

    return parse


_SECONDS = Wording("expected a number of seconds", "expected a finite number of seconds above 0")


def env_seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    return number(text.strip(), float, 0.0, _SECONDS, above=True)
