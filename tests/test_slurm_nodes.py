"""A submitted job over two nodes of the local Slurm (partition ``two`` of ``slurm/local-cluster.sh``: nodes n1
and n2, each its own slurmd): rank 0 books tasks per node and sends each to a worker rank on its node, and a
two-node task runs as one job step with a rank on each node."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.cli import cli
from tests.helpers.mpi_run import run_env, write
from tests.helpers.runs import published
from tests.helpers.slurm_cluster import env_for, job_logs, wait_job_end

pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")

pytestmark = pytest.mark.slow  # a Slurm job on MPI ranks

NAPS = 8
# span: each rank of its step says where it runs; the step's rank 0 also saves Slurm's view of the step.
# nap-N: one core, on whichever node rank 0 placed it; says the node of the worker rank that ran it.
SPEC = f"""\
version: 1
job: {{name: nodes}}
execution: {{backend: mpi}}
tasks:
  - id: span
    kind: shell
    run: |
      $CMBAGENT_LAUNCH sh -c '
        echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS $SLURM_JOB_ID.$SLURM_STEP_ID"
        if [ "$SLURM_PROCID" = 0 ]; then
          scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID" > step.txt
          squeue --steps --jobs "$SLURM_JOB_ID" --format "%i %j %N" > steps.txt
        fi
        sleep 2' > ranks.txt
    resources: {{nodes: 2, ranks: 2}}
    estimate: 5
    outputs: [ranks.txt, step.txt, steps.txt]
  - id: nap-{{i}}
    kind: shell
    matrix: {{i: {list(range(1, NAPS + 1))}}}
    run: sleep 1 && echo "$SLURMD_NODENAME" > node.txt
    estimate: 1
    outputs: [node.txt]
"""


def test_a_job_over_two_nodes_routes_tasks_to_each_node_and_runs_a_two_node_task_as_one_step(
        tmp_path: Path, slurm_two_nodes: str) -> None:
    """Ranks 0 and 1 on n1, 2 and 3 on n2: workers on both nodes run naps, and span's step has one rank on
    each node."""
    env = env_for(run_env(tmp_path), slurm_two_nodes)
    spec = write(tmp_path, SPEC)
    run_dir = tmp_path / "runs" / "nodes"
    sub = cli(tmp_path, "submit", str(spec), "--partition", "two", "--nodes", "2", "--ntasks-per-node", "2",
              "--time", "5", env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    end = wait_job_end(job_id, env, 240, run_dir)
    assert end["JobState"] == "COMPLETED", job_logs(run_dir)
    assert end["NodeList"] == "n[1-2]", end
    log = (run_dir / "slurm" / f"slurm-{job_id}.log").read_text()
    assert "cmbagent-batch: inventory: 2 nodes (n1, n2): each 2 CPUs, no GPU, memory not counted (slurm)\n" in log, log

    span = published(run_dir, "span")
    ranks = sorted((span / "ranks.txt").read_text().splitlines())
    step = ranks[0].split()[3]
    assert step.startswith(f"{job_id}.") and step != f"{job_id}.0", ranks  # its own step, not the ranks' one
    assert ranks == [f"n1 0 2 {step}", f"n2 1 2 {step}"], ranks
    shown = (span / "step.txt").read_text()
    fields = shown.split()
    assert {f"StepId={step}", "NodeList=n[1-2]", "Nodes=2", "Tasks=2", "Name=cmbagent-batch:span:1"} <= set(fields), shown
    listed = (span / "steps.txt").read_text()
    assert f"{step} cmbagent-batch:span:1 n[1-2]" in listed.splitlines(), listed

    nodes = {f"nap-{i}": (published(run_dir, f"nap-{i}") / "node.txt").read_text().strip() for i in range(1, NAPS + 1)}
    assert set(nodes.values()) == {"n1", "n2"}, nodes
    records = [json.loads(line) for line in (run_dir / "journal" / "rank-0000.jsonl").read_text().splitlines()]
    running = {r["task"]: r for r in records if r["state"] == "running"}
    assert running["span"]["placement"]["hosts"] == ["n1", "n2"], running["span"]
    for task, node in nodes.items():  # ran where rank 0 booked it
        assert running[task]["placement"]["hosts"] == [node], running[task]
    assert Counter(r["state"] for r in records if r["state"] in ("succeeded", "failed")) == {"succeeded": NAPS + 1}

    status = cli(tmp_path, "status", str(run_dir), env=env)
    assert status.returncode == 0, status.stderr
    assert f"Slurm job {job_id}: COMPLETED" in status.stdout, status.stdout
    assert "Inventory: 2 nodes (n1, n2): each 2 CPUs, no GPU, memory not counted (slurm)" in status.stdout.splitlines()
    # What Slurm said of the two-node step while it ran, for the record (-s shows it).
    print(f"\n--- scontrol show step {step}:\n{shown}--- squeue --steps:\n{listed}")
    print(subprocess.run(["sacct", "-c", "-j", job_id], env=env, capture_output=True, text=True, timeout=60).stdout)
