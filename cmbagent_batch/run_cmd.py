"""``cmbagent-batch run`` and ``status``: command-line glue around ``run.py``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import sys
from typing import Any

from cmbagent_batch import local_model
from cmbagent_batch.analysis.cache import Cache
from cmbagent_batch.config import effective_config
from cmbagent_batch.errors import SpecError, UsageError
from cmbagent_batch.journal import replay
from cmbagent_batch.plan_cmd import cache_dir, warn
from cmbagent_batch.rundir import RunLock, journal_paths, read_json, set_aside, tail_lines
from cmbagent_batch.spec.loader import load_spec


def mpi_ranks() -> int:
    """Ranks of the MPI job this process belongs to, from the launcher's environment (1: not under MPI).
    Read without importing mpi4py; inside an sbatch script (not under srun) SLURM_NTASKS is not enough."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def resolve_backend(backend: str) -> str:
    """``auto`` is ``mpi`` when started by mpiexec or srun with more than one rank, else ``local``."""
    if backend == "auto":
        return "mpi" if mpi_ranks() > 1 else "local"
    return backend


def _select(prepared: Any, only: list[str]) -> set[str]:
    """--only: the named tasks (globs allowed) and the dependencies they need that are not done."""
    from cmbagent_batch.run import why_rerun

    ids = prepared.dag.nodes
    chosen: set[str] = set()
    for pattern in only:
        matched = fnmatch.filter(ids, pattern)
        if not matched:
            raise UsageError(f"--only {pattern!r} matches no task")
        chosen.update(matched)
    for tid in sorted(chosen):
        for anc in prepared.dag.ancestors(tid):
            if why_rerun(prepared, anc) is not None:
                chosen.add(anc)
    return chosen


def cmd_run(args: argparse.Namespace, flags: dict[str, tuple[Any, str]]) -> int:
    config = effective_config(load_spec(args.spec), os.environ, flags)
    if resolve_backend(config.spec.execution.backend) == "mpi":
        return _run_mpi(args, config)
    return _run(args, config)


