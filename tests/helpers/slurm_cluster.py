"""The local Slurm the Slurm tests submit to: the one ``SLURM_CONF`` points at when it answers (CI brings it
up with ``slurm/local-cluster.sh up``), else one this test run brings up with that script and takes down
at its end. Its default partition has one node; partition ``two`` has nodes n1 and n2 (``slurm_two_nodes``).
Without Slurm (not root, no apt), the tests are skipped saying why; under ``CI=true`` they fail instead,
since CI must run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.slurm.client import parse_show

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}


def _answers(env: dict[str, str]) -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the local Slurm cluster is needed in CI: {why}")
    pytest.skip(f"no Slurm cluster: {why}")


@pytest.fixture(scope="session")
def slurm_conf() -> Iterator[str]:
    """``SLURM_CONF`` of a cluster that answers."""
    conf = os.environ.get("SLURM_CONF")
    if conf and _answers(dict(os.environ)):
        yield conf
        return
    if os.geteuid() != 0:
        _unavailable("SLURM_CONF is not set to a running cluster, and starting one needs root")
    proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        _unavailable(f"`slurm/local-cluster.sh up` failed:\n{proc.stderr[-3000:]}")
    conf = proc.stdout.strip().removeprefix("export SLURM_CONF=")
    try:
        yield conf
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_conf: str) -> str:
    """``SLURM_CONF`` of a cluster whose partition ``two`` has nodes n1 and n2 (one that an earlier, single-node
    ``slurm/local-cluster.sh`` started has none: its ``up`` restarts it with them)."""
    out = subprocess.run(["sinfo", "-h", "-p", "two", "-o", "%N"], env=env_for(os.environ, slurm_conf),
                         capture_output=True, text=True, timeout=20).stdout.strip()
    if out != "n[1-2]":
        _unavailable(f"the cluster at SLURM_CONF={slurm_conf} has no partition 'two' of nodes n1 and n2 "
                     f"(sinfo -p two: {out or 'nothing'}); `slurm/local-cluster.sh up` restarts it with them")
    return slurm_conf


def show_job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return parse_show(out)


def wait_job_end(job_id: str, env: dict[str, str], limit: float, run_dir: Path | None = None) -> dict[str, str]:
    """Poll ``scontrol show job`` (``sbatch --wait`` takes ~10 s more) until the job has ended for good:
    a requeued job passes through REQUEUED/PENDING, then runs again."""
    deadline = time.monotonic() + limit
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = show_job(job_id, env)
        if fields.get("JobState") in ENDED:
            return fields
        time.sleep(0.5)
    logs = ""
    if run_dir is not None:
        for p in sorted((run_dir / "slurm").glob("slurm-*")):
            logs += f"\n--- {p}\n{p.read_text()[-4000:]}"
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {limit} s: {json.dumps(fields)}{logs}")


def job_logs(run_dir: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted((run_dir / "slurm").glob("slurm-*")))


def env_for(base: dict[str, Any], conf: str) -> dict[str, str]:
    env = dict(base)
    env["SLURM_CONF"] = conf
    return env
