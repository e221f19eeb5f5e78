"""Where tasks can run: a declared inventory; this machine's CPUs, memory and GPUs (CUDA_VISIBLE_DEVICES,
else a real ``nvidia-smi`` process found on PATH); a Slurm allocation read from its variables and a
``scontrol`` on PATH; which of them ``discover`` takes; and why a task's shape can never fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cmbagent_batch.errors import SlurmError
from cmbagent_batch.place.inventory import (
    Inventory,
    Node,
    Source,
    cpus_per_node,
    declared,
    discover,
    job_gpus,
    local,
    slurm,
)
from cmbagent_batch.spec.model import Resources

A100_LIST = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5e4b1c2a-0f1d-4c8e-9a7b-1d2e3f4a5b6c)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9f8e7d6c-5b4a-3c2d-1e0f-a1b2c3d4e5f6)
  MIG 1g.5gb      Device  0: (UUID: MIG-0c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f)
"""
DRIVER_DOWN = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
               "Make sure that the latest NVIDIA driver is installed and running.")


def executable(bin_dir: Path, name: str, body: str) -> Path:
    """A real program ``name`` in ``bin_dir``: a shell script running ``body``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def scontrol(tmp_path: Path, answers: dict[str, str]) -> Path:
    """A ``scontrol`` that logs its arguments and answers each known argument line with a shell snippet;
    the log's path is returned."""
    log = tmp_path / "scontrol.log"
    cases = "".join(f"  '{args}') {body} ;;\n" for args, body in answers.items())
    executable(tmp_path / "bin", "scontrol", f'echo "$*" >> {log}\ncase "$*" in\n{cases}'
               '  *) echo "scontrol: unexpected $*" >&2; exit 3 ;;\nesac\n')
    return log