def _run_mpi(args: argparse.Namespace, config: Any) -> int:
    """Rank 0 runs the job (scheduler, journal, run.json); the other ranks run its tasks until told to stop."""
    from cmbagent_batch import mpi
    from cmbagent_batch.rank_pools import (
        CALLS_AHEAD,
        COVER,
        close_journals,
        hold_tasks,
        set_place,
        stop_tasks,
        worker_threads,
    )

    ex = config.spec.execution
    world, rank, size = mpi.world()
    if size == 1:
        warn("started under MPI with a single rank: there is no worker rank, so every task runs on rank 0 "
             "with local pools (start more ranks: mpiexec -n N, srun -n N)")
        return _run(args, config)
    if args.dry_run:  # nothing runs: rank 0 says what would, the others leave
        return _run(args, config) if rank == 0 else 0
    comm = world.Dup()  # the backend's own messages never meet those of MPI code in the tasks
    if rank == 0 and ex.use_process_pool:
        warn("execution.use_process_pool is ignored under MPI: python tasks run in threads of the worker "
             "ranks (a python task's timeout is not enforced there)")
    if rank != 0:
        set_place(rank, ex.tasks_per_rank)
        stop = stop_tasks(ex.kill_grace)
        # Rank 0 decides; on SIGINT and SIGTERM this rank only ends its tasks. srun passes Slurm's
        # walltime warning (SIGUSR1) to every rank: here it does nothing, as a hold or a stop comes from
        # rank 0 (a handler that does nothing, not SIG_IGN, which the tasks would inherit).
        on_signal: dict[int, Any] = {signal.SIGINT: stop, signal.SIGTERM: stop, signal.SIGUSR1: lambda: None}
        try:
            mpi.serve(comm, worker_threads(ex.tasks_per_rank), on_stop=stop, on_hold=hold_tasks,
                      on_signal=on_signal)
        finally:
            close_journals()
            local_model.stop_all()
        return 0
    executor = mpi.RankExecutor(comm, worker_threads(ex.tasks_per_rank), ahead=CALLS_AHEAD,
                                least=ex.tasks_per_rank + 1, cover=COVER)
    try:
        return _run(args, config, executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run(args: argparse.Namespace, config: Any, ranks: Any = None) -> int:
    from cmbagent_batch.progress import Progress
    from cmbagent_batch.run import execute, prepare, why_rerun
    from cmbagent_batch.rundir import resolve_run_dir
    from cmbagent_batch.states import TaskState

    if problems := local_model.preflight(config.spec):
        raise SpecError(problems)
    run_dir = resolve_run_dir(config.spec)
    if args.fresh and not args.dry_run:
        old = set_aside(run_dir)
        if old:
            print(f"cmbagent-batch: the previous run directory is kept at {old}", file=sys.stderr)
    cache = Cache(cache_dir(args.spec, args.cache_dir), warn)
    prepared = prepare(config, cache, warn, run_dir=run_dir)
    if ranks is not None:  # rank 0 runs no task: a local model's server started for the analysis is done
        local_model.stop_all()
    selected = _select(prepared, args.only) if args.only else None
    if args.dry_run:
        for tid in prepared.dag.topological_order():
            why = why_rerun(prepared, tid)
            if selected is not None and tid not in selected:
                continue
            print(f"{tid}: {'skip (up to date)' if why is None else 'run (' + why + ')'}")
        return 0
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        total = len(prepared.dag.nodes)
        progress = (lambda sched: None) if args.quiet else Progress(total)
        code, sched = execute(prepared, warn, progress, selected, ranks, walltime_grace=args.walltime_grace,
                              walltime_file=args.walltime_file)
    finally:
        lock.release()
        local_model.stop_all()  # here, as os._exit below skips atexit
    counts = {s.value: n for s, n in sched.counts.items() if n}
    if not args.quiet:
        print(f"cmbagent-batch: {', '.join(f'{n} {s}' for s, n in counts.items())}; run directory {run_dir}",
              file=sys.stderr)
        for r in sorted(sched.runs.values(), key=lambda r: r.id):
            if r.state is TaskState.FAILED:
                print(f"  failed: {r.id} (attempt {r.attempts}): {r.reason}", file=sys.stderr)
    if sched.abandoned:
        # Python functions running in threads cannot be killed; do not wait for them at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from cmbagent_batch.slurm_cmd import slurm_lines, slurm_status

    run_dir = args.run_dir
    manifest_path = os.path.join(run_dir, "run.json")
    slurm = slurm_status(run_dir)
    if not os.path.isfile(manifest_path):
        if slurm is None:
            raise UsageError(f"{run_dir} is not a run directory (no run.json)")
        if args.format == "json":
            print(json.dumps({"run_dir": run_dir, "status": "submitted", "slurm": slurm, "tasks": []}, indent=1))
        else:
            print(f"Run directory {run_dir}: the job has not started yet")
            print("\n".join(slurm_lines(slurm)))
        return 0
    manifest = read_json(manifest_path)
    history = replay(journal_paths(run_dir), warn)
    rows = []
    explain: dict[str, str | None] = {}
    if args.explain:
        explain = _explanations(manifest, os.path.abspath(run_dir))
    for tid, t in sorted(manifest["tasks"].items()):
        h = history.get(tid)
        state = h.state if h else t["state"]
        row = {"id": tid, "state": state, "attempts": h.attempts if h else t["attempts"], "rank": t.get("rank"),
               "wall_s": (h.record.get("wall_s") if h else None) or t.get("wall_s"), "work_dir": t["work_dir"]}
        if state in ("failed", "interrupted", "cancelled", "upstream_failed", "budget_exceeded"):
            row["reason"] = (h.record.get("reason") or h.record.get("error")) if h else t.get("reason")
            row["stderr_tail"] = tail_lines(os.path.join(t["work_dir"], "logs", "stderr.log"), 5)
        if args.explain:
            row["next_run"] = "skip (up to date)" if explain.get(tid) is None else f"run ({explain[tid]})"
        rows.append(row)
    ledger, budget = manifest.get("ledger"), manifest.get("budget_usd")
    if args.format == "json":
        print(json.dumps({"run_dir": run_dir, "job": manifest["job"], "status": manifest["status"],
                          "exit_code": manifest.get("exit_code"), "ledger": ledger, "budget_usd": budget,
                          "slurm": slurm, "tasks": rows}, indent=1))
        return 0
    print(f"Job {manifest['job']} in {run_dir}: {manifest['status']}"
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
    return 0


def _explanations(manifest: dict[str, Any], run_dir: str) -> dict[str, str | None]:
    """Why each task would run next time, against the spec file as it is now."""
    from cmbagent_batch.run import prepare, why_rerun

    spec_path = manifest["spec"]["path"]
    config = effective_config(load_spec(spec_path), os.environ, {})
    cache = Cache(cache_dir(spec_path, None), warn)
    prepared = prepare(config, cache, warn, run_dir=run_dir, offline=True)
    return {tid: why_rerun(prepared, tid) for tid in prepared.dag.nodes}
