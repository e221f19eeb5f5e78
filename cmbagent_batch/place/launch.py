"""How a placed task is launched: ``CMBAGENT_LAUNCH``, a command prefix for its shape, and the variables that
say where it runs (``CMBAGENT_NODELIST``, ``CMBAGENT_NTASKS``, ``CMBAGENT_GPUS``, GPU visibility).

A task runs ``$CMBAGENT_LAUNCH program args`` to start its ranks where it is placed. The prefix is a list of
plain words joined by ``shlex.join``: an unquoted ``$CMBAGENT_LAUNCH`` splits it right as long as no path in
it holds a space, and ``eval`` or ``shlex.split`` always do.

**Locally** (``Local``) the prefix is MPICH's Hydra ``mpiexec -n RANKS -bind-to user:LIST``: the one next
to the interpreter that runs cmbagent-batch (the ``mpi`` extra's wheel), else the first on PATH, if it is
Hydra. ``user:`` takes one entry per rank on a node, in local rank order, each entry the CPUs of that rank
joined by ``+`` (``user:0+1,2+3``: two ranks of two CPUs); Hydra leaves a rank past the list unbound, so
there is always one entry per rank. The entries are OS CPU ids: core index ``i`` of the placement is the
``i``-th CPU this process may run on (``os.sched_getaffinity``), counted round again past the last, which
is what a declared inventory larger than the machine asks for. Over several hosts the prefix adds
``-hosts A,B -ppn N``; Hydra applies one list on every host alike, so it binds only when the cores booked
are the same on every host, and otherwise leaves the cores to the OS (the count is still booked). Without
an MPICH ``mpiexec`` the prefix is ``python -m cmbagent_batch.place.launch --no-mpiexec ...``, which says
so and exits 127 when a task uses it (``missing_mpiexec``); tasks that do not use it still run.

**Inside a Slurm allocation** (``InSlurm``) the prefix is an ``srun`` job step with exactly the task's shape
(Slurm 22.05 and later; checked on 22.05 with ``slurm/local-cluster.sh``):

- ``--jobid``: a step of this allocation, even where ``SLURM_JOB_ID`` did not reach the task.
- ``--job-name``: the step's name (``step_name``), by which ``Step`` finds its id to end it.
- ``--nodes``, ``--nodelist``: on exactly the nodes the booking gave, no more.
- ``--ntasks``, ``--ntasks-per-node``: the ranks, spread evenly (Slurm would otherwise fill the first node).
- ``--cpus-per-task``: the CPUs of a rank. Since 22.05 srun no longer reads ``SLURM_CPUS_PER_TASK``, so
  it is always given.
- ``--gpus-per-task`` when the task has GPUs (Slurm then binds each rank to its own devices and sets
  ``CUDA_VISIBLE_DEVICES`` for it); ``--gres=none`` when it has none, since by default a step is given
  every generic resource of the job and would hold all its GPUs.
- ``--mem=MB`` per node when the task gives memory; else ``--mem=0``: all the job's memory on the node and
  none of it held from other steps. A step without ``--mem`` takes all the job's memory, so that two
  one-core steps run one after the other (seen on 22.05 with ``CR_CPU_Memory``).
- ``--exact``: only the CPUs asked for. By default a step gets every CPU of its nodes, so a second task on
  a node would wait for the first (``step creation temporarily disabled``).
- ``--kill-on-bad-exit=1``: a rank that fails ends the step, rather than its peers waiting in a collective
  until the task's timeout.
- ``sh .../step-note.sh``: each rank runs the program through this shipped script (``STEP_NOTE``; ``sh``
  reads it, so it needs no exec bit), which on the step's rank 0 (``SLURM_PROCID=0``) appends the step's
  id ``$SLURM_JOB_ID.$SLURM_STEP_ID`` to ``$CMBAGENT_TASK_DIR/logs/slurm-steps`` (``STEP_NOTES``), then
  becomes the program (``exec``: the rank keeps its process, environment and PMI descriptors). The runner
  empties that file as the task starts and reads and removes it as the task ends, so each task's end record
  names the steps it ran (``steps``) and no file stays. Slurm itself cannot tell them afterwards where it
  keeps no accounting (``accounting_storage/none``: ``sacct`` then reads only the job completion file, which
  has no steps), and polling ``squeue`` would miss short steps and load the controller. The work directory
  is on the file system the run directory is on, which a multi-node step's rank 0 sees; where it cannot
  write there it says so on the task's stderr and the program runs all the same. Rank 0 alone writes, one
  short line, appended: steps a task runs at once do not mix their lines.

It takes no ``--overlap``: task steps must not share CPUs with one another. It is the step running
cmbagent-batch's own ranks that must overlap (``srun --overlap`` in the sbatch script), so that it counts
against nothing in the allocation: without it, a step of the whole node, it makes every task step wait
for it to end, which it never does.

The step would also read options that the job and the ranks' own step left in the environment
(``SLURM_OVERLAP``, ``SLURM_GPUS_PER_NODE``, ``SLURM_CPU_BIND``, ``SLURM_TRES_PER_TASK``...): those that
change a step's shape, sharing or binding are unset for it with ``env -u`` (``STEP_OPTION_VARIABLES``,
the ones present when ``in_slurm`` looked), so the command line alone says what the step is.

**GPU visibility.** On one node, a task gets ``CUDA_VISIBLE_DEVICES`` and ``ROCR_VISIBLE_DEVICES`` set to
its ids and ``HIP_VISIBLE_DEVICES`` to ``0..n-1``: HIP numbers the devices that ROCr left visible from 0,
so the ids again there would hide them. A task with no GPU gets all three empty: it sees none. Across
nodes whose ids differ one environment cannot say both; they are then left unset. Inside Slurm the same
values are set for the task's own process, and a GPU task's ``srun`` runs with the three unset, so its
ranks see exactly the devices Slurm bound to them (Slurm sets ``CUDA_VISIBLE_DEVICES``, and
``ROCR_VISIBLE_DEVICES`` on AMD, per rank; a ``HIP_VISIBLE_DEVICES`` passed on would filter those again).

**Ending a step.** A timeout or a stop must end the step on every node, not only the local ``srun``:
``Step`` finds the step's id by its name (``squeue --steps``; squeue's ``--name`` does not filter steps
on 22.05) and signals it with ``scancel``. ``scancel --signal=TERM JOB.STEP`` reaches every task of the
step, as srun's own forwarding of SIGTERM does; a plain ``scancel JOB.STEP`` kills them all (SIGKILL) and
frees the step's resources. The runner supervising a task (``tasks/shell.py``, on rank 0 or on an MPI
worker rank) learns its step from its ``CMBAGENT_LAUNCH`` (``Step.of_launch``: the ``--jobid`` and
``--job-name`` the prefix gives), so nothing else has to reach it. At the task's timeout, or when a stop
ends it, the runner sends SIGTERM to its process group and ``scancel --signal=TERM`` to its steps; once
the group has ended, or ``kill_grace`` has passed, SIGKILL to what is left of the group and a plain
``scancel`` to the steps still there. A python task's call has no process group of its own (it runs in a
worker process or a thread): its steps, ended the same way, have ended once ``squeue`` no longer lists
them (``tasks/shell.py`` ``end_steps``; ``tasks/python.py`` and ``backends/processes.py`` say when). A
``squeue`` or ``scancel`` that fails is a warning on the task's stderr and in its error.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cmbagent_batch.errors import SlurmError
from cmbagent_batch.place.booking import Placement
from cmbagent_batch.place.inventory import Source
from cmbagent_batch.slurm import client
from cmbagent_batch.spec.model import Resources

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
# srun options read from the environment that would change a task step's shape, its sharing with other
# steps, or its binding, and that the command line does not set itself (srun's INPUT ENVIRONMENT VARIABLES).
STEP_OPTION_VARIABLES = (
    "SLURM_CPU_BIND", "SLURM_CPUS_PER_GPU", "SLURM_DISTRIBUTION", "SLURM_EXCLUSIVE", "SLURM_GPU_BIND",
    "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET", "SLURM_GPUS_PER_TASK", "SLURM_GRES",
    "SLURM_HINT", "SLURM_MEM_BIND", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_GPU", "SLURM_NTASKS_PER_CORE",
    "SLURM_NTASKS_PER_GPU", "SLURM_NTASKS_PER_SOCKET", "SLURM_NTASKS_PER_TRES", "SLURM_OVERCOMMIT",
    "SLURM_OVERLAP", "SLURM_SPREAD_JOB", "SLURM_STEP_GRES", "SLURM_THREADS_PER_CORE", "SLURM_TRES_PER_TASK",
    "SLURM_WHOLE")
NO_MPIEXEC, OTHER = "--no-mpiexec", "--other="  # the arguments of `python -m cmbagent_batch.place.launch` (main)
STEP_NOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step-note.sh")  # run by each rank of a step
STEP_NOTES = os.path.join("logs", "slurm-steps")  # in the task's directory: where its steps' rank 0 note their ids
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclass(frozen=True, slots=True)
class Local:
    """Tasks run on this machine (or hosts Hydra reaches) under MPICH's ``mpiexec``."""

    python: str  # the interpreter running cmbagent-batch (sys.executable): its own mpiexec is preferred
    mpiexec: str | None  # Hydra's mpiexec; None: there is none
    cpus: tuple[int, ...] = ()  # the OS CPU ids this process may use; core index i binds to cpus[i % len]
    other_mpiexec: str = ""  # an mpiexec on PATH that is not MPICH's (when mpiexec is None)


