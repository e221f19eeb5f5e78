"""A spec file's plan, cached by the file's bytes, and the cost estimate of its LLM calls.

An unchanged spec file (same bytes, same overriding variables and flags, same cmbagent-batch) is not
parsed again: its plan comes from the cache, so a 10^5-task plan reprints in about a second.
Shared by the ``plan``, ``run``, ``status`` and ``submit`` commands; warnings go to the ``warn`` given.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from cmbagent_batch import __version__
from cmbagent_batch.errors import UsageError
from cmbagent_batch.plan.analysis.cache import Cache, digest
from cmbagent_batch.plan.analysis.deps import ANALYSIS_VERSION, analyse
from cmbagent_batch.plan.analysis.llm_reply import PROMPT_VERSION
from cmbagent_batch.plan.build import build_dag, make_plan
from cmbagent_batch.plan.preflight import Checks, Needs, analysis_calls
from cmbagent_batch.rundir.atomic import writable_dir
from cmbagent_batch.rundir.layout import resolve_run_dir, server_logs
from cmbagent_batch.spec.config import ENV_VARS, SWITCHES, Flags, effective_config
from cmbagent_batch.spec.loader import load_spec_bytes
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.yamlio import read_bytes

Warn = Callable[[str], None]
Plan = dict[str, Any]  # the plan as JSON data, its tasks as columns (``build.schema_form``: ``plan --format json``)
PLAN_RECORD = 2  # the form of a cached plan: 2, tasks as columns


def cache_dir(spec_path: str, flag: str | None) -> str:
    """--cache-dir, else $CMBAGENT_CACHE_DIR, else .cmbagent-batch/cache beside the spec file."""
    chosen = flag or os.environ.get("CMBAGENT_CACHE_DIR")
    if chosen is not None and not chosen.strip():
        raise UsageError(f"environment variable CMBAGENT_CACHE_DIR={chosen!r}: expected a non-empty value")
    return chosen or os.path.join(os.path.dirname(os.path.abspath(spec_path)), ".cmbagent-batch", "cache")


def writable_cache_dir(spec_path: str, flag: str | None) -> str:
    """``cache_dir``, made if missing and checked writable, else ``UsageError`` naming it: checked by every
    command that may write to it (``plan``, ``run``, ``submit``) before an analysis is made or a task starts."""
    return writable_dir(cache_dir(spec_path, flag), "cache directory")


def plan_key(raw: bytes, spec_path: str, flags: Flags) -> str:
    """What a plan depends on besides the LLM's answers (which have their own cache)."""
    env = {v: os.environ[v] for v in sorted(list(ENV_VARS) + list(SWITCHES)) if v in os.environ}
    env.pop("CMBAGENT_CACHE_DIR", None)
    return digest(
        {
            "spec_sha256": hashlib.sha256(raw).hexdigest(),
            "path": os.path.abspath(spec_path),
            "env": env,
            "flags": {k: v for k, (v, _) in sorted(flags.items()) if v is not None and k != "analysis.cache_dir"},
            "version": __version__,
            "analysis": ANALYSIS_VERSION,
            "prompt": PROMPT_VERSION,
            "record": PLAN_RECORD,
        }
    )


def read_spec_bytes(path: str) -> bytes:
    """The spec file's bytes; a file that cannot be read is a SpecError."""
    return read_bytes(path)


def compute_plan(raw: bytes, path: str, flags: Flags, cache: Cache, refresh: bool, warn: Warn,
                 offline: bool = False, checks: Checks | None = None) -> tuple[Plan, Needs]:
    """The plan, made (its LLM analysis too, unless cached), and what the job needs of where it runs;
    ``checks`` of those needs are made before any analysis call."""
    from cmbagent_batch.ledger.costs import job_budget_spent, merge_ledger

    spec = effective_config(load_spec_bytes(raw, path), os.environ, flags).spec
    needs = Needs.of(spec)
    if checks is not None:
        checks(needs, analysis_calls(spec, cache.root, refresh))
    run_dir = resolve_run_dir(spec)
    calls: list[object] = []
    try:
        analysis = analyse(spec, cache, refresh=refresh, warn=warn, record_calls=_ledger(spec, run_dir, calls),
                           budget_spent=job_budget_spent(run_dir, spec), offline=offline,
                           server_logs=server_logs(run_dir))
    finally:
        if calls:  # analysis calls cost money even when no run follows: merged into the ledger now
            merge_ledger(run_dir, warn)
    dag = build_dag(spec, analysis)
    return make_plan(spec, analysis, dag), needs