@pytest.fixture
def path_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/bin`` first on this process's PATH, where Slurm's commands are looked up."""
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "bin"


def machine(gpus: str) -> str:
    cpus = len(os.sched_getaffinity(0))
    return (f"1 node (vm): {cpus} CPU{'s' if cpus > 1 else ''}, {gpus}, "
            f"{psutil.virtual_memory().total // 2**20:,} MB (local)")


# -- declared --------------------------------------------------------------------------------------------


def test_a_declared_inventory_is_one_node_named_by_the_host() -> None:
    inv = declared(4, ["0", 1], 15872, "vm")
    assert inv == Inventory((Node("vm", 4, ("0", "1"), 15872),), Source.DECLARED)
    assert inv.describe() == "1 node (vm): 4 CPUs, GPUs 0,1, 15,872 MB (declared)"
    assert declared(1, ["3"], host="laptop").describe() == "1 node (laptop): 1 CPU, GPU 3, memory not counted (declared)"
    assert declared(2).describe().endswith(": 2 CPUs, no GPU, memory not counted (declared)")


def test_describe_tells_nodes_alike_once_and_at_most_three_shapes() -> None:
    inv = Inventory((Node("a", 8, ("0", "1")), Node("b", 8, ("2", "3")), Node("c", 4), Node("d", 2), Node("e", 1),
                     Node("f", 1)), Source.MPI)
    assert inv.describe() == ("6 nodes: a, b: each 8 CPUs, 2 GPUs, memory not counted; c: 4 CPUs, no GPU, "
                              "memory not counted; d: 2 CPUs, no GPU, memory not counted; 2 more nodes of 1 other "
                              "shape (mpi ranks)")
    assert Inventory((), Source.MPI).describe() == "no node (mpi ranks)"


# -- this machine ----------------------------------------------------------------------------------------


def test_local_gpus_are_those_of_cuda_visible_devices_and_nvidia_smi_is_not_asked(tmp_path: Path) -> None:
    asked = tmp_path / "asked"
    executable(tmp_path / "bin", "nvidia-smi", f"echo asked > {asked}\necho 'GPU 0: NVIDIA A100 (UUID: GPU-1)'\n")
    env = {"PATH": str(tmp_path / "bin")}
    inv = local({**env, "CUDA_VISIBLE_DEVICES": "1,3"}, host="vm")
    assert inv.nodes[0].gpus == ("1", "3")
    assert inv.describe() == machine("GPUs 1,3 (from CUDA_VISIBLE_DEVICES)")
    # CUDA stops at the first entry that is not a device.
    assert local({**env, "CUDA_VISIBLE_DEVICES": "0, 2,-1,1"}).nodes[0].gpus == ("0", "2")
    assert local({**env, "CUDA_VISIBLE_DEVICES": "GPU-5e4b1c2a"}).nodes[0].gpus == ("GPU-5e4b1c2a",)
    assert not asked.exists()


@pytest.mark.parametrize(("visible", "note"), [("", "CUDA_VISIBLE_DEVICES is empty"),
                                               ("-1", "CUDA_VISIBLE_DEVICES=-1"),
                                               ("NoDevFiles", "CUDA_VISIBLE_DEVICES=NoDevFiles")])
def test_an_empty_or_no_device_cuda_visible_devices_means_no_gpu_and_says_why(
        tmp_path: Path, visible: str, note: str) -> None:
    executable(tmp_path / "bin", "nvidia-smi", "echo 'GPU 0: NVIDIA A100 (UUID: GPU-1)'\n")
    inv = local({"PATH": str(tmp_path / "bin"), "CUDA_VISIBLE_DEVICES": visible}, host="vm")
    assert inv.nodes[0].gpus == ()
    assert inv.describe() == machine(f"no GPU ({note})")


def test_local_gpus_are_read_from_nvidia_smi_on_path(tmp_path: Path) -> None:
    executable(tmp_path / "bin", "nvidia-smi", f'[ "$*" = "-L" ] || exit 2\nprintf %s "{A100_LIST}"\n')
    inv = local({"PATH": str(tmp_path / "bin")}, host="vm")
    assert inv.nodes[0].gpus == ("0", "1")
    assert inv.describe() == machine("GPUs 0,1 (from nvidia-smi -L)")


def test_no_nvidia_smi_means_no_gpu_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    inv = local({"PATH": str(tmp_path / "bin")}, host="vm")
    assert inv.nodes[0].gpus == ()
    assert inv.gpu_note == "nvidia-smi not found"
    assert inv.describe() == machine("no GPU (nvidia-smi not found)")


def test_a_failing_nvidia_smi_means_no_gpu_and_says_what_it_said(tmp_path: Path) -> None:
    executable(tmp_path / "bin", "nvidia-smi", f'echo "{DRIVER_DOWN}" >&2\nexit 9\n')
    inv = local({"PATH": str(tmp_path / "bin")}, host="vm")
    assert inv.nodes[0].gpus == ()
    assert inv.describe() == machine(f"no GPU (nvidia-smi -L exited 9: {DRIVER_DOWN})")
    executable(tmp_path / "bin", "nvidia-smi", "exit 0\n")
    assert local({"PATH": str(tmp_path / "bin")}, host="vm").describe() == machine("no GPU (nvidia-smi -L lists none)")


def test_local_cpus_are_those_this_process_may_use() -> None:
    code = "from cmbagent_batch.place.inventory import local; print(local({'PATH': ''}).nodes[0].cpus)"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "1\n"


# -- the Slurm allocation --------------------------------------------------------------------------------

JOB_DETAIL = """JobId=42 JobName=mixed
   UserId=me(1000) GroupId=me(1000) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   NodeList=gpu[1-2],cpu1
   NumNodes=3 NumCPUs=180 NumTasks=3 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=180,mem=768000M,node=3,billing=180,gres/gpu=4
   JOB_GRES=gpu:a100:4
     Nodes=gpu[1-2] CPU_IDs=0-71 Mem=256000 GRES=gpu:a100:2(IDX:0-1)
     Nodes=cpu1 CPU_IDs=0-35 Mem=256000 GRES=
   MinCPUsNode=1 MinMemoryNode=250G MinTmpDiskNode=0