@dataclass(frozen=True, slots=True)
class InSlurm:
    """Tasks run as job steps of Slurm allocation ``job_id``."""

    job_id: str
    inherited: tuple[str, ...] = ()  # the STEP_OPTION_VARIABLES set in the environment: unset for each step


Where = Local | InSlurm


def local(env: Mapping[str, str] | None = None, python: str | None = None) -> Local:
    """Where local tasks run: MPICH's ``mpiexec`` next to ``python`` (default: this interpreter), else the
    first on ``env``'s PATH if it is Hydra, and the CPUs this process may use."""
    env = os.environ if env is None else env
    python = sys.executable if python is None else python
    cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
    beside = os.path.join(os.path.dirname(python), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return Local(python, beside, cpus)
    found = shutil.which("mpiexec", path=env["PATH"]) if env.get("PATH") else None
    if found is None:
        return Local(python, None, cpus)
    if not _is_hydra(found):
        return Local(python, None, cpus, other_mpiexec=found)
    return Local(python, found, cpus)


def _is_hydra(mpiexec: str) -> bool:
    """Whether ``mpiexec --version`` says it is MPICH's Hydra (Open MPI's takes other options)."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "HYDRA" in proc.stdout


def where_for(source: Source, env: Mapping[str, str] | None = None, python: str | None = None) -> Where:
    """Where tasks of an inventory from ``source`` run: job steps of the allocation for a Slurm inventory,
    this machine's ``mpiexec`` for any other."""
    if source is not Source.SLURM:
        return local(env, python)
    allocation = in_slurm(env)
    if allocation is None:
        raise ValueError("a Slurm inventory outside a Slurm allocation (no SLURM_JOB_ID)")
    return allocation


def in_slurm(env: Mapping[str, str] | None = None) -> InSlurm | None:
    """Where tasks run inside the allocation ``env`` is in; None outside one (no ``SLURM_JOB_ID``)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        return None
    return InSlurm(job_id, tuple(name for name in STEP_OPTION_VARIABLES if name in env))


def missing_mpiexec(where: Local) -> str:
    """Why ``$CMBAGENT_LAUNCH`` cannot start ranks there: no MPICH ``mpiexec`` beside the interpreter or on
    PATH."""
    return _missing(os.path.dirname(where.python), where.other_mpiexec)


def _missing(bin_dir: str, other: str) -> str:
    found = f"; {other} on PATH is another MPI's" if other else ""
    return (f"$CMBAGENT_LAUNCH starts MPI ranks with MPICH's mpiexec, and there is none in {bin_dir} or on "
            f"PATH{found}: pip install 'cmbagent-batch[mpi]'")


def step_name(task_id: str, attempt: int) -> str:
    """The name of a task's job step (``srun --job-name``): the task and its attempt, as plain words."""
    return f"cmbagent-batch:{_UNSAFE.sub('_', task_id)}:{attempt}"


def launch_env(placement: Placement, resources: Resources, where: Where, *, task_id: str,
               attempt: int) -> dict[str, str]:
    """The variables attempt ``attempt`` of task ``task_id``, placed at ``placement``, gets:
    ``CMBAGENT_LAUNCH`` (the command prefix for its shape at ``where``), ``CMBAGENT_NODELIST``,
    ``CMBAGENT_NTASKS``, ``CMBAGENT_GPUS`` and GPU visibility."""
    p, r = placement, resources
    if p.ranks != r.ranks or len(p.hosts) != r.nodes:
        raise ValueError(f"placement {p.describe()} ({p.ranks} ranks) is not of the shape {r}")
    if isinstance(where, InSlurm):
        prefix = srun_prefix(p, r, where, step_name(task_id, attempt))
    else:
        prefix = mpiexec_prefix(p, r, where)
    env = {"CMBAGENT_LAUNCH": shlex.join(prefix), "CMBAGENT_NODELIST": ",".join(p.hosts),
           "CMBAGENT_NTASKS": str(p.ranks), "CMBAGENT_GPUS": _gpu_list(p)}
    env.update(gpu_visibility(p))
    return env


def _gpu_list(p: Placement) -> str:
    """``CMBAGENT_GPUS``: the ids on one node (``0,1``); over several, each with its host (``n1:0,n2:0``)."""
    if len(p.hosts) == 1:
        return ",".join(p.gpus[0])
    return ",".join(f"{host}:{gpu}" for host, gpus in zip(p.hosts, p.gpus, strict=True) for gpu in gpus)


def gpu_visibility(p: Placement) -> dict[str, str]:
    """CUDA, ROCr and HIP visibility for the GPUs booked (empty: none); nothing when nodes differ."""
    ids = p.gpus[0]
    if any(gpus != ids for gpus in p.gpus):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids), "ROCR_VISIBLE_DEVICES": ",".join(ids),
            "HIP_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(ids)))}


