"""The benchmark scripts run (speed is measured by running them, never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmarks, each in a subprocess

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["bench_validate.py", "bench_plan.py"])
def test_bench_script_runs_quick(script: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--repeat", "1", "--runs", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERROR" not in r.stdout
    assert "figure" in r.stdout


@pytest.mark.parametrize("args", [["bench_ledger.py", "--entries", "2000", "--repeat", "1"],
                                  ["bench_report.py", "--entries", "2000"]])
def test_ledger_bench_scripts_run_small(args: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout


@pytest.mark.parametrize("args", [["bench_mpi.py", "--quick", "--runs", "1"]])
def test_mpi_bench_script_runs_quick(args: list[str], tmp_path: Path) -> None:
    import shutil

    pytest.importorskip("mpi4py", reason="the MPI benchmark needs the 'mpi' extra (mpi4py, mpich)")
    if not (shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")):
        pytest.skip("mpiexec not found (pip install mpich)")
    r = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], check=False, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERROR" not in r.stdout
    assert "figure" in r.stdout


def test_scale_bench_runs_quick(tmp_path: Path) -> None:
    """The CI smoke run of the scale benchmark: the 10^4 size, with 10^3 for one growth step."""
    r = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--quick", "--runs", "1"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERROR" not in r.stdout + r.stderr
    assert "\n10,000 no-op python tasks, process pool of 2\n" in r.stdout
    assert "\ngrowth: no-op python tasks, process pool of 2\n" in r.stdout
