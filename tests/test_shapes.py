"""Task shapes (``resources: {nodes, ranks, cpus_per_rank, gpus_per_rank, memory_mb}``) in the spec, and their
placement by the scheduler on a booked inventory: packing, backfill that never starves a big task, and
tasks that can never fit refused before anything starts."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from cmbagent_batch.execute.progress import Progress
from cmbagent_batch.execute.scheduler import Scheduler
from cmbagent_batch.place.booking import Booking
from cmbagent_batch.place.inventory import Inventory, Node, Source
from cmbagent_batch.spec.model import Resources
from cmbagent_batch.states import Tally, TaskState
from tests.helpers.cli import cli
from tests.helpers.fake_scheduler import FakePools, Job
from tests.helpers.mpi_run import MPIEXEC, mpirun
from tests.helpers.runs import published

HEAD = "version: 1\njob: {name: shapes}\n"


def release_oldest(job: Job, sched: Scheduler) -> None:
    if job.pools.held:
        job.pools.release(job.pools.held[0][0])


def booking(cpus: int, gpus: int = 0) -> Booking:
    return Booking(Inventory(nodes=(Node("vm", cpus, tuple(str(i) for i in range(gpus))),), source=Source.DECLARED))


def blocked_big_job(backfill_s: float) -> Job:
    """``a`` (2 of 4 cores) runs first; ``big`` (all 4) waits for it; 16 one-core tasks could keep the
    cores busy past ``a``'s end forever after. Each tick ends the oldest running attempt."""
    tasks: dict[str, dict[str, object]] = {"a": {"shape": Resources(ranks=2), "priority": 10},
                                           "big": {"shape": Resources(ranks=4), "priority": 9}}
    tasks.update({f"s{i:02d}": {"priority": 1} for i in range(16)})
    return Job(tasks, workers=8, pools=FakePools(hold=tasks), tick=release_oldest,
               limits={"booking": booking(4), "backfill_s": backfill_s}).run()


def test_small_tasks_use_the_cores_a_blocked_big_task_cannot_and_the_big_one_still_starts() -> None:
    job = blocked_big_job(backfill_s=4.0)
    launches = job.launches()
    assert launches[:3] == ["a", "s00", "s01"]  # backfill: 2 cores are free while big waits for 4
    assert launches.index("big") < len(launches) - 1  # it did not wait for every small task
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
    assert job.sched.admission.limits.booking is not None and job.sched.admission.limits.booking.busy_cpus == 0


def test_without_a_backfill_limit_the_small_tasks_would_starve_the_big_one() -> None:
    launches = blocked_big_job(backfill_s=1e9).launches()
    assert launches[-1] == "big"  # what execution.backfill_s prevents


def test_booked_tasks_never_exceed_the_inventory_and_a_gpu_task_gets_its_own_devices() -> None:
    tasks = {f"g{i}": {"shape": Resources(gpus_per_rank=2), "priority": 5} for i in range(3)}
    tasks.update({f"c{i}": {"shape": Resources(cpus_per_rank=3)} for i in range(3)})
    job = Job(tasks, workers=8, pools=FakePools(hold=tasks), tick=release_oldest,
              limits={"booking": booking(4, gpus=4)}).run()
    assert job.peak_cpus <= 4
    assert set(job.states().values()) == {TaskState.SUCCEEDED}
    placed = [extra["placement"] for tid, state, extra in job.records if state is TaskState.RUNNING and tid[0] == "g"]
    assert [len(p["gpus"][0]) for p in placed] == [2, 2, 2]


