"""Toy cosmology functions used by the example jobs (pure Python, no dependencies)."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def power_spectrum(params: str, lmax: int, out: str, ctx: Any = None) -> dict[str, float]:
    """Write a toy TT spectrum D_l (a damped acoustic oscillation) for l = 2..lmax; return a summary.

    Paths are relative to the task's work directory (``ctx.work_dir``), which python tasks get as
    ``ctx`` whether they run in threads or in processes.
    """
    if ctx is not None:
        params, out = os.path.join(ctx.work_dir, params), os.path.join(ctx.work_dir, out)
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