def mpiexec_prefix(p: Placement, r: Resources, where: Local) -> list[str]:
    """``mpiexec -n RANKS [-hosts H -ppn N] [-bind-to user:LIST]``, or the command that says there is none."""
    if where.mpiexec is None:
        return [where.python, "-m", "cmbagent_batch.place.launch", NO_MPIEXEC, os.path.dirname(where.python),
                *([f"{OTHER}{where.other_mpiexec}"] if where.other_mpiexec else [])]
    argv = [where.mpiexec, "-n", str(p.ranks)]
    if len(p.hosts) > 1:
        argv += ["-hosts", ",".join(p.hosts), "-ppn", str(p.ranks_per_node)]
    cores = p.cores[0]
    if all(c == cores for c in p.cores):
        argv += ["-bind-to", "user:" + binding(cores, r.cpus_per_rank, where.cpus)]
    return argv


def binding(cores: Sequence[int], cpus_per_rank: int, cpus: Sequence[int] = ()) -> str:
    """Hydra's ``user:`` list for a node's booked ``cores``: one entry per rank, its OS CPU ids joined by
    ``+``; core index ``i`` is ``cpus[i % len(cpus)]`` (itself when ``cpus`` is empty)."""
    ids = [cpus[c % len(cpus)] for c in cores] if cpus else list(cores)
    return ",".join("+".join(map(str, ids[k:k + cpus_per_rank])) for k in range(0, len(ids), cpus_per_rank))