def test_contradicting_shapes_are_refused_where_they_are_written(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(HEAD + """tasks:
  - {id: a, kind: shell, run: "true", resources: {cpus: 2, cpus_per_rank: 2}}
  - {id: b, kind: shell, run: "true", resources: {cpus: 2, ranks: 4}}
  - {id: c, kind: shell, run: "true", resources: {ranks: 3, nodes: 2}}
  - {id: d, kind: shell, run: "true", resources: {ranks: 4, nodes: 2, cpus_per_rank: 2, gpus_per_rank: 1}}
""")
    done = cli(tmp_path, "validate", str(spec))
    assert done.returncode == 2
    assert done.stderr.splitlines()[:3] == [
        f"{spec}:4:51: $.tasks[0].resources.cpus (task 'a'): give 'cpus' (the CPUs of a one-rank task) or "
        "'cpus_per_rank', not both",
        f"{spec}:5:51: $.tasks[1].resources.cpus (task 'b'): 'cpus' is the CPUs of a one-rank task; with 4 ranks "
        "give 'cpus_per_rank'",
        f"{spec}:6:58: $.tasks[2].resources.ranks (task 'c'): 3 ranks cannot be spread evenly over 2 nodes: give "
        "a multiple of 2",
    ]


MIXED = HEAD + """execution: {max_workers: 4, inventory: {cpus: 4, gpus: [0, 1, 2, 3]}}
tasks:
  - id: pair{i}
    kind: shell
    run: $CMBAGENT_LAUNCH python -c "from mpi4py import MPI; import time; time.sleep(1); print(MPI.COMM_WORLD.Get_size())" > size.txt
    resources: {ranks: 2}
    outputs: [size.txt]
    matrix: {i: [1, 2]}
  - id: quad
    kind: shell
    run: $CMBAGENT_LAUNCH python -c "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())" > size.txt
    resources: {ranks: 4}
    outputs: [size.txt]
  - id: gpu{j}
    kind: shell
    run: echo "$CUDA_VISIBLE_DEVICES $CMBAGENT_GPUS $CMBAGENT_NTASKS" > gpus.txt; sleep 0.5
    resources: {gpus_per_rank: 2}
    outputs: [gpus.txt]
    matrix: {j: [1, 2, 3]}
"""


def spans(run_dir: Path) -> dict[str, tuple[float, float, dict[str, object]]]:
    """Each task's (start, end, placement) as the run journaled them."""
    starts: dict[str, tuple[float, dict[str, object]]] = {}
    out = {}
    for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["state"] == "running":
            starts[rec["task"]] = (rec["t"], rec["placement"])
        elif rec["state"] == "succeeded":
            out[rec["task"]] = (starts[rec["task"]][0], rec["t"], starts[rec["task"]][1])
    return out


@pytest.mark.slow
def test_tasks_of_ranks_and_gpus_share_a_declared_inventory_and_each_launch_sees_its_own_size(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(MIXED)
    done = cli(tmp_path, "run", "job.yaml", check=True)
    assert "cmbagent-batch: inventory: 1 node (" in done.stderr
    check_mixed(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_on_mpi_worker_ranks_tasks_are_placed_on_the_declared_inventory_as_on_local_pools(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
    (tmp_path / "job.yaml").write_text(MIXED.replace("execution: {", "execution: {backend: mpi, "))
    done = mpirun(tmp_path, 3, "run", "job.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("cmbagent-batch: inventory: 1 node (") == 1  # rank 0 alone says it
    assert "does not place" not in done.stderr
    check_mixed(tmp_path)
    ends = [json.loads(line) for path in sorted((tmp_path / "runs" / "shapes" / "journal").glob("rank-000[12].jsonl"))
            for line in path.read_text().splitlines()]
    assert {rec["rank"] for rec in ends} == {1, 2}  # the declared node's tasks went to both of its workers
    assert sorted(rec["task"] for rec in ends) == ["gpu1", "gpu2", "gpu3", "pair1", "pair2", "quad"]


def check_mixed(tmp_path: Path) -> None:
    """``MIXED`` ran placed: the two 2-rank tasks at once, the 4-rank one after them, each launch seeing its
    own size, and GPU tasks running at once on disjoint devices."""
    run_dir = tmp_path / "runs" / "shapes"
    times = spans(run_dir)
    (p1, e1, _), (p2, e2, _), (q, _, quad) = times["pair1"], times["pair2"], times["quad"]
    assert max(p1, p2) < min(e1, e2)  # the two 2-rank tasks ran at once on the 4 CPUs
    assert q >= max(e1, e2)  # the 4-rank task never overlapped them
    assert quad["cores"] == ["0-3"]
    for tid, ranks in (("pair1", 2), ("pair2", 2), ("quad", 4)):
        sizes = (published(run_dir, tid) / "size.txt").read_text()
        assert "".join(sizes.split()) == str(ranks) * ranks, (tid, sizes)  # each rank's line (they may interleave)
    gpus = {tid: (published(run_dir, tid) / "gpus.txt").read_text().split() for tid in ("gpu1", "gpu2", "gpu3")}
    assert all(len(v[0].split(",")) == 2 and v[0] == v[1] and v[2] == "1" for v in gpus.values()), gpus
    for a, b in (("gpu1", "gpu2"), ("gpu1", "gpu3"), ("gpu2", "gpu3")):
        (sa, ea, _), (sb, eb, _) = times[a], times[b]
        if sa < eb and sb < ea:  # at once: never the same device
            assert not set(gpus[a][0].split(",")) & set(gpus[b][0].split(",")), gpus
    status = json.loads(cli(tmp_path, "status", str(run_dir), "--format", "json", check=True).stdout)
    assert status["status"] == "finished"
    rows = {row["id"]: row for row in status["tasks"]}
    assert rows["quad"]["placement"]["cores"] == ["0-3"] and rows["quad"]["launch"].split()[1:3] == ["-n", "4"]
    assert all(row["state"] == "succeeded" and row["placement"]["hosts"] for row in rows.values())  # where each ran
    text = cli(tmp_path, "status", str(run_dir), check=True).stdout
    assert f"      on {quad['hosts'][0]} cores 0-3: {rows['quad']['launch']}" in text.splitlines()
    assert json.loads((run_dir / "run.json").read_text())["inventory"].endswith("(declared)")


def test_a_task_bigger_than_the_machine_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(HEAD + 'tasks:\n  - {id: huge, kind: shell, run: "true", '
                                       "resources: {cpus_per_rank: 4096}}\n")
    done = cli(tmp_path, "run", "job.yaml")
    assert done.returncode == 2, done.stderr
    cpus = len(os.sched_getaffinity(0))
    assert done.stderr == (f"job.yaml:4:53: $.tasks[0].resources (task 'huge'): asks for 4,096 CPUs on one node; "
                           f"the largest node has {cpus} CPU{'s' if cpus > 1 else ''} (this machine): it can never "
                           "run here (when_unplaceable: skip would skip it)\n")
    assert not (tmp_path / "runs").exists()


def test_validate_refuses_a_task_bigger_than_the_declared_inventory(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(HEAD + "execution: {inventory: {cpus: 2, gpus: [0]}}\n"
                                       'tasks:\n  - {id: wide, kind: shell, run: "true", resources: {gpus_per_rank: 2}}\n')
    done = cli(tmp_path, "validate", "job.yaml")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        "job.yaml:5:53: $.tasks[0].resources (task 'wide'): asks for 2 GPUs on one node; the largest node has 1 "
        "GPU (declared inventory): it can never run here (when_unplaceable: skip would skip it)")


def test_the_progress_line_shows_the_cpus_and_gpus_busy_out_of_the_inventory() -> None:
    booked = booking(4, gpus=2)
    assert booked.place(Resources(ranks=3, gpus_per_rank=0)) is not None
    assert booked.place(Resources(gpus_per_rank=1)) is not None
    line = Progress(5, stream=io.StringIO()).line(Tally.from_counts({TaskState.RUNNING: 2, TaskState.PENDING: 3}),
                                                  booked=booked)
    assert line.endswith("; 4/4 CPUs busy, 1/2 GPUs")
    assert "CPUs busy" not in Progress(5, stream=io.StringIO()).line(Tally.from_counts({TaskState.PENDING: 5}))


def test_with_no_backfill_tasks_start_in_order_first_fit() -> None:
    launches = blocked_big_job(backfill_s=0.0).launches()
    assert launches[:3] == ["a", "big", "s00"]  # nothing passes big: it waits for a's cores, then the rest


OPTIONAL = HEAD + """execution: {inventory: {cpus: 2}}
tasks:
  - {id: "grid{i}", kind: shell, run: "echo {i} > out.txt", outputs: [out.txt], matrix: {i: [1, 2, 3]}}
  - {id: train, kind: shell, run: "true", resources: {gpus_per_rank: 1}, when_unplaceable: skip}
  - {id: use, kind: shell, run: "true", depends_on: [train]}
  - {id: after, kind: shell, run: "true", depends_on: [use]}
"""


def test_a_task_that_can_never_fit_is_skipped_with_what_depends_on_it_when_its_entry_says_so(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(OPTIONAL)
    said = ("cmbagent-batch: skipped (when_unplaceable: skip), with what depends on it: 'train': asks for 1 GPU on "
            "one node; no node has a GPU (declared inventory)\n")
    dry = cli(tmp_path, "run", "job.yaml", "--dry-run", check=True)
    assert said in dry.stderr
    assert dry.stdout.splitlines()[-3:] == [
        "train: skip (can never fit here: asks for 1 GPU on one node; no node has a GPU (declared inventory))",
        "use: skip (depends on a task that can never fit here)",
        "after: skip (depends on a task that can never fit here)"]
    done = cli(tmp_path, "run", "job.yaml", "--quiet", check=True)
    assert done.stderr == said
    rows = {r["id"]: r for r in json.loads(cli(tmp_path, "status", "job.yaml", "--format", "json",
                                               check=True).stdout)["tasks"]}
    assert {tid: r["state"] for tid, r in rows.items()} == {
        "grid1": "succeeded", "grid2": "succeeded", "grid3": "succeeded", "train": "skipped", "use": "skipped",
        "after": "skipped"}
    shown = cli(tmp_path, "status", "job.yaml", "--all", check=True).stdout.splitlines()
    at = shown.index(next(line for line in shown if line.startswith("  train ")))
    assert shown[at + 1] == ("      can never fit here: asks for 1 GPU on one node; no node has a GPU (declared "
                             "inventory)")
    assert "Inventory: 1 node (" in shown[2]


THREADED = HEAD + """execution: {isolation: thread, inventory: {cpus: 4, gpus: [0, 1]}}
tasks:
  - id: pair
    kind: python
    call: ranks:where
    args: {out: launch.json}
    resources: {ranks: 2, gpus_per_rank: 1}
    outputs: [launch.json]
"""
WHERE = '''import json, os


def where(out, ctx):
    launch = dict(ctx.launch)
    with open(os.path.join(ctx.work_dir, out), "w") as fh:
        json.dump({"launch": launch, "in_environ": "CMBAGENT_LAUNCH" in os.environ}, fh)
'''


def test_a_python_task_in_a_thread_finds_its_launch_in_its_context_not_in_the_shared_environment(
        tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(THREADED)
    (tmp_path / "ranks.py").write_text(WHERE)
    cli(tmp_path, "run", "job.yaml", check=True)
    seen = json.loads((published(tmp_path / "runs" / "shapes", "pair") / "launch.json").read_text())
    launch = seen["launch"]
    assert launch["CMBAGENT_LAUNCH"].split()[1:3] == ["-n", "2"]
    assert (launch["CMBAGENT_NTASKS"], launch["CMBAGENT_GPUS"], launch["CUDA_VISIBLE_DEVICES"]) == ("2", "0,1", "0,1")
    assert seen["in_environ"] is False  # the runner's environment, which every thread shares, is left alone
