"""``cmbagent-batch status``: each task's state, attempts, duration and, for failures, its stderr's end."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from cmbagent_batch.cli.console import warn
from cmbagent_batch.cli.options import StatusOptions
from cmbagent_batch.cli.slurm_status import slurm_lines, slurm_status
from cmbagent_batch.errors import ExitCode, UsageError
from cmbagent_batch.rundir.journal import replay
from cmbagent_batch.rundir.layout import journal_paths, read_json, runner_gone, tail_lines
from cmbagent_batch.states import TaskState

# The states whose row says why and shows the end of the task's stderr.
_TROUBLED = frozenset({TaskState.FAILED, TaskState.INTERRUPTED, TaskState.CANCELLED, TaskState.UPSTREAM_FAILED,
                       TaskState.BUDGET_EXCEEDED})


def status(opts: StatusOptions) -> int:
    run_dir = opts.run_dir
    manifest_path = os.path.join(run_dir, "run.json")
    slurm = slurm_status(run_dir)
    if not os.path.isfile(manifest_path):
        if slurm is None:
            raise UsageError(f"{run_dir} is not a run directory (no run.json)")
        if opts.format == "json":
            print(json.dumps({"run_dir": run_dir, "status": "submitted", "slurm": slurm, "tasks": []}, indent=1))
        else:
            print(f"Run directory {run_dir}: the job has not started yet")
            print("\n".join(slurm_lines(slurm)))
        return ExitCode.OK
    manifest = read_json(manifest_path)
    journals = journal_paths(run_dir)
    history = replay(journals, warn)
    gone_since = None
    if manifest["status"] == "running" and runner_gone(run_dir):
        manifest = read_json(manifest_path)  # it may have ended, and said so, since the first read
        if manifest["status"] == "running":  # no: the runner died without a word (SIGKILL...)
            gone_since = max([os.path.getmtime(p) for p in journals if os.path.exists(p)] or
                             [os.path.getmtime(manifest_path)])
    job_status = manifest["status"] if gone_since is None else \
        f"interrupted (runner gone since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(gone_since))})"
    rows = []
    explain: dict[str, str | None] = {}
    if opts.explain:
        explain = _explanations(manifest, os.path.abspath(run_dir))
    for tid, t in sorted(manifest["tasks"].items()):
        h = history.get(tid)
        state = h.state.value if h else t["state"]
        if gone_since is not None and state == TaskState.RUNNING.value:
            state = TaskState.INTERRUPTED.value
        row = {"id": tid, "state": state, "attempts": h.attempts if h else t["attempts"], "rank": t.get("rank"),
               "wall_s": (h.record.get("wall_s") if h else None) or t.get("wall_s"), "work_dir": t["work_dir"]}
        if state in _TROUBLED:
            row["reason"] = (h.record.get("reason") or h.record.get("error")) if h else t.get("reason")
            row["stderr_tail"] = tail_lines(os.path.join(t["work_dir"], "logs", "stderr.log"), 5)
        if opts.explain:
            row["next_run"] = "skip (up to date)" if explain.get(tid) is None else f"run ({explain[tid]})"
        rows.append(row)
    ledger, budget = manifest.get("ledger"), manifest.get("budget_usd")
    if opts.format == "json":
        print(json.dumps({"run_dir": run_dir, "job": manifest["job"],
                          "status": "interrupted" if gone_since is not None else job_status,
                          "runner_gone_since": gone_since,
                          "exit_code": manifest.get("exit_code"), "ledger": ledger, "budget_usd": budget,
                          "slurm": slurm, "tasks": rows}, indent=1))
        return ExitCode.OK
    print(f"Job {manifest['job']} in {run_dir}: {job_status}"
          + (f", exit code {manifest['exit_code']}" if manifest.get("exit_code") is not None else ""))
    if slurm is not None:
        print("\n".join(slurm_lines(slurm)))
    if ledger or budget is not None:
        cost = ledger["cost_usd"] if ledger else 0.0
        line = f"LLM cost: ${cost:.4f} over {ledger['entries'] if ledger else 0} model calls"
        if budget is not None:
            line += f", {100 * cost / budget:.1f}% of job.budget_usd ${budget:.4f}" if budget else ", budget $0"
        print(line + (f" (ledger: {os.path.join(run_dir, ledger['file'])})" if ledger else ""))
    width = max((len(r["id"]) for r in rows), default=4)
    for r in rows:
        wall = f"{r['wall_s']:.2f}s" if isinstance(r.get("wall_s"), (int, float)) else "-"
        line = f"  {r['id']:<{width}}  {r['state']:<15} attempts {r['attempts']}  {wall:>9}"
        if "next_run" in r:
            line += f"  next: {r['next_run']}"
        print(line)
        if r.get("reason"):
            print(f"      {r['reason']}")
        for tail in r.get("stderr_tail") or []:
            print(f"      | {tail}")
    return ExitCode.OK


def _explanations(manifest: dict[str, Any], run_dir: str) -> dict[str, str | None]:
    """Why each task would run next time, against the spec file as it is now."""
    from cmbagent_batch.execute.prepare import prepare, why_rerun
    from cmbagent_batch.plan.analysis.cache import Cache
    from cmbagent_batch.plan.cached import cache_dir
    from cmbagent_batch.spec.config import effective_config
    from cmbagent_batch.spec.loader import load_spec

    spec_path = manifest["spec"]["path"]
    config = effective_config(load_spec(spec_path), os.environ, {})
    cache = Cache(cache_dir(spec_path, None), warn)
    prepared = prepare(config, cache, warn, run_dir=run_dir, offline=True)
    return {tid: why_rerun(prepared, tid) for tid in prepared.dag.nodes}
