"""On a machine with GPUs: a task of ``gpus_per_rank: 1`` sees exactly one device in ``nvidia-smi``, the
inventory being this machine's (skipped where ``nvidia-smi -L`` lists none)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import cli
from tests.helpers.runs import work_dir


def listed_gpus() -> list[str]:
    """The devices ``nvidia-smi -L`` lists; the test is skipped, saying why, when there is none."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no GPU here: nvidia-smi is not on PATH")
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    gpus = [line for line in res.stdout.splitlines() if line.startswith("GPU ")]
    if res.returncode != 0 or not gpus:
        pytest.skip(f"no GPU here: `nvidia-smi -L` lists none (exit {res.returncode}: {res.stderr.strip()})")
    return gpus


def test_a_task_of_one_gpu_sees_exactly_one_device(tmp_path: Path) -> None:
    machine = listed_gpus()
    (tmp_path / "job.yaml").write_text("""\
version: 1
job: {name: gpu, run_dir: ./run}
tasks:
  - id: emulator
    kind: shell
    run: nvidia-smi -L
    resources: {gpus_per_rank: 1}
""")
    res = cli(tmp_path, "run", "job.yaml")
    assert res.returncode == 0, res.stderr
    assert f"GPU{'s' if len(machine) > 1 else ''} " in res.stderr  # the inventory: this machine's GPUs
    seen = (work_dir(tmp_path / "run", "emulator") / "logs" / "stdout.log").read_text().splitlines()
    assert len([line for line in seen if line.startswith("GPU ")]) == 1, seen