def _ledger(spec: JobSpec, run_dir: str, made: list[object]) -> Callable[[Sequence[Any]], None]:
    """A ``record_calls`` that journals analysis calls for RUN_DIR/ledger.jsonl (and keeps them in ``made``)."""
    import socket
    import uuid

    from cmbagent_batch.ledger.costs import analysis_recorder

    record = analysis_recorder(run_dir, spec, "plan-" + uuid.uuid4().hex[:8], socket.gethostname())

    def journal(calls: Sequence[Any]) -> None:
        record(calls)
        made.extend(calls)

    return journal


def cached_plan(spec_path: str, flags: Flags, cache_flag: str | None, warn: Warn, refresh: bool = False,
                offline: bool = False, checks: Checks | None = None) -> Plan:
    """The plan of a spec file: from the cache when the file (and what overrides it) is unchanged, else
    made (an uncached LLM analysis is then made too, or raises ``AnalysisError`` with ``offline``).
    ``checks``: the preflight, made first; a cached plan's is made from the needs cached with it."""
    raw = read_spec_bytes(spec_path)
    cache = Cache(writable_cache_dir(spec_path, cache_flag), warn)
    key = plan_key(raw, spec_path, flags)
    plan: Plan | None = None if refresh else cache.get("plan", key)
    record = cache.get("needs", key) if plan is not None and checks is not None else None
    needs = Needs.from_json(record, spec_path) if record is not None else None
    if needs is not None and checks is not None:
        checks(needs, lambda: False)  # the plan is cached: so is its analysis
    elif checks is not None:
        plan = None  # the needs are read from the spec, which then makes its plan
    if plan is not None:
        plan["from_cache"] = True
        a = plan["analysis"]
        for stale in ("changed", "reused_edges", "notes"):  # they described the invocation that analysed
            a.pop(stale, None)
        if a.get("model"):
            a.update(cache="hit", requests=0, calls=[], cost_usd=0.0, prompt_tokens=0, completion_tokens=0,
                     cache_reason="unchanged spec file; plan and analysis reused")
        return plan
    plan, made = compute_plan(raw, spec_path, flags, cache, refresh, warn, offline=offline, checks=checks)
    if not plan["analysis"].get("fallback_used"):
        cache.put("plan", key, plan)
        cache.put("needs", key, made.to_json())
    plan["from_cache"] = False
    return plan


def job_estimate(spec: JobSpec, spec_path: str, cache_flag: str | None, warn: Warn) -> dict[str, Any]:
    """The cost estimate of ``spec``'s LLM calls; an uncached analysis is estimated, not run."""
    from cmbagent_batch.errors import AnalysisError
    from cmbagent_batch.plan.analysis.deps import explicit_edges
    from cmbagent_batch.plan.analysis.files import file_edges
    from cmbagent_batch.plan.analysis.llm_reply import build_messages
    from cmbagent_batch.plan.estimate import Analysis, estimate

    if "llm" not in spec.analysis.sources:
        return estimate(spec, Analysis.NOT_USED)
    cache = Cache(writable_cache_dir(spec_path, cache_flag), warn)
    try:
        analyse(spec, cache, refresh=False, warn=warn, offline=True)
    except AnalysisError:
        known = {(e.src, e.dst) for e in explicit_edges(spec.tasks) + file_edges(spec.tasks)}
        return estimate(spec, Analysis.ONE_CALL, sum(len(m["content"]) for m in build_messages(spec.tasks, known)))
    return estimate(spec, Analysis.CACHED)