def srun_prefix(p: Placement, r: Resources, where: InSlurm, name: str) -> list[str]:
    """``[env -u VAR...] srun ...``: a job step of exactly ``r`` on ``p``'s nodes (see the module's notes)."""
    unset = list(where.inherited) + (list(GPU_VARIABLES) if r.gpus_per_rank else [])
    argv = ["env", *(arg for var in unset for arg in ("-u", var))] if unset else []
    argv += ["srun", f"--jobid={where.job_id}", f"--job-name={name}",
             f"--nodes={len(p.hosts)}", f"--nodelist={','.join(p.hosts)}",
             f"--ntasks={p.ranks}", f"--ntasks-per-node={p.ranks_per_node}",
             f"--cpus-per-task={r.cpus_per_rank}",
             f"--gpus-per-task={r.gpus_per_rank}" if r.gpus_per_rank else "--gres=none",
             f"--mem={r.memory_mb}M" if r.memory_mb is not None else "--mem=0",
             "--exact", "--kill-on-bad-exit=1", "sh", STEP_NOTE]
    return argv


@dataclass(frozen=True, slots=True)
class Step:
    """A task's job step, found by its name (``step_name``) in allocation ``job_id``, to end it on every
    node: ``end(signal.SIGTERM)`` at a timeout or stop, ``end()`` (SIGKILL) when the grace is over."""

    job_id: str
    name: str

    @classmethod
    def of(cls, where: InSlurm, task_id: str, attempt: int) -> Step:
        return cls(where.job_id, step_name(task_id, attempt))

    @classmethod
    def of_launch(cls, prefix: str) -> Step | None:
        """The steps a task's ``CMBAGENT_LAUNCH`` starts (its ``--jobid`` and ``--job-name``); None for a
        prefix that starts none (``mpiexec``)."""
        words = shlex.split(prefix)
        if "srun" not in words:
            return None
        given = dict(word.removeprefix("--").split("=", 1) for word in words[words.index("srun") + 1:]
                     if word.startswith(("--jobid=", "--job-name=")))
        if "jobid" not in given or "job-name" not in given:
            return None
        return cls(given["jobid"], given["job-name"])

    def find_command(self) -> list[str]:
        """``squeue`` listing the job's steps with their names (its ``--name`` does not filter steps)."""
        return ["squeue", "--noheader", "--steps", f"--jobs={self.job_id}", "--format=%i %j"]

    def ids(self, squeue_out: str) -> tuple[str, ...]:
        """The ids (``JOB.STEP``) of the steps named so in ``find_command``'s output."""
        return tuple(sorted({fields[0] for line in squeue_out.splitlines()
                             if len(fields := line.split()) == 2 and fields[1] == self.name
                             and fields[0].startswith(f"{self.job_id}.")}))

    @staticmethod
    def cancel_command(step_ids: Sequence[str], sig: signal.Signals | None = None) -> list[str]:
        """``scancel`` sending ``sig`` to every task of the steps on every node; without one, Slurm's
        cancel of a step (SIGKILL to all its tasks, its resources freed)."""
        return ["scancel", *([f"--signal={sig.name.removeprefix('SIG')}"] if sig is not None else []), *step_ids]

    def listed(self) -> tuple[str, ...]:
        """The ids of the steps of this name that squeue lists now. ``SlurmError`` when it fails."""
        return self.ids(client.run(self.find_command(), f"finding job step {self.name}"))

    def end(self, sig: signal.Signals | None = None) -> tuple[str, ...]:
        """Signal the step on every node (see ``cancel_command``); the step ids signalled, none when the
        step has not started or has ended. ``SlurmError`` when squeue or scancel fails."""
        step_ids = self.listed()
        if step_ids:
            client.run(self.cancel_command(step_ids, sig), f"ending job step {' '.join(step_ids)}")
        return step_ids


