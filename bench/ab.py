"""Two versions side by side (``--against PYTHON`` of bench_run.py and bench_mpi.py).

``Install`` is one cmbagent-batch installation, named by the python of its venv; ``installs`` names this
interpreter's and the other venv's (with the notes saying how they are compared), ``in_turn`` orders each
round of runs between them, and ``versus`` adds the "new vs old" rows (each figure's median for both, and
new / old) under a section, from the figures that ``sample_figures`` and ``rate_figures`` make.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from specgen import CommandFailed, Row, Sample, bench_env, secs


@dataclass(frozen=True)
class Install:
    """A cmbagent-batch installation, named by the python of its venv: runs of ours start it with that
    python, with that venv's ``bin/`` first on PATH (so ``mpiexec`` and the ranks' python are its own)."""

    python: str
    own: bool = True  # this interpreter's; another venv's runs get no PYTHONPATH, so its venv alone decides

    def cli(self) -> list[str]:
        return [self.python, "-m", "cmbagent_batch"]

    def tool(self, name: str) -> str | None:
        return shutil.which(name, path=os.path.dirname(self.python))

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env["PATH"] = os.path.dirname(self.python) + os.pathsep + env.get("PATH", "")
        if not self.own:
            env.pop("PYTHONPATH", None)
        return env

    def describe(self) -> str:
        """``PYTHON (cmbagent-batch X.Y, git DESCRIBE of its source tree when it has one)``; raises
        CommandFailed when that python cannot run cmbagent-batch."""

        def out(*args: str) -> str:
            # cwd: its bin/, so that no cmbagent_batch in the current directory shadows the installed one
            proc = subprocess.run([self.python, *args], capture_output=True, text=True, env=self.env(bench_env()),
                                  cwd=os.path.dirname(self.python), stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise CommandFailed(f"{self.python} {' '.join(args)}\n  exited {proc.returncode}: "
                                    f"{proc.stderr.strip()[-500:]}")
            return proc.stdout.strip()

        version = out("-m", "cmbagent_batch", "--version")
        package, _, url = out("-c", _WHERE).partition("\n")
        for where, how in ((os.path.dirname(os.path.dirname(package)), "in"),
                           (url.removeprefix("file://"), "installed from")):
            git = subprocess.run(["git", "-C", where, "describe", "--always", "--dirty", "--tags"],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if where and git.returncode == 0:
                return f"{self.python} ({version}, git {git.stdout.strip()} {how} {where})"
        return f"{self.python} ({version}, {package})"


# Where a python imports cmbagent_batch from, and the URL pip installed it from (PEP 610), if any.
_WHERE = """
import importlib.metadata as md, json, cmbagent_batch
try:
    url = json.loads(md.distribution("cmbagent_batch").read_text("direct_url.json") or "{}").get("url", "")
except md.PackageNotFoundError:
    url = ""
print(cmbagent_batch.__file__, url, sep="\\n")
"""


def installs(against: str | None) -> tuple[list[Install], list[str]]:
    """This interpreter's install, then the one of ``against`` (another venv's python) when given, and the
    notes naming them and saying how they are compared (none with one install). Exits with a message when
    either cannot run ``cmbagent-batch --version``."""
    ours = Install(sys.executable)
    if against is None:
        return [ours], []
    sides = [ours, Install(os.path.abspath(against), own=False)]
    try:
        names = [side.describe() for side in sides]
    except CommandFailed as exc:
        raise SystemExit(f"--against: {exc}") from None
    return sides, [f"new: {names[0]}", f"old (--against): {names[1]}",
                   "new vs old rows: each measured run of ours made with both installs in turn (the order "
                   "reversed every other round), on the same specs, with fresh run and cache directories each; "
                   "medians; the ratio is new / old (times: below 1 is faster; tasks/s: above 1 is faster)"]


T = TypeVar("T")


def in_turn(sides: Sequence[T], round_no: int) -> Sequence[T]:
    """The installs (or what runs each) in the order of one round of runs: reversed every other round, so
    none always goes first."""
    return sides if round_no % 2 == 0 else sides[::-1]


# A figure's median value and how it prints, by name, for one install.
Figures = dict[str, tuple[float, Callable[[float], str]]]


def versus(rows: list[Row], by_install: Mapping[Install, Figures]) -> None:
    """With two installs: rows giving each figure of the first (new) beside the same figure of the second
    (old) and new / old; nothing with one."""
    if len(by_install) < 2:
        return
    new, old = by_install.values()
    for name, (value, show) in new.items():
        other = old[name][0]
        ratio = f"{value / other:.3f}x" if other and math.isfinite(value) and math.isfinite(other) else "-"
        rows.append(Row(f"new vs old: {name}", show(value), show(other), ratio))


def times(ratio: float) -> str:
    return f"{ratio:.3f}x"


def sample_figures(name: str, sample: Sample) -> Figures:
    """A sample's median wall and CPU seconds as two figures."""
    return {f"{name}: wall": (sample.wall, secs), f"{name}: cpu": (sample.cpu, secs)}


def rate_figures(n: int, whole: Sample, startup: Sample, spans: Sequence[float]) -> Figures:
    """``n`` no-op tasks' figures: start-up (a 1-task run), the whole command, and the rates corrected
    for start-up and while running (over the journal spans)."""
    work = whole.wall - startup.wall

    def rate(tasks_per_s: float) -> str:
        return f"{tasks_per_s:,.0f} tasks/s"

    return {"run 1 task (start-up): wall": (startup.wall, secs), **sample_figures(f"run {n:,} tasks", whole),
            "start-up corrected rate": (n / work if work > 0 else float("inf"), rate),
            "while running rate": (n / statistics.median(spans), rate)}
