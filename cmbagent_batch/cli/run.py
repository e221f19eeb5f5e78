"""``cmbagent-batch run``: command-line glue around ``execute/run.py``."""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from cmbagent_batch import watchdog
from cmbagent_batch.cli.console import problem, warn
from cmbagent_batch.cli.options import RunOptions
from cmbagent_batch.errors import BatchError, ExitCode, UsageError
from cmbagent_batch.gateway import client as gateway_client
from cmbagent_batch.gateway.keys import hold_keys, key_names
from cmbagent_batch.llm import local_model
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.plan.cached import cache_dir, writable_cache_dir
from cmbagent_batch.rundir.atomic import missing_dirs, remove_empty, writable_dir
from cmbagent_batch.rundir.layout import RunLock, set_aside, wait_for_earlier_tasks
from cmbagent_batch.spec.config import Config, effective_config
from cmbagent_batch.spec.loader import load_spec
from cmbagent_batch.tasks.path import use_task_path

if TYPE_CHECKING:
    from cmbagent_batch.backends.mpi.executor import RankExecutor
    from cmbagent_batch.execute.prepare import Prepared
    from cmbagent_batch.place.inventory import Node
    from cmbagent_batch.report.refresh import Refresher
    from cmbagent_batch.spec.model import JobSpec


_GLOB = re.compile(r"[*?\[]")
HELLO_TIMEOUT_S = 600.0  # for every worker rank to say what node it is on (they start with rank 0)


