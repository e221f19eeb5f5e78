"""Toy cosmology functions used by the example jobs (pure Python, no dependencies)."""

from __future__ import annotations

import json
import math
from typing import Any


def power_spectrum(params: str, lmax: int, out: str, **_: Any) -> dict[str, float]:
    """Write a toy TT spectrum D_l (a damped acoustic oscillation) for l = 2..lmax; return a summary."""
    with open(params, encoding="utf-8") as fh:
        p = json.load(fh)
    amplitude = p["As"] * 1e9 * 2500.0
    rows = []
    for ell in range(2, lmax + 1):
        d_ell = amplitude * (1 + 0.4 * math.cos(ell / 220.0 * math.pi)) * math.exp(-((ell / 1500.0) ** 2))
        rows.append(f"{ell} {d_ell:.6f}\n")
    with open(out, "w", encoding="utf-8") as fh:
        fh.writelines(rows)
    return {"lmax": lmax, "n_multipoles": len(rows)}