"""


def allocation(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[1-2],cpu1", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36",
            **extra}


def test_an_allocation_is_read_from_its_variables_and_scontrol(tmp_path: Path, path_first: Path) -> None:
    log = scontrol(tmp_path, {"show hostnames gpu[1-2],cpu1": "printf '%s\\n' gpu1 gpu2 cpu1",
                              "show hostnames gpu[1-2]": "printf '%s\\n' gpu1 gpu2",
                              "show job -d 42": f"cat <<'EOF'\n{JOB_DETAIL}EOF\n"})
    inv = slurm(allocation(SLURM_MEM_PER_NODE="256000"))
    assert inv == Inventory((Node("gpu1", 72, ("0", "1"), 256000), Node("gpu2", 72, ("0", "1"), 256000),
                             Node("cpu1", 36, (), 256000)), Source.SLURM)
    assert inv.describe() == ("3 nodes: gpu1, gpu2: each 72 CPUs, GPUs 0,1, 256,000 MB; "
                              "cpu1: 36 CPUs, no GPU, 256,000 MB (slurm)")
    assert log.read_text().splitlines() == ["show hostnames gpu[1-2],cpu1", "show job -d 42", "show hostnames gpu[1-2]"]


def test_memory_per_cpu_is_counted_per_node_and_no_memory_variable_counts_none(
        tmp_path: Path, path_first: Path) -> None:
    scontrol(tmp_path, {"show hostnames gpu[1-2],cpu1": "printf '%s\\n' gpu1 gpu2 cpu1",
                        "show job -d 42": "echo 'JobId=42 JOB_GRES=(null) Nodes=gpu[1-2],cpu1 CPU_IDs=0-3 Mem=0 GRES='"})
    assert [n.memory_mb for n in slurm(allocation(SLURM_MEM_PER_CPU="1000")).nodes] == [72000, 72000, 36000]
    inv = slurm(allocation(SLURM_MEM_PER_NODE="0"))  # --mem=0: all of each node, amount not given
    assert [n.memory_mb for n in inv.nodes] == [None, None, None]
    assert inv.describe() == ("3 nodes: gpu1, gpu2: each 72 CPUs, no GPU, memory not counted; "
                              "cpu1: 36 CPUs, no GPU, memory not counted (slurm)")


def test_a_thousand_node_allocation_takes_three_scontrol_calls(tmp_path: Path, path_first: Path) -> None:
    log = scontrol(tmp_path, {"show hostnames n[0001-1000]": "seq -f 'n%04g' 1 1000",
                              "show job -d 42": "echo '   Nodes=n[0001-1000] CPU_IDs=0-35 Mem=4000 "
                                                "GRES=gpu:4(IDX:0-3)'"})
    inv = slurm({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[0001-1000]", "SLURM_JOB_CPUS_PER_NODE": "36(x1000)",
                 "SLURM_MEM_PER_NODE": "4000"})
    assert len(inv.nodes) == 1000 and inv.nodes[999] == Node("n1000", 36, ("0", "1", "2", "3"), 4000)
    assert inv.describe() == "1,000 nodes (n0001, n0002, ..., n1000): each 36 CPUs, GPUs 0,1,2,3, 4,000 MB (slurm)"
    assert len(log.read_text().splitlines()) == 3
    assert inv.never_fits(Resources(nodes=1000, ranks=4000, cpus_per_rank=9, gpus_per_rank=1)) is None
    assert inv.never_fits(Resources(nodes=1001, ranks=1001)) == \
        "asks for 1,001 nodes; the inventory has 1,000 (Slurm allocation)"


def test_outside_an_allocation_there_is_none() -> None:
    assert slurm({"SLURM_JOB_NODELIST": "n1"}) is None


def test_a_failing_scontrol_is_an_error_naming_the_command_and_what_it_said(tmp_path: Path, path_first: Path) -> None:
    scontrol(tmp_path, {"show hostnames n[1-": "echo 'scontrol: error: Invalid hostlist: n[1-' >&2; exit 1"})
    with pytest.raises(SlurmError) as err:
        slurm({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-", "SLURM_JOB_CPUS_PER_NODE": "4"})
    assert str(err.value) == ("reading the allocation's nodes: `scontrol show hostnames n[1-` failed (exit 1): "
                              "scontrol: error: Invalid hostlist: n[1-")


def test_no_scontrol_inside_an_allocation_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError) as err:
        slurm(allocation())
    assert str(err.value) == ("scontrol not found on PATH: reading the allocation's nodes needs a Slurm client "
                              "(a login node of the cluster, or `slurm/local-cluster.sh up` for a local one)")


def test_missing_or_unreadable_slurm_variables_are_errors_naming_them(tmp_path: Path, path_first: Path) -> None:
    scontrol(tmp_path, {"show hostnames gpu[1-2],cpu1": "printf '%s\\n' gpu1 gpu2 cpu1",
                        "show job -d 42": "echo 'JobId=42'"})
    cases = {"SLURM_JOB_NODELIST": ("SLURM_JOB_ID=42 is set but SLURM_JOB_NODELIST is not: the Slurm job's "
                                    "environment is incomplete"),
             "SLURM_JOB_CPUS_PER_NODE": ("SLURM_JOB_ID=42 is set but SLURM_JOB_CPUS_PER_NODE is not: the Slurm "
                                         "job's environment is incomplete")}
    for name, message in cases.items():
        with pytest.raises(SlurmError) as err:
            slurm({k: v for k, v in allocation().items() if k != name})
        assert str(err.value) == message
    with pytest.raises(SlurmError) as err:
        slurm(allocation(SLURM_JOB_CPUS_PER_NODE="72(x3),36"))
    assert str(err.value) == ("SLURM_JOB_CPUS_PER_NODE='72(x3),36' is not the CPUs of "
                              "SLURM_JOB_NODELIST='gpu[1-2],cpu1': it counts 4 nodes, the node list 3")
    with pytest.raises(SlurmError) as err:
        slurm(allocation(SLURM_MEM_PER_NODE="250G"))
    assert str(err.value) == "SLURM_MEM_PER_NODE='250G' is not a number of MB"


@pytest.mark.parametrize(("text", "counts"), [("72(x2),36", (72, 72, 36)), ("4", (4,)), ("2(x3)", (2, 2, 2)),
                                              ("8,16(x2),8", (8, 16, 16, 8))])
def test_cpus_per_node_expands_slurms_compressed_form(text: str, counts: tuple[int, ...]) -> None:
    assert cpus_per_node(text, len(counts)) == counts


@pytest.mark.parametrize(("text", "nodes", "message"), [
    ("72(x2", 2, "'72(x2' is neither a CPU count nor COUNT(xNODES)"),
    ("72(x2),,36", 3, "'' is neither a CPU count nor COUNT(xNODES)"),
    ("4(x1000000000000)", 2, "it counts 1,000,000,000,000 nodes, the node list 2"),
])
def test_cpus_per_node_refuses_what_is_not_that_form(text: str, nodes: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        cpus_per_node(text, nodes)
    assert str(err.value) == message


@pytest.mark.parametrize(("detail", "gpus"), [
    ("Nodes=n1 CPU_IDs=0-3 Mem=1000 GRES=gpu:a100:2(IDX:0-1)", [("n1", ("0", "1"))]),
    ("Nodes=n[1-2] CPU_IDs=0-7 Mem=0 GRES=gpu:4(IDX:0,2)", [("n[1-2]", ("0", "2"))]),
    ("Nodes=n1 CPU_IDs=0 Mem=0 GRES=gpu:a100:1(IDX:0),gpu:v100:2(IDX:2-3)", [("n1", ("0", "2", "3"))]),
    ("Nodes=gpu[04-07] CPU_IDs=0-47 Mem=0 GRES=gpu(IDX:0-7)", [("gpu[04-07]", tuple(str(i) for i in range(8)))]),
    ("Nodes=gpu05 CPU_IDs=2-3 Mem=0 GRES_IDX=gpu(IDX:1-4)", [("gpu05", ("1", "2", "3", "4"))]),
    ("Nodes=n1 CPU_IDs=0-3 Mem=0 GRES=shard:2(IDX:0),mps:100(IDX:0)", []),
    ("Nodes=n1 CPU_IDs=0-3 Mem=0 GRES=gpu:0(IDX:N/A)", []),
    ("Nodes=n1 CPU_IDs=0-15 Mem=15000 GRES=", []),
    ("Nodes=n1 CPU_IDs=0-15 Mem=15000", []),
    ("JobId=7 NumNodes=2 JOB_GRES=gpu:2 Nodes=a1 CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:1) Nodes=a2 CPU_IDs=0 Mem=0 "
     "GRES=gpu:1(IDX:0) MinCPUsNode=1", [("a1", ("1",)), ("a2", ("0",))]),
])
def test_gpus_are_read_per_run_of_nodes_from_scontrol_show_job_detail(
        detail: str, gpus: list[tuple[str, tuple[str, ...]]]) -> None:
    assert job_gpus(detail) == gpus


def test_gpus_without_a_device_index_are_an_error() -> None:
    with pytest.raises(SlurmError) as err:
        job_gpus("   Nodes=n1 CPU_IDs=0-3 Mem=0 GRES=gpu(CNT:2)\n")
    assert str(err.value) == ("the job's GPUs on n1 have no device index (GRES=gpu(CNT:2)), so they cannot be told "
                              "apart: declare them in execution.inventory")


# -- discover --------------------------------------------------------------------------------------------


def test_discover_takes_the_declared_inventory_even_inside_an_allocation(tmp_path: Path, path_first: Path) -> None:
    log = scontrol(tmp_path, {})
    mine = declared(2, host="laptop")
    assert discover(allocation(), mine) is mine
    assert not log.exists()


def test_discover_takes_the_allocation_inside_one_and_this_machine_outside(tmp_path: Path, path_first: Path) -> None:
    scontrol(tmp_path, {"show hostnames gpu[1-2],cpu1": "printf '%s\\n' gpu1 gpu2 cpu1",
                        "show job -d 42": "echo 'JobId=42'"})
    assert discover(allocation()).source is Source.SLURM
    inv = discover({"PATH": str(tmp_path / "bin")})
    assert (inv.source, inv.gpu_note) == (Source.LOCAL, "nvidia-smi not found")


# -- never_fits ------------------------------------------------------------------------------------------


def cluster(*nodes: Node, note: str = "", source: Source = Source.SLURM) -> Inventory:
    return Inventory(nodes, source, note)


@pytest.mark.parametrize(("inv", "shape", "why"), [
    (declared(4, ["0", "1"], 15872, "vm"), Resources(cpus_per_rank=8),
     "asks for 8 CPUs on one node; the largest node has 4 CPUs (declared inventory)"),
    (declared(4, ["0", "1"], 15872, "vm"), Resources(ranks=4, cpus_per_rank=2),
     "asks for 8 CPUs on one node; the largest node has 4 CPUs (declared inventory)"),
    (cluster(Node("n1", 4)), Resources(nodes=2, ranks=2),
     "asks for 2 nodes; the inventory has 1 (Slurm allocation)"),
    (declared(4, ["0"], host="vm"), Resources(ranks=2, gpus_per_rank=1),
     "asks for 2 GPUs on one node; the largest node has 1 GPU (declared inventory)"),
    (cluster(Node("vm", 4), note="nvidia-smi not found", source=Source.LOCAL), Resources(gpus_per_rank=1),
     "asks for 1 GPU on one node; no node has a GPU (this machine; nvidia-smi not found)"),
    (declared(4, (), 15872, "vm"), Resources(memory_mb=64000),
     "asks for 64,000 MB on one node; the largest node has 15,872 MB (declared inventory)"),
    (cluster(Node("a", 72), Node("b", 72), Node("c", 36)), Resources(nodes=3, ranks=3, cpus_per_rank=72),
     "asks for 72 CPUs on each of 3 nodes; only 2 nodes have 72 CPUs or more (Slurm allocation)"),
    (cluster(Node("a", 8, ()), Node("b", 2, ("0", "1"))), Resources(ranks=2, cpus_per_rank=4, gpus_per_rank=1),
     "asks for 8 CPUs and 2 GPUs on one node; no node has all of that (Slurm allocation)"),
    (cluster(Node("a", 8, ("0",), 100), Node("b", 8, ("0",), 9000), Node("c", 1, ("0",), 9000)),
     Resources(nodes=2, ranks=2, cpus_per_rank=8, gpus_per_rank=1, memory_mb=5000),
     "asks for 8 CPUs, 1 GPU and 5,000 MB on each of 2 nodes; only 1 node has all of that (Slurm allocation)"),
])
def test_a_shape_that_can_never_fit_is_told_with_both_numbers(inv: Inventory, shape: Resources, why: str) -> None:
    assert inv.never_fits(shape) == why
    assert inv.never_fits(shape) == why  # kept per shape


def test_shapes_that_fit_somewhere_are_not_refused() -> None:
    inv = cluster(Node("a", 4, ("0", "1"), None), Node("b", 8, (), 1000))
    assert inv.never_fits(Resources()) is None
    assert inv.never_fits(Resources(ranks=2, gpus_per_rank=1, memory_mb=10**6)) is None  # a's memory is unknown
    assert inv.never_fits(Resources(nodes=2, ranks=2, cpus_per_rank=4, memory_mb=500)) is None
    assert declared(4, host="vm").never_fits(Resources(ranks=4)) is None
