"""Amounts of USD as every output of the ledger shows them (standard library only; the report page uses it).

From a dollar up: two decimals, with thousands separators (``$1,234.50``). Below a dollar: three
significant digits, with two decimals at least and no trailing zeros beyond them (``$0.24``, ``$0.119``,
``$0.0123``, ``$0.000238``, ``$0.0002``). So a sum that is not zero never reads ``$0.00``, and a spend of
$0.0119 against a $0.01 budget does not read "$0.01 of $0.01". Machine-readable outputs (JSON, CSV) keep
the full number.

Sums of amounts are compensated (``Total``, or ``math.fsum`` over values at hand): a plain ``+=`` drifts by
some 1e-16, so the same costs added in another order would differ, and a difference of equal sums would read
``-$0.000000000000000111``. An amount below ``NOISE`` (a ten-thousandth of a token at any price) is such
drift, never a cost, and reads ``$0.00``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SIGNIFICANT = 3  # digits shown of an amount below a dollar
TWO_DECIMALS_FROM = 1.0  # from this amount up, cents are enough
NOISE = 1e-10  # dollars: below this, an amount is rounding drift and reads $0.00


def usd(value: float) -> str:
    """``value`` dollars for people: ``$0.00`` only for zero (or drift below ``NOISE``); a minus sign before
    the dollar sign."""
    if abs(value) < NOISE:
        return "$0.00"
    if not math.isfinite(value):
        return f"${value}"
    sign, size = ("-" if value < 0 else ""), abs(value)
    if size >= TWO_DECIMALS_FROM:
        return f"{sign}${size:,.2f}"
    decimals = max(2, SIGNIFICANT - 1 - math.floor(math.log10(size)))
    whole, fraction = f"{size:.{decimals}f}".split(".")
    return f"{sign}${whole}.{fraction.rstrip('0').ljust(2, '0')}"


class Total:
    """A running sum of amounts, compensated (Neumaier): what ``+=`` loses to rounding is kept apart and added
    back, so the order of the terms does not show in ``value``. Two floats, whatever the number of terms."""

    __slots__ = ("_low", "_sum")

    def __init__(self) -> None:
        self._sum = 0.0
        self._low = 0.0  # what the additions to ``_sum`` rounded away

    def add(self, value: float) -> None:
        high = self._sum + value
        if abs(self._sum) >= abs(value):
            self._low += (self._sum - high) + value
        else:
            self._low += (value - high) + self._sum
        self._sum = high

    @property
    def value(self) -> float:
        return self._sum + self._low

    @staticmethod
    def of(totals: Iterable[Total]) -> float:
        """The sum of several running sums, as exact as each of them (their parts are added, not their values)."""
        return math.fsum(part for t in totals for part in (t._sum, t._low))
