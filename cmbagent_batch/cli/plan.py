"""``cmbagent-batch plan``: load, analyse, build the DAG, print; the plan is cached by the spec file's bytes
(``plan/cached.py``), so an unchanged 10^5-task spec reprints in about a second."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from cmbagent_batch.cli.console import problem, warn
from cmbagent_batch.cli.options import PlanOptions
from cmbagent_batch.errors import ExitCode

if TYPE_CHECKING:
    from cmbagent_batch.execute.placing import Placing


def plan(opts: PlanOptions) -> int:
    from cmbagent_batch.plan import render
    from cmbagent_batch.plan.build import schema_form
    from cmbagent_batch.plan.cached import cached_plan
    from cmbagent_batch.plan.preflight import Checks

    if opts.estimate:
        return _estimate(opts)
    placing = _placing(opts)  # a task that can never fit is refused here, as `run` refuses it
    made = cached_plan(opts.spec, opts.flags, opts.cache_dir, warn, refresh=opts.refresh_analysis,
                       checks=Checks(os.environ, problem))
    if opts.format == "text":
        notes = _inventory_lines(placing) if placing is not None else []
        out = render.text(made, notes)  # counts and the first ids of each level: no object per task needed
    else:
        out = {"json": _json, "dot": render.dot, "mermaid": render.mermaid}[opts.format](schema_form(made))
    sys.stdout.write(out)
    return ExitCode.OK


def _placing(opts: PlanOptions) -> Placing | None:
    """The inventory the job's tasks would be placed on and those skipped as they can never fit there, as
    `run` finds them here; None for a job that books nothing. Whether it books is cached with the plan's
    key, so that an unchanged job of default shapes is not loaded again to say so."""
    from cmbagent_batch.execute.placing import booking_for, needs_booking
    from cmbagent_batch.plan.analysis.cache import Cache
    from cmbagent_batch.plan.cached import plan_key, read_spec_bytes, writable_cache_dir
    from cmbagent_batch.spec.config import effective_config
    from cmbagent_batch.spec.loader import load_spec_bytes

    raw = read_spec_bytes(opts.spec)
    cache, key = Cache(writable_cache_dir(opts.spec, opts.cache_dir), warn), plan_key(raw, opts.spec, opts.flags)
    if cache.get("books", key) == {"books": False}:
        return None
    spec = effective_config(load_spec_bytes(raw, opts.spec), os.environ, opts.flags).spec
    books = needs_booking(spec)
    cache.put("books", key, {"books": books})
    return booking_for(spec, os.environ) if books else None


def _inventory_lines(placing: Placing) -> list[str]:
    """``Inventory: ...`` (as `run` and `status` say it) and a line for each reason tasks are skipped."""
    lines = [f"Inventory: {placing.inventory.describe()}"]
    skipped: dict[str, list[str]] = {}
    for tid, why in placing.skipped.items():
        skipped.setdefault(why, []).append(tid)
    for why, ids in skipped.items():
        more = f" and {len(ids) - 3:,} more" if len(ids) > 3 else ""
        lines.append(f"Skipped (when_unplaceable: skip), with what depends on it: "
                     f"{', '.join(map(repr, ids[:3]))}{more}: {why}")
    return lines


def _json(plan: dict[str, Any]) -> str:
    # Indented output goes through json's pure-Python encoder: fine for people, slow for 10^5 tasks.
    if len(plan["tasks"]) <= 1000:
        return json.dumps(plan, indent=1) + "\n"
    return json.dumps(plan, separators=(",", ":")) + "\n"


def _estimate(opts: PlanOptions) -> int:
    """``plan --estimate``: what the job's LLM calls may cost; makes no call, and needs no API key."""
    from cmbagent_batch.plan.cached import cache_dir, job_estimate, read_spec_bytes
    from cmbagent_batch.plan.estimate import render
    from cmbagent_batch.plan.preflight import Checks, check
    from cmbagent_batch.spec.config import effective_config
    from cmbagent_batch.spec.loader import load_spec_bytes

    spec = effective_config(load_spec_bytes(read_spec_bytes(opts.spec), opts.spec), os.environ, opts.flags).spec
    check(spec, cache_dir(opts.spec, opts.cache_dir), Checks(os.environ, problem, keys=False))
    est = job_estimate(spec, opts.spec, opts.cache_dir, warn)
    sys.stdout.write(json.dumps(est, indent=1) + "\n" if opts.format == "json" else render(est))
    return ExitCode.OK
