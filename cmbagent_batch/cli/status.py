"""``cmbagent-batch status``: each task's state, attempts, duration and, for failures, its stderr's end.
It takes the run directory, or the job spec whose run directory to show."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from cmbagent_batch.cli.console import warn
from cmbagent_batch.cli.options import StatusOptions
from cmbagent_batch.cli.rundirs import no_run, run_dir_of
from cmbagent_batch.cli.slurm_status import slurm_lines, slurm_status
from cmbagent_batch.errors import ExitCode
from cmbagent_batch.rundir.layout import Layout, journal_paths, read_json, runner_gone, tail_lines
from cmbagent_batch.rundir.runview import TROUBLED, UP_TO_DATE, current_states, run_history, task_row
from cmbagent_batch.states import Tally, TaskState

TAIL = 5  # lines of a troubled task's stderr shown
_UNDER_WAY = frozenset({TaskState.RUNNING, TaskState.RETRYING})  # listed however many tasks the run has
LISTED = 1000  # of a run with more tasks, only the running and troubled ones are listed (--all: every one)
_ATTEMPT_HEADER = re.compile(r"# attempt (\d+)")  # what each attempt writes first in the task's logs


def status(opts: StatusOptions) -> int:
    run_dir, spec = run_dir_of(opts.run_dir, "status")
    manifest_path = os.path.join(run_dir, "run.json")
    slurm = slurm_status(run_dir)
    if not os.path.isfile(manifest_path):
        if slurm is None:
            raise no_run(run_dir, spec, "status")
        if opts.format == "json":
            print(json.dumps({"run_dir": run_dir, "status": "submitted", "slurm": slurm, "tasks": []}, indent=1))
        else:
            print(f"Run directory {run_dir}: the job has not started yet")
            print("\n".join(slurm_lines(slurm)))
        return ExitCode.OK
    manifest = read_json(manifest_path)
    journals = journal_paths(run_dir)
    gone_since = None
    if manifest["status"] == "running" and runner_gone(run_dir):
        manifest = read_json(manifest_path)  # it may have ended, and said so, since the first read
        if manifest["status"] == "running":  # no: the runner died without a word (SIGKILL...)
            gone_since = max([os.path.getmtime(p) for p in journals if os.path.exists(p)] or
                             [os.path.getmtime(manifest_path)])
    history = run_history(run_dir, manifest, warn)
    job_status = manifest["status"] if gone_since is None else \
        f"interrupted (runner gone since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(gone_since))})"
    explain: dict[str, str | None] = {}
    if opts.explain:
        explain = _explanations(manifest, os.path.abspath(run_dir))
    layout = Layout.of(os.path.abspath(run_dir))
    states = list(current_states(history, gone_since is not None))
    tally = Tally.of(state for _, state in states)
    listed = states if opts.all or opts.format == "json" or opts.explain or len(states) <= LISTED else \
        [(i, state) for i, state in states if state in TROUBLED or state in _UNDER_WAY][:LISTED]
    rows = []
    for i, state in sorted(listed, key=lambda item: history.ids[item[0]]):
        row = task_row(history, i, state, layout, placed=bool(manifest.get("inventory")))
        if state in TROUBLED:
            row["stderr_tail"] = stderr_tail(os.path.join(row["work_dir"], "logs", "stderr.log"), row["attempts"])
        elif not (state is TaskState.SKIPPED and row["reason"] and row["reason"] != UP_TO_DATE):
            del row["reason"]  # kept for a skip that is news: not selected, can never fit here
        if opts.explain:
            why = explain.get(row["id"])
            row["next_run"] = "skip (up to date)" if why is None else f"run ({why})"
        rows.append(row)
    history.close()
    ledger, budget = manifest.get("ledger"), manifest.get("budget_usd")
    if opts.format == "json":
        print(json.dumps({"run_dir": run_dir, "job": manifest["job"],
                          "status": "interrupted" if gone_since is not None else job_status,
                          "runner_gone_since": gone_since,
                          "exit_code": manifest.get("exit_code"), "ledger": ledger, "budget_usd": budget,
                          "slurm": slurm, "inventory": manifest.get("inventory"), "counts": tally.to_json(),
                          "tasks": rows}, indent=1))
        return ExitCode.OK
    print(f"Job {manifest['job']} in {run_dir}: {job_status}"
          + (f", exit code {manifest['exit_code']}" if manifest.get("exit_code") is not None else ""))
    print(f"{tally.total} task{'' if tally.total == 1 else 's'}: {tally.text()}")
    if manifest.get("inventory"):
        print(f"Inventory: {manifest['inventory']}")
    if slurm is not None:
        print("\n".join(slurm_lines(slurm)))
    if ledger or budget is not None:
        cost = ledger["cost_usd"] if ledger else 0.0
        from cmbagent_batch.ledger.money import usd

        line = f"LLM cost: {usd(cost)} over {ledger['entries'] if ledger else 0} model calls"
        if budget is not None:
            line += f", {100 * cost / budget:.1f}% of job.budget_usd {usd(budget)}" if budget else ", budget $0"
        print(line + (f" (ledger: {os.path.join(run_dir, ledger['file'])})" if ledger else ""))
    width = max((len(r["id"]) for r in rows), default=4)
    for r in rows:
        wall = f"{r['wall_s']:.2f}s" if isinstance(r.get("wall_s"), (int, float)) else "-"
        line = f"  {r['id']:<{width}}  {r['state']:<15} attempts {r['attempts']}  {wall:>9}"
        if "next_run" in r:
            line += f"  next: {r['next_run']}"
        print(line)
        if r.get("placement"):
            print(f"      on {_placed(r['placement'], r.get('steps') or [])}"
                  + (f": {r['launch']}" if r.get("launch") else ""))
        if r.get("reason"):
            print(f"      {r['reason']}")
        for tail in r.get("stderr_tail") or []:
            print(f"      | {tail}")
    if len(rows) < len(states):
        print(f"  ({len(states) - len(rows):,} more tasks not listed: {'only the running and troubled ones are' if rows else 'none is running or troubled'}; "
              "`status --all` lists every task)")
    return ExitCode.OK


def _placed(placement: dict[str, Any], steps: list[str]) -> str:
    """Where a task ran (``vm cores 0-1``) and the Slurm job steps it ran there (``, job steps 52.1, 52.2``)."""
    from cmbagent_batch.place.booking import describe_record  # only for a run that booked its inventory

    ran = f", job step{'s' if len(steps) > 1 else ''} {', '.join(steps)}" if steps else ""
    return describe_record(placement) + ran


def stderr_tail(path: str, attempts: int) -> list[str]:
    """The last lines of a task's stderr log that its journaled attempts wrote: none for a task that
    never ran, and not the header of an attempt that a stop kept from starting (it was handed over, and
    its logs opened, but it is not counted)."""
    if attempts == 0:
        return []
    lines = tail_lines(path, TAIL + 1)
    stale = next((i for i, line in enumerate(lines)
                  if (m := _ATTEMPT_HEADER.fullmatch(line)) and int(m[1]) > attempts), len(lines))
    return lines[:stale][-TAIL:]


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
