"""``cmbagent-batch plan``: load, analyse, build the DAG, print; the plan is cached by the spec file's bytes
(``plan/cached.py``), so an unchanged 10^5-task spec reprints in about a second."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from cmbagent_batch.cli.console import problem, warn
from cmbagent_batch.cli.options import PlanOptions
from cmbagent_batch.errors import ExitCode


def plan(opts: PlanOptions) -> int:
    from cmbagent_batch.plan import render
    from cmbagent_batch.plan.build import schema_form
    from cmbagent_batch.plan.cached import cached_plan
    from cmbagent_batch.plan.preflight import Checks

    if opts.estimate:
        return _estimate(opts)
    made = cached_plan(opts.spec, opts.flags, opts.cache_dir, warn, refresh=opts.refresh_analysis,
                       checks=Checks(os.environ, problem))
    if opts.format == "text":
        out = render.text(made)  # counts and the first ids of each level: no object per task needed
    else:
        out = {"json": _json, "dot": render.dot, "mermaid": render.mermaid}[opts.format](schema_form(made))
    sys.stdout.write(out)
    return ExitCode.OK


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