def mpi_ranks() -> int:
    """Ranks of the MPI job this process belongs to, from the launcher's environment (1: not under MPI).
    Read without importing mpi4py; inside an sbatch script (not under srun) SLURM_NTASKS is not enough."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def mpi_rank() -> int:
    """This process's rank in its MPI job, from the launcher's environment (0: not under MPI)."""
    if mpi_ranks() > 1:
        for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
            if os.environ.get(var, "").isdigit():
                return int(os.environ[var])
    return 0


def resolve_backend(backend: str) -> str:
    """``auto`` is ``mpi`` when started by mpiexec or srun with more than one rank, else ``local``."""
    if backend == "auto":
        return "mpi" if mpi_ranks() > 1 else "local"
    return backend


def _select(prepared: Prepared, only: Sequence[str]) -> set[str]:
    """--only: the named tasks (globs allowed) and the dependencies they need that are not done (one walk
    up the DAG from all of them at once: each task is looked at once, however many are named)."""
    from cmbagent_batch.execute.prepare import stale_tasks

    stale = stale_tasks(prepared)
    ids = prepared.dag.nodes
    chosen: set[str] = set()
    for pattern in only:
        matched = [pattern] if not _GLOB.search(pattern) and pattern in prepared.dag else fnmatch.filter(ids, pattern)
        if not matched:
            raise UsageError(f"--only {pattern!r} matches no task")
        chosen.update(matched)
    return chosen | (prepared.dag.upstream(chosen) & stale)


def run(opts: RunOptions) -> int:
    try:
        config = effective_config(load_spec(opts.spec), os.environ, opts.flags)
    except BatchError as exc:
        if mpi_rank() > 0:  # every rank finds it; rank 0 says it, once
            return exc.exit_code
        raise
    use_task_path(config.spec.execution.path)  # on every rank, before anything that tasks inherit starts
    if resolve_backend(config.spec.execution.backend) == "mpi":
        return _run_mpi(opts, config)
    return _run(opts, config)


def _run_mpi(args: RunOptions, config: Config) -> int:
    """Rank 0 runs the job (scheduler, journal, run.json); the other ranks run its tasks until told to stop."""
    from cmbagent_batch.backends import mpi
    from cmbagent_batch.backends.ranks import rank_executor, serve_worker_rank

    ex = config.spec.execution
    world, rank, size = mpi.world()
    if size == 1:
        warn("started under MPI with a single rank: there is no worker rank, so every task runs on rank 0 "
             "with local pools (start more ranks: mpiexec -n N, srun -n N)")
        return _run(args, config)
    if args.dry_run:  # nothing runs: rank 0 says what would, the others leave
        return _run(args, config) if rank == 0 else 0
    from cmbagent_batch.execute.placing import needs_booking, worker_node

    comm = world.Dup()  # the backend's own messages never meet those of MPI code in the tasks
    books = needs_booking(config.spec)  # then each worker says its node, and rank 0 places tasks on nodes
    if rank != 0:
        hold_keys(key_names(config.spec))  # before anything its tasks inherit is made
        try:
            serve_worker_rank(comm, rank, ex, worker_node(config.spec, os.environ) if books else None)
        finally:
            gateway_client.stop()
            local_model.stop_all()
        return 0
    executor = rank_executor(comm, ex, books)
    try:
        return _run(args, config, executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_nodes(ranks: RankExecutor | None, spec: JobSpec) -> dict[int, Node] | None:
    """The node each worker rank says it is on, for a job that books (None on local pools, for a job that
    books nothing, or when the workers name none): only then does rank 0 wait for every hello."""
    from cmbagent_batch.execute.placing import needs_booking

    if ranks is None or not needs_booking(spec):
        return None
    from cmbagent_batch.backends.ranks import hello_node

    nodes = {rank: hello_node(about) for rank, (_, about) in ranks.hellos(HELLO_TIMEOUT_S).items()}
    return {rank: node for rank, node in nodes.items() if node is not None} or None


def _by_reason(skipped: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tid, why in skipped.items():
        out.setdefault(why, []).append(tid)
    return out


def _some(ids: list[str]) -> str:
    """``'a', 'b' and 3 more``."""
    shown = ", ".join(repr(t) for t in ids[:3])
    return shown + (f" and {len(ids) - 3:,} more" if len(ids) > 3 else "")


def _run_report(prepared: Prepared, selected: set[str] | None, stale: set[str]) -> Refresher:
    """The run's report, refreshed while it runs; first, why each task it runs (of ``stale``) does (for that
    report)."""
    from cmbagent_batch.report.reasons import record_reasons
    from cmbagent_batch.report.refresh import Refresher

    try:
        record_reasons(prepared, selected, stale)
    except OSError as exc:
        warn(f"the reasons the tasks run could not be kept for the run report: {exc}")
    return Refresher(prepared.run_dir, warn, tasks=len(prepared.dag.nodes))


def _run(opts: RunOptions, config: Config, ranks: RankExecutor | None = None) -> int:
    from cmbagent_batch.execute.placing import booking_for
    from cmbagent_batch.execute.prepare import prepare, stale_tasks, unplaceable_notes, why_rerun
    from cmbagent_batch.execute.progress import Progress
    from cmbagent_batch.execute.run import disk_full_advice, execute
    from cmbagent_batch.plan import preflight  # here: a worker rank never needs it
    from cmbagent_batch.report.job import JobView
    from cmbagent_batch.rundir.layout import resolve_run_dir
    from cmbagent_batch.rundir.prune import prune_superseded
    from cmbagent_batch.states import Tally, TaskState

    # Inputs are checked once the tasks to launch are known: one up to date needs its inputs no more.
    preflight.check(config.spec, cache_dir(opts.spec, opts.cache_dir),
                    preflight.Checks(os.environ, problem, inputs=False))
    run_dir = resolve_run_dir(config.spec)
    # The places this run writes are checked before anything starts: one clear line, not a crash half way.
    cache = Cache(writable_cache_dir(opts.spec, opts.cache_dir), warn)
    if opts.fresh and not opts.dry_run:
        if not opts.only:  # every task runs again: a refusal must come before the old run is moved aside
            preflight.check_launched_inputs(config.spec, None, [t.id for t in config.spec.tasks])
        old = set_aside(run_dir)
        if old:
            print(f"cmbagent-batch: the previous run directory is kept at {old}", file=sys.stderr)
    made = missing_dirs(run_dir)
    if not opts.dry_run:
        writable_dir(run_dir, "run directory")
    prepared = prepare(config, cache, warn, run_dir=run_dir)
    hold_keys(key_names(config.spec))  # the analysis has called its model: from now on the gateway alone has them
    if ranks is not None:  # rank 0 runs no task: a local model's server started for the analysis is done
        local_model.stop_all()
    try:
        selected = _select(prepared, opts.only) if opts.only else None
        stale = stale_tasks(prepared)
        preflight.check_launched_inputs(config.spec, prepared.sources, [
            tid for tid in prepared.dag.nodes if (selected is None or tid in selected) and tid in stale])
        placing = booking_for(config.spec, os.environ, _worker_nodes(ranks, config.spec))  # a misfit is refused here
    except BatchError:
        remove_empty(made)  # a refused run leaves no empty run directory behind
        raise
    if placing is not None:
        if not opts.quiet:
            print(f"cmbagent-batch: inventory: {placing.inventory.describe()}", file=sys.stderr)
        for note in placing.notes:
            warn(note)
        for reason, ids in _by_reason(placing.skipped).items():  # said even with --quiet: work not done
            print(f"cmbagent-batch: skipped (when_unplaceable: skip), with what depends on it: "
                  f"{_some(ids)}: {reason}", file=sys.stderr)
    if opts.dry_run:
        unfit = unplaceable_notes(prepared, stale, placing.skipped) if placing and placing.skipped else {}
        for tid in prepared.dag.topological_order():
            if selected is not None and tid not in selected:
                continue
            why = why_rerun(prepared, tid) if tid in stale else None
            if why is None:
                print(f"{tid}: skip (up to date)")
            else:
                print(f"{tid}: skip ({unfit[tid]})" if tid in unfit else f"{tid}: run ({why})")
        return ExitCode.OK
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire(wait_for_dead=config.spec.execution.kill_grace + 30)
    keep = 0 if opts.prune_superseded else config.spec.job.keep_superseded  # superseded/ stays bounded
    why = "--prune-superseded" if opts.prune_superseded else f"the newest {keep} of each task kept: job.keep_superseded"
    for line in prune_superseded(run_dir, keep).lines(why):
        print(line, file=sys.stderr)
    # Holds the lock too: a rerun cannot start while the tasks of this run, if it dies, are being ended.
    grace = config.spec.execution.kill_grace
    wait_for_earlier_tasks(run_dir, grace + 30)  # an MPI worker rank's watchdog ending a dead run's tasks
    dog = watchdog.start(grace, keep_fds=(lock.fd,))
    if dog.pid is not None:
        lock.note(f"(its watchdog: pid {dog.pid})")
    try:
        total = len(prepared.dag.nodes)
        progress = (lambda sched: None) if opts.quiet else Progress(total)
        report = _run_report(prepared, selected, stale)
        code, sched = execute(prepared, warn, report.around(progress), selected, ranks, walltime_grace=opts.walltime_grace,
                              walltime_file=opts.walltime_file, placing=placing)
    finally:
        lock.release(unlock=not dog.close())  # tasks left running: the watchdog ends them, then lets it go
        gateway_client.stop()  # here, as os._exit below skips atexit
        local_model.stop_all()
    page = report.finish(JobView(prepared.spec, prepared.dag), len(prepared.dag.nodes))
    if not opts.quiet:
        print(f"cmbagent-batch: {Tally.from_counts(sched.counts).text()}; run directory {run_dir}"
              + (f"; report {page}" if page else ""), file=sys.stderr)
        if report.off:
            print(f"cmbagent-batch: {report.skipped(len(prepared.dag.nodes))}", file=sys.stderr)
        for r in sorted(sched.runs.values(), key=lambda r: r.id):
            if r.state is TaskState.FAILED:
                print(f"  failed: {r.id} (attempt {r.attempts}): {r.reason}", file=sys.stderr)
    if sched.disk_full is not None:
        print(f"cmbagent-batch: stopped: {disk_full_advice(run_dir, sched.disk_full)}", file=sys.stderr)
    if sched.abandoned:
        # Python functions running in threads cannot be killed; do not wait for them at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