class TaskSteps:
    """The job steps one task's ``CMBAGENT_LAUNCH`` starts, as the runner supervising the task sees them:
    their notes file emptied as it starts (``begin``), ended on every node with it (``end``), and, as it
    ends, their ids and any failure to end them (``finish``). ``busy`` is held while a stop ends them, so
    that ``finish`` waits for it."""

    def __init__(self, step: Step, notes: str) -> None:
        self.step = step
        self.notes = notes  # the task's STEP_NOTES, where each step's rank 0 notes its id
        self.busy = threading.Lock()
        self.ended: set[str] = set()  # the step ids signalled
        self.problems: list[str] = []  # why squeue, scancel or the notes failed

    @classmethod
    def of(cls, env: Mapping[str, str]) -> TaskSteps | None:
        """The steps of the task whose environment is ``env``; None when its prefix starts none."""
        step = Step.of_launch(env.get("CMBAGENT_LAUNCH", ""))
        if step is None:
            return None
        return cls(step, os.path.join(env.get("CMBAGENT_TASK_DIR", ""), STEP_NOTES))

    def begin(self) -> None:
        """Empty the notes (an earlier attempt's logs come along with its work directory)."""
        try:
            with open(self.notes, "w"):
                pass
        except OSError as exc:
            self.problems.append(f"cannot empty {self.notes}: {exc.strerror or exc}: the ids of the task's "
                                 "job steps may be wrong")

    def end(self, sig: signal.Signals | None = None) -> None:
        """``Step.end``: signal the steps on every node (SIGKILL without ``sig``); a failure is kept."""
        try:
            self.ended.update(self.step.end(sig))
        except SlurmError as exc:
            if str(exc) not in self.problems:  # said once, though both the TERM and the KILL met it
                self.problems.append(str(exc))

    def finish(self) -> tuple[str, ...]:
        """The ids of the steps the task ran (noted, or ended), in order; the notes are removed."""
        with self.busy:
            try:
                with open(self.notes) as f:
                    noted = f.read().split()
                os.unlink(self.notes)
            except FileNotFoundError:
                noted = []
            except OSError as exc:
                noted = []
                self.problems.append(f"cannot read {self.notes}: {exc.strerror or exc}")
        return tuple(sorted({*noted, *self.ended}, key=_step_order))


def _step_order(step_id: str) -> tuple[int, ...] | tuple[int, str]:
    job, _, step = step_id.partition(".")
    return (int(job), int(step)) if job.isdigit() and step.isdigit() else (-1, step_id)


def main(argv: Sequence[str]) -> int:
    """``python -m cmbagent_batch.place.launch --no-mpiexec BIN_DIR [--other=MPIEXEC] [PROGRAM...]``: what
    ``CMBAGENT_LAUNCH`` is without an MPICH ``mpiexec``. Says so and exits 127 (the shell's "command not
    found") whatever the program after it."""
    if len(argv) < 2 or argv[0] != NO_MPIEXEC:
        print(f"usage: python -m cmbagent_batch.place.launch {NO_MPIEXEC} BIN_DIR [{OTHER}MPIEXEC] [PROGRAM...]",
              file=sys.stderr)
        return 2
    other = argv[2].removeprefix(OTHER) if len(argv) > 2 and argv[2].startswith(OTHER) else ""
    print(f"cmbagent-batch: {_missing(argv[1], other)}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
