"""``CMBAGENT_LAUNCH`` and the variables a placed task gets: the ``srun`` job step of each shape inside an
allocation (golden, and run for real on the local Slurm), the local ``mpiexec`` run for real and bound to the
booked cores, GPU visibility, what a task is told when there is no MPICH ``mpiexec``, and ending a step."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmbagent_batch.errors import SlurmError
from cmbagent_batch.place import launch
from cmbagent_batch.place.booking import Booking, Placement
from cmbagent_batch.place.inventory import Source, declared
from cmbagent_batch.place.launch import InSlurm, Local, Step, launch_env
from cmbagent_batch.spec.model import Resources
from tests.helpers.slurm_cluster import env_for, wait_job_end

# Each rank writes its line in one write (print makes two when PYTHONUNBUFFERED is set; ranks' lines would mix).
# This interpreter by its path: a task's PATH starts with it, the test's may have no `python` at all (CI).
MPI_PROGRAM = (shlex.quote(sys.executable) + ' -c "from mpi4py import MPI; import os, sys; '
               'sys.stdout.write(f\'{MPI.COMM_WORLD.Get_size()} {sorted(os.sched_getaffinity(0))}\\n\')"')
SRUN = "srun --jobid=4242"
EXACT = f"--exact --kill-on-bad-exit=1 sh {launch.STEP_NOTE}"  # each rank notes its step, then runs the program


def placed(host: str, cores: tuple[int, ...], r: Resources, gpus: tuple[str, ...] = ()) -> Placement:
    return Placement((host,), (cores,), (gpus,), r.memory_mb, r.ranks_per_node)


def prefix(p: Placement, r: Resources, where: launch.Where, task: str = "camb", attempt: int = 1) -> str:
    return launch_env(p, r, where, task_id=task, attempt=attempt)["CMBAGENT_LAUNCH"]


# -- inside a Slurm allocation ------------------------------------------------------------------------------

IN_JOB = InSlurm("4242")


def test_a_one_core_task_is_a_one_cpu_step_on_its_node_that_holds_no_gpu_and_no_memory() -> None:
    r = Resources()
    assert launch_env(placed("nid001", (5,), r), r, IN_JOB, task_id="camb.3", attempt=2) == {
        "CMBAGENT_LAUNCH": f"{SRUN} --job-name=cmbagent-batch:camb.3:2 --nodes=1 --nodelist=nid001 --ntasks=1 "
                           f"--ntasks-per-node=1 --cpus-per-task=1 --gres=none --mem=0 {EXACT}",
        "CMBAGENT_NODELIST": "nid001", "CMBAGENT_NTASKS": "1", "CMBAGENT_GPUS": "",
        "CUDA_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


def test_an_mpi_task_on_one_node_is_a_step_of_its_ranks_each_with_its_cpus() -> None:
    r = Resources(ranks=4, cpus_per_rank=2)
    assert prefix(placed("nid001", tuple(range(8)), r), r, IN_JOB) == (
        f"{SRUN} --job-name=cmbagent-batch:camb:1 --nodes=1 --nodelist=nid001 --ntasks=4 --ntasks-per-node=4 "
        f"--cpus-per-task=2 --gres=none --mem=0 {EXACT}")


def test_a_two_node_task_is_pinned_to_its_two_nodes_with_its_ranks_spread_evenly() -> None:
    r = Resources(nodes=2, ranks=8, cpus_per_rank=4)
    p = Placement(("nid003", "nid007"), (tuple(range(16)), tuple(range(16, 32))), ((), ()), None, 4)
    env = launch_env(p, r, IN_JOB, task_id="mapmaking", attempt=1)
    assert env["CMBAGENT_LAUNCH"] == (
        f"{SRUN} --job-name=cmbagent-batch:mapmaking:1 --nodes=2 --nodelist=nid003,nid007 --ntasks=8 "
        f"--ntasks-per-node=4 --cpus-per-task=4 --gres=none --mem=0 {EXACT}")
    assert (env["CMBAGENT_NODELIST"], env["CMBAGENT_NTASKS"], env["CMBAGENT_GPUS"]) == ("nid003,nid007", "8", "")


def test_a_gpu_task_asks_for_gpus_per_rank_and_its_step_sees_only_what_slurm_binds() -> None:
    r = Resources(ranks=2, gpus_per_rank=1)
    env = launch_env(placed("gpu01", (0, 1), r, ("2", "3")), r, IN_JOB, task_id="emulator", attempt=1)
    assert env["CMBAGENT_LAUNCH"] == (
        "env -u CUDA_VISIBLE_DEVICES -u ROCR_VISIBLE_DEVICES -u HIP_VISIBLE_DEVICES "
        f"{SRUN} --job-name=cmbagent-batch:emulator:1 --nodes=1 --nodelist=gpu01 --ntasks=2 --ntasks-per-node=2 "
        f"--cpus-per-task=1 --gpus-per-task=1 --mem=0 {EXACT}")
    assert (env["CMBAGENT_GPUS"], env["CUDA_VISIBLE_DEVICES"], env["ROCR_VISIBLE_DEVICES"],
            env["HIP_VISIBLE_DEVICES"]) == ("2,3", "2,3", "2,3", "0,1")


def test_a_task_that_gives_its_memory_books_it_per_node() -> None:
    r = Resources(nodes=2, ranks=2, memory_mb=20_000)
    p = Placement(("nid001", "nid002"), ((0,), (0,)), ((), ()), 20_000, 1)
    assert prefix(p, r, IN_JOB) == (
        f"{SRUN} --job-name=cmbagent-batch:camb:1 --nodes=2 --nodelist=nid001,nid002 --ntasks=2 "
        f"--ntasks-per-node=1 --cpus-per-task=1 --gres=none --mem=20000M {EXACT}")


def test_step_options_left_in_the_environment_by_the_job_are_unset_for_the_step() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_OVERLAP": "1", "SLURM_GPUS_PER_NODE": "4", "SLURM_CPU_BIND": "quiet,none",
           "SLURM_NTASKS": "8", "SLURM_CPUS_PER_TASK": "4", "SLURM_MPI_TYPE": "pmi2"}
    where = launch.in_slurm(env)
    assert where == InSlurm("4242", ("SLURM_CPU_BIND", "SLURM_GPUS_PER_NODE", "SLURM_OVERLAP"))
    r = Resources()
    assert prefix(placed("nid001", (0,), r), r, where).startswith(
        f"env -u SLURM_CPU_BIND -u SLURM_GPUS_PER_NODE -u SLURM_OVERLAP {SRUN} --job-name=")
    assert launch.in_slurm({"PATH": "/usr/bin"}) is None


def test_a_step_name_is_plain_words_naming_the_task_and_its_attempt() -> None:
    assert launch.step_name("fit-chain_2.b", 3) == "cmbagent-batch:fit-chain_2.b:3"
    assert launch.step_name("a b/c", 1) == "cmbagent-batch:a_b_c:1"


def test_a_slurm_inventory_launches_job_steps_and_any_other_local_mpiexec(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "77", "PATH": str(tmp_path)}
    assert launch.where_for(Source.SLURM, env) == InSlurm("77")
    assert isinstance(launch.where_for(Source.DECLARED, env), Local)
    with pytest.raises(ValueError, match=r"^a Slurm inventory outside a Slurm allocation \(no SLURM_JOB_ID\)$"):
        launch.where_for(Source.SLURM, {"PATH": str(tmp_path)})


def test_a_placement_of_another_shape_is_refused() -> None:
    p = placed("vm", (0, 1), Resources(ranks=2))
    with pytest.raises(ValueError) as err:
        launch_env(p, Resources(ranks=4), IN_JOB, task_id="t", attempt=1)
    assert str(err.value) == ("placement vm cores 0-1 (2 ranks) is not of the shape Resources(nodes=1, ranks=4, "
                              "cpus_per_rank=1, gpus_per_rank=0, memory_mb=None)")


# -- GPU visibility --------------------------------------------------------------------------------------------


def test_a_gpu_task_sees_exactly_its_devices_and_a_cpu_task_sees_none() -> None:
    r = Resources(ranks=1, gpus_per_rank=2)
    uuids = ("GPU-8d1f", "GPU-03aa")
    assert launch.gpu_visibility(placed("vm", (0,), r, uuids)) == {
        "CUDA_VISIBLE_DEVICES": "GPU-8d1f,GPU-03aa", "ROCR_VISIBLE_DEVICES": "GPU-8d1f,GPU-03aa",
        "HIP_VISIBLE_DEVICES": "0,1"}
    assert launch.gpu_visibility(placed("vm", (0,), Resources())) == {
        "CUDA_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


def test_gpus_over_several_nodes_are_named_with_their_host_and_set_visible_only_when_alike() -> None:
    r = Resources(nodes=2, ranks=2, gpus_per_rank=1)
    alike = Placement(("n1", "n2"), ((0,), (0,)), (("1",), ("1",)), None, 1)
    differ = Placement(("n1", "n2"), ((0,), (0,)), (("0",), ("3",)), None, 1)
    env = launch_env(alike, r, IN_JOB, task_id="t", attempt=1)
    assert (env["CMBAGENT_GPUS"], env["CUDA_VISIBLE_DEVICES"]) == ("n1:1,n2:1", "1")
    env = launch_env(differ, r, IN_JOB, task_id="t", attempt=1)
    assert env["CMBAGENT_GPUS"] == "n1:0,n2:3"
    assert not set(launch.GPU_VARIABLES) & set(env)


# -- locally: MPICH's mpiexec bound to the booked cores ---------------------------------------------------------


def test_ranks_are_bound_to_their_cpus_one_entry_each() -> None:
    assert launch.binding((0, 1, 2, 3), 1) == "0,1,2,3"
    assert launch.binding((0, 1, 2, 3), 2) == "0+1,2+3"
    assert launch.binding((2, 3), 1, cpus=(4, 5, 6, 7)) == "6,7"
    assert launch.binding((2, 3, 4), 1, cpus=(0, 1)) == "0,1,0"  # a declared inventory larger than the machine


def test_over_several_hosts_mpiexec_is_given_the_hosts_and_binds_only_alike_cores() -> None:
    where = Local("/venv/bin/python", "/venv/bin/mpiexec", (0, 1, 2, 3))
    r = Resources(nodes=2, ranks=4)
    alike = Placement(("a", "b"), ((0, 1), (0, 1)), ((), ()), None, 2)
    differ = Placement(("a", "b"), ((0, 1), (2, 3)), ((), ()), None, 2)
    assert prefix(alike, r, where) == "/venv/bin/mpiexec -n 4 -hosts a,b -ppn 2 -bind-to user:0,1"
    assert prefix(differ, r, where) == "/venv/bin/mpiexec -n 4 -hosts a,b -ppn 2"


def run_launched(env: dict[str, str], command: str = MPI_PROGRAM) -> subprocess.CompletedProcess[str]:
    """``$CMBAGENT_LAUNCH COMMAND`` through the shell, as a task's command runs."""
    return subprocess.run(f"$CMBAGENT_LAUNCH {command}", shell=True, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def sizes_and_cpus(out: str) -> list[tuple[int, list[int]]]:
    return sorted((int(size), json.loads(cpus)) for size, cpus in (line.split(" ", 1) for line in out.splitlines()))


@pytest.fixture(scope="module")
def here() -> Local:
    pytest.importorskip("mpi4py", reason="the MPI program needs the 'mpi' extra (mpi4py, mpich)")
    where = launch.local()
    if where.mpiexec is None or len(where.cpus) < 2:
        pytest.skip(f"needs MPICH's mpiexec and 2 CPUs: {where}")
    return where


def test_a_one_core_task_booked_after_another_runs_on_the_second_core_only(here: Local) -> None:
    booking = Booking(declared(2, host="vm"))
    r = Resources()
    assert booking.place(r) is not None
    p = booking.place(r)
    assert p is not None and p.cores == ((1,),)
    env = launch_env(p, r, here, task_id="one", attempt=1)
    assert env["CMBAGENT_LAUNCH"] == f"{here.mpiexec} -n 1 -bind-to user:{here.cpus[1]}"
    res = run_launched(env)
    assert res.returncode == 0, res.stderr
    assert sizes_and_cpus(res.stdout) == [(1, [here.cpus[1]])]


def test_two_ranks_on_two_cores_each_get_one_of_them(here: Local) -> None:
    r = Resources(ranks=2)
    p = Booking(declared(2, host="vm")).place(r)
    assert p is not None and p.cores == ((0, 1),)
    res = run_launched(launch_env(p, r, here, task_id="pair", attempt=1))
    assert res.returncode == 0, res.stderr
    assert sizes_and_cpus(res.stdout) == [(2, [here.cpus[0]]), (2, [here.cpus[1]])]


def test_one_rank_of_two_cpus_gets_both_cores(here: Local) -> None:
    r = Resources(cpus_per_rank=2)
    p = Booking(declared(2, host="vm")).place(r)
    assert p is not None
    res = run_launched(launch_env(p, r, here, task_id="threads", attempt=1))
    assert res.returncode == 0, res.stderr
    assert sizes_and_cpus(res.stdout) == [(1, [here.cpus[0], here.cpus[1]])]


def test_cores_of_a_declared_inventory_larger_than_the_machine_wrap_round_its_cpus(here: Local) -> None:
    booking = Booking(declared(2 * len(here.cpus), host="vm"))
    assert booking.place(Resources(ranks=len(here.cpus))) is not None  # the machine's CPUs, once
    r = Resources(ranks=2)
    p = booking.place(r)
    assert p is not None and p.cores == ((len(here.cpus), len(here.cpus) + 1),)
    res = run_launched(launch_env(p, r, here, task_id="over", attempt=1))
    assert res.returncode == 0, res.stderr
    assert sizes_and_cpus(res.stdout) == [(2, [here.cpus[0]]), (2, [here.cpus[1]])]


# -- locally without MPICH's mpiexec ------------------------------------------------------------------------------


def script(path: Path, body: str) -> Path:
    """An executable shell script at ``path`` (its directory made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def venv_without_mpiexec(tmp_path: Path) -> Path:
    """A ``bin`` with a ``python`` (this interpreter) and no ``mpiexec``; the ``python``."""
    return script(tmp_path / "venv" / "bin" / "python", f'exec {sys.executable} "$@"')


def test_without_mpiexec_the_launch_prefix_says_so_and_fails_as_command_not_found(tmp_path: Path) -> None:
    python = venv_without_mpiexec(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = launch.local({"PATH": str(empty)}, python=str(python))
    assert (where.mpiexec, where.other_mpiexec) == (None, "")
    message = (f"$CMBAGENT_LAUNCH starts MPI ranks with MPICH's mpiexec, and there is none in {python.parent} or on "
               "PATH: pip install 'cmbagent-batch[mpi]'")
    assert launch.missing_mpiexec(where) == message
    r = Resources(ranks=2)
    p = Booking(declared(2, host="vm")).place(r)
    assert p is not None
    res = run_launched(launch_env(p, r, where, task_id="chain", attempt=1), "echo never")
    assert (res.returncode, res.stdout, res.stderr) == (127, "", f"cmbagent-batch: {message}\n")


def test_an_mpiexec_of_another_mpi_on_path_is_named_and_not_used(tmp_path: Path) -> None:
    python = venv_without_mpiexec(tmp_path)
    other = script(tmp_path / "openmpi" / "bin" / "mpiexec", "echo 'mpiexec (Open MPI) 4.1.5'")
    where = launch.local({"PATH": str(other.parent)}, python=str(python))
    assert (where.mpiexec, where.other_mpiexec) == (None, str(other))
    message = (f"$CMBAGENT_LAUNCH starts MPI ranks with MPICH's mpiexec, and there is none in {python.parent} or on "
               f"PATH; {other} on PATH is another MPI's: pip install 'cmbagent-batch[mpi]'")
    assert launch.missing_mpiexec(where) == message
    r = Resources()
    res = run_launched(launch_env(placed("vm", (0,), r), r, where, task_id="one", attempt=1), "echo never")
    assert (res.returncode, res.stderr) == (127, f"cmbagent-batch: {message}\n")


def test_the_hydra_mpiexec_on_path_is_used_when_none_is_beside_the_interpreter(tmp_path: Path) -> None:
    python = venv_without_mpiexec(tmp_path)
    hydra = script(tmp_path / "mpich" / "bin" / "mpiexec", "echo 'HYDRA build details:'")
    assert launch.local({"PATH": str(hydra.parent)}, python=str(python)).mpiexec == str(hydra)


def test_the_message_command_refuses_other_arguments() -> None:
    res = subprocess.run([sys.executable, "-m", "cmbagent_batch.place.launch"], capture_output=True, text=True,
                         timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "usage: python -m cmbagent_batch.place.launch --no-mpiexec BIN_DIR [--other=MPIEXEC] [PROGRAM...]\n")


# -- ending a step on every node --------------------------------------------------------------------------------


def fake_slurm(tmp_path: Path, squeue_out: str, squeue_code: int = 0) -> tuple[dict[str, str], Path]:
    """``squeue`` and ``scancel`` on PATH that log their arguments; the environment and the log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    script(bin_dir / "squeue", f"echo \"squeue $*\" >> {log}\nprintf '%s' '{squeue_out}'\n"
                               f"[ {squeue_code} = 0 ] || echo 'squeue: error: slurm_load_jobs error' >&2\n"
                               f"exit {squeue_code}")
    script(bin_dir / "scancel", f"echo \"scancel $*\" >> {log}")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_a_step_is_found_by_its_name_and_signalled_then_cancelled(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    steps = "12.0 sleep\n12.3 cmbagent-batch:fit:1\n12.4 cmbagent-batch:fit:2\n12.batch batch\n"
    env, log = fake_slurm(tmp_path, steps)
    monkeypatch.setenv("PATH", env["PATH"])
    step = Step.of(InSlurm("12"), "fit", 2)
    assert step.end(signal.SIGTERM) == ("12.4",)
    assert step.end() == ("12.4",)
    assert log.read_text().splitlines() == [
        "squeue --noheader --steps --jobs=12 --format=%i %j", "scancel --signal=TERM 12.4",
        "squeue --noheader --steps --jobs=12 --format=%i %j", "scancel 12.4"]


def test_a_step_not_started_or_ended_is_not_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, log = fake_slurm(tmp_path, "12.0 sleep\n")
    monkeypatch.setenv("PATH", env["PATH"])
    assert Step("12", "cmbagent-batch:fit:1").end(signal.SIGTERM) == ()
    assert log.read_text().splitlines() == ["squeue --noheader --steps --jobs=12 --format=%i %j"]


def test_a_failing_squeue_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, _ = fake_slurm(tmp_path, "", squeue_code=1)
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(SlurmError) as err:
        Step("12", "cmbagent-batch:fit:1").end()
    assert str(err.value) == ("finding job step cmbagent-batch:fit:1: `squeue --noheader --steps --jobs=12 "
                              "--format=%i %j` failed (exit 1): squeue: error: slurm_load_jobs error")


# -- for real, inside an allocation of the local Slurm ----------------------------------------------------------

# Run in the job by the step of cmbagent-batch's own ranks (started with --overlap, as the sbatch script
# should): two 2-rank tasks on the node's 4 CPUs, then, once both steps run, a 4-rank one, each an MPI program
# that records its step and times; then a step that ignores SIGTERM, ended.
DRIVER = """
import json, os, signal, subprocess, sys, time
from cmbagent_batch.place.booking import Booking
from cmbagent_batch.place.inventory import declared
from cmbagent_batch.place.launch import Step, in_slurm, launch_env
from cmbagent_batch.spec.model import Resources

where = in_slurm()
booking = Booking(declared(4, host=os.environ["SLURMD_NODENAME"]))
RANK = ("import json, os, sys, time; from mpi4py import MPI; t0 = time.time(); time.sleep(3); sys.stdout.write("
        "json.dumps([os.environ['SLURM_STEP_ID'], MPI.COMM_WORLD.Get_size(), t0, time.time()]) + chr(10))")

def started(task):
    step, deadline = Step.of(where, task, 1), time.monotonic() + 60
    while not step.ids(subprocess.run(step.find_command(), capture_output=True, text=True).stdout):
        assert time.monotonic() < deadline, f"no step {step.name}"
        time.sleep(0.1)
    return step

def start(task, r, command):
    p = booking.place(r)
    assert p is not None, task
    env = {**os.environ, **launch_env(p, r, where, task_id=task, attempt=1)}
    proc = subprocess.Popen("$CMBAGENT_LAUNCH " + command, shell=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return p, proc

program = f"{sys.executable} -c \\"{RANK}\\""
out = {"inherited": list(where.inherited)}
(pa, a), (pb, b) = start("a", Resources(ranks=2), program), start("b", Resources(ranks=2), program)
started("a"), started("b")
booking.release(pa)  # books the 4 cores early on purpose: Slurm must hold the step until a and b end
booking.release(pb)
pc, c = start("c", Resources(ranks=4), program)
for name, proc in ("a", a), ("b", b), ("c", c):
    so, se = proc.communicate(timeout=120)
    out[name] = {"code": proc.returncode, "ranks": [json.loads(line) for line in so.splitlines()], "err": se}
booking.release(pc)
_, d = start("d", Resources(), "sh -c 'trap \\"\\" TERM; sleep 60'")
step = started("d")
out["d"] = {"termed": step.end(signal.SIGTERM)}
time.sleep(1)
out["d"]["running_after_term"] = d.poll() is None
out["d"]["killed"] = step.end()
out["d"]["code"] = d.wait(timeout=60)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_task_steps_run_at_once_where_they_fit_wait_where_they_do_not_and_end_on_scancel(
        tmp_path: Path, slurm_conf: str) -> None:
    pytest.importorskip("mpi4py", reason="the MPI program needs the 'mpi' extra (mpi4py, mpich)")
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "job.out"
    (tmp_path / "job.sh").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=1 --ntasks=1 --cpus-per-task=4 --time=5 --output={out}
        export SLURM_OVERLAP=1  # left by a site's module: the task steps must not inherit it
        srun --overlap --cpu-bind=none --mem=0 --mpi=pmi2 {sys.executable} {tmp_path / 'driver.py'}
        """))
    env = env_for(os.environ, slurm_conf)
    sub = subprocess.run(["sbatch", "--parsable", str(tmp_path / "job.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    end = wait_job_end(sub.stdout.strip().split(";")[0], env, 180)
    text = out.read_text()
    assert end["JobState"] == "COMPLETED", text
    result = json.loads(text.splitlines()[-1])
    assert "SLURM_OVERLAP" in result["inherited"]
    a, b, c = (result[k]["ranks"] for k in "abc")
    assert [result[k]["code"] for k in "abc"] == [0, 0, 0], text
    assert [sorted(r[1] for r in ranks) for ranks in (a, b, c)] == [[2, 2], [2, 2], [4, 4, 4, 4]]
    assert len({r[0] for r in a + b + c}) == 3  # three job steps, one each
    assert max(r[2] for r in a + b) < min(r[3] for r in a + b)  # a and b ran at once
    assert min(r[2] for r in c) > max(r[3] for r in a + b)  # c waited until both had ended
    assert "step creation temporarily disabled" in result["c"]["err"]
    d = result["d"]
    assert d["termed"] == d["killed"] and len(d["termed"]) == 1, d
    assert d["running_after_term"] and d["code"] != 0, d
