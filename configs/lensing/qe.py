"""Quadratic-estimator reconstruction of one sky patch (a stand-in: it records what it was given)."""

from __future__ import annotations

from pathlib import Path


def reconstruct(field: str, filtered: str, out: str) -> str:
    Path(out).write_text(f"phi of {field} from {Path(filtered).read_text()}")
    return out
