"""What the MPI run tests and the Slurm tests share: ``mpiexec``, the environment of a run on ranks, a
mixed DAG (shell, python and agent tasks) and the task module its python tasks call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.cli import clean_env, cli
from tests.helpers.runs import read_run

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")

KEY = "sk-mpi-test-key-0123456789"


def run_env(tmp_path: Path) -> dict[str, str]:
    """``clean_env`` with this interpreter's directory (``mpiexec``) first on PATH and the endpoint's key."""
    e = clean_env(tmp_path)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["TEST_LLM_KEY"] = KEY
    return e


def mpirun(tmp_path: Path, n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The command line on ``n`` ranks under ``mpiexec``."""
    assert MPIEXEC is not None
    return cli(tmp_path, *args, env=run_env(tmp_path), timeout=timeout, launcher=(MPIEXEC, "-n", str(n)))


def manifest(run_dir: Path) -> dict[str, Any]:
    return read_run(run_dir)


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


MIXED = """\
version: 1
job: {{name: mixed}}
execution: {{backend: mpi, keep_going: true}}
llm:
  models:
    m: {{model: test-model, base_url: "{url}", api_key_env: TEST_LLM_KEY, timeout: 30, max_retries: 0,
        price: {{prompt_per_1m: 1.0, completion_per_1m: 2.0}}}}
tasks:
  - id: gen-{{i}}
    kind: shell
    matrix: {{i: [1, 2, 3, 4, 5, 6]}}
    run: sleep 0.3 && echo "$CMBAGENT_RANK $PMI_RANK {{i}}" > part.txt
    outputs: [part.txt]
  - id: square-{{i}}
    kind: python
    matrix: {{i: [1, 2, 3, 4]}}
    call: mpitasks:square
    args: {{x: "{{i}}"}}
  - id: think-{{i}}
    kind: agent
    matrix: {{i: [1, 2]}}
    model: m
    instructions: "THINK {{i}}: go"
    outputs: [thought.md]
  - id: merge
    kind: shell
    depends_on: ["gen-*", "square-*", "think-*"]
    run: cat ../*/part.txt > /dev/null; for d in {run_dir}/outputs/*/*; do basename "$d"; done > merged.txt
    outputs: [merged.txt]
"""

TASK_MODULE = """\
import time


def square(x, ctx):
    time.sleep(0.2)
    return {"x": int(x), "square": int(x) ** 2, "rank": ctx.rank}


def boom(x, ctx):
    if ctx.rank == 2:
        raise ValueError(f"no good on rank 2 (x={x})")
    time.sleep(0.3)
    return x
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "mpitasks.py").write_text(TASK_MODULE)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path
