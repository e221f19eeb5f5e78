"""Running the command line as users do: ``python -m cmbagent_batch ...`` in a subprocess, in a clean
environment (``HOME`` in the test's tmp_path, no ``CMBAGENT_*`` variables), in the foreground or in the
background."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

COMMAND = (sys.executable, "-m", "cmbagent_batch")


def clean_env(tmp_path: Path, *, home: Path | None = None, drop: Sequence[str] = ("CMBAGENT_",),
              **extra: str) -> dict[str, str]:
    """This process's environment without the variables whose names start with one of ``drop`` (nor
    ``PYTHONWARNINGS``), ``HOME`` at ``home`` (default ``tmp_path/home``, made if missing), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
    env.pop("PYTHONWARNINGS", None)
    if home is None:
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def cli(cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120, check: bool = False,
        launcher: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m cmbagent_batch ARGS`` run to its end in ``cwd``, its output captured as text.

    ``env`` defaults to ``clean_env(cwd)``; ``launcher`` goes before the interpreter (``mpiexec -n 3``);
    ``timeout`` only guards against a hang; ``check`` asserts exit code 0, showing stderr if not."""
    result = subprocess.run([*launcher, *COMMAND, *args], cwd=cwd, env=dict(env) if env is not None else clean_env(cwd),
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


class Runner:
    """A ``run`` in the background (its own session, so a signal we send reaches only it)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.out = tmp_path / f"runner-{time.monotonic_ns()}.out"
        self.err = self.out.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([*COMMAND, "run", *args], cwd=tmp_path, env=clean_env(tmp_path), stdout=out,
                                         stderr=err, start_new_session=True)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_until(what: str, predicate: Callable[[], object], runner: Runner | None = None, limit: float = 60) -> None:
    """Poll ``predicate`` until it holds; fail if ``runner`` ends first, or after ``limit`` s (a hang)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if runner is not None and runner.proc.poll() is not None:
            raise AssertionError(f"the run ended ({runner.proc.returncode}) before {what}: {runner.stderr()}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def write_spec(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def q(path: Path) -> str:
    return shlex.quote(str(path))


def journal(run_dir: Path) -> list[dict[str, Any]]:
    """Rank 0's run journal, without a torn last line."""
    path = run_dir / "journal" / "rank-0000.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
