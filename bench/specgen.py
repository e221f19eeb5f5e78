"""What bench_validate.py and bench_plan.py share: the generated job specs, and how a command is timed.

Generators return YAML text; the sizes come from the caller (``--quick`` shrinks them ~10x).

* ``matrix_spec(a, b)``: one matrix entry of ``a * b`` shell tasks ``sim-{a}-{b}``, each writing
  ``out_{a}_{b}.txt``, plus one ``combine`` task reading ``out_*.txt`` (so ``a * b`` file edges).
* ``literal_spec(n)``: ``n`` tasks written out one by one (id, kind, run, outputs, and depends_on the
  previous task; the first one has a description instead): a chain of ``n``.

Timing: each measured command runs under a tiny wrapper interpreter that times the command itself
(``time.perf_counter`` around ``subprocess.run``) and reports the command's own peak RSS (its
``RUSAGE_CHILDREN`` maxrss, the command being the wrapper's only child) and CPU time, so neither the
wrapper's start-up nor the benchmark process's memory counts. The targets are on wall time; the CPU
column is there because on a busy machine wall time also counts the wait for a free core. The command's stdout goes to /dev/null (or a
file, when asked) so terminal speed does not count.

The "new vs old" comparison of two installs (``--against PYTHON``) is in ab.py.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Spec generators


def matrix_spec(n_a: int, n_b: int) -> str:
    """A spec whose single matrix entry expands to ``n_a * n_b`` tasks, plus one task reading them all."""
    a = ", ".join(str(i) for i in range(n_a))
    b = ", ".join(str(i) for i in range(n_b))
    return f"""\
version: 1
job:
  name: bench-matrix
tasks:
  - id: sim-{{a}}-{{b}}
    kind: shell
    description: One simulation per (a, b).
    run: python sim.py --a {{a}} --b {{b}} > out_{{a}}_{{b}}.txt
    outputs: ["out_{{a}}_{{b}}.txt"]
    matrix:
      a: [{a}]
      b: [{b}]

  - id: combine
    kind: shell
    description: Concatenate every simulation's output.
    run: cat out_*.txt > all.txt
    inputs: ["out_*.txt"]
    outputs: [all.txt]
"""


def literal_spec(n: int) -> str:
    """A spec listing ``n`` tasks literally, ~5 fields each, each depending on the previous one."""
    parts = ["version: 1\njob:\n  name: bench-literal\ntasks:\n"]
    for i in range(n):
        tid = f"t{i:06d}"
        link = f"    depends_on: [t{i - 1:06d}]\n" if i else "    description: The first task of the chain.\n"
        parts.append(
            f"  - id: {tid}\n"
            f"    kind: shell\n"
            f"    run: echo {i} > out_{tid}.txt\n"
            f"    outputs: [out_{tid}.txt]\n"
            f"{link}"
        )
    return "".join(parts)


def write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


# ---------------------------------------------------------------------------------------------------
# Measuring commands

_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
rc = subprocess.run(cmd).returncode
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as fh:
    json.dump({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss}, fh)
"""
# ru_maxrss is in KiB on Linux, in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


class CommandFailed(Exception):
    """A measured command exited with an unexpected code: the benchmark itself is broken."""


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds
    peak_rss: int  # bytes


@dataclass
class Sample:
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # user + system seconds of the command
    peak_rss: int = 0  # bytes, the highest over the runs

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def add(self, run: Run) -> None:
        self.walls.append(run.wall)
        self.cpus.append(run.cpu)
        self.peak_rss = max(self.peak_rss, run.peak_rss)

    def runs(self) -> str:
        return f"median of {len(self.walls)}" if len(self.walls) > 1 else "1 run"


def bench_env() -> dict[str, str]:
    """This process's environment without CMBAGENT_* settings, so the spec alone decides the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CMBAGENT_")}


def run_once(cmd: Sequence[str], *, cwd: str, env: dict[str, str], expect: int = 0,
             stdout_path: str | None = None) -> Run:
    """Run ``cmd`` once under the wrapper; return the wall time, CPU time and peak RSS of ``cmd`` alone."""
    result, stderr = _wrapped([_WRAPPER], cmd, cwd, env, stdout_path)
    return _checked(result, stderr, cmd, expect)


def _wrapped(wrapper: Sequence[str], cmd: Sequence[str], cwd: str, env: dict[str, str],
             stdout_path: str | None) -> tuple[dict[str, Any] | None, bytes]:
    """Run ``cmd`` under ``wrapper`` (its code, then its own arguments; the report's path goes first); the
    report (None when there is none) and ``cmd``'s stderr."""
    fd, report = tempfile.mkstemp(prefix="bench-", suffix=".json", dir=cwd)
    os.close(fd)
    stderr = b""
    try:
        with open(stdout_path or os.devnull, "wb") as out:
            proc = subprocess.run([sys.executable, "-I", "-S", "-c", wrapper[0], report, *wrapper[1:], *cmd], cwd=cwd,
                                  env=env, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        stderr = proc.stderr
        with open(report, encoding="utf-8") as fh:
            result = json.load(fh) if proc.returncode == 0 else None
    except (OSError, ValueError):
        result = None
    finally:
        os.unlink(report)
    return result, stderr


def _checked(result: dict[str, Any] | None, stderr: bytes, cmd: Sequence[str], expect: int | None) -> Run:
    """The measures of a wrapped run, or ``CommandFailed`` when it did not exit as ``expect`` says (None:
    any exit code)."""
    if result is None or (expect is not None and result["rc"] != expect):
        rc = "?" if result is None else result["rc"]
        tail = stderr.decode(errors="replace")[-2000:]
        raise CommandFailed(f"{' '.join(cmd)}\n  exited {rc}, expected {expect}; stderr ends with:\n{tail}")
    return Run(result["wall"], result["cpu"], result["maxrss"] * _RSS_UNIT)


def measure(cmd: Sequence[str], *, repeat: int, cwd: str, env: dict[str, str], warmup: bool = False,
            expect: int = 0) -> Sample:
    """Median wall time over ``repeat`` runs of ``cmd`` and the highest peak RSS seen."""
    if warmup:  # compiles .pyc files and fills the page cache; not counted
        run_once(cmd, cwd=cwd, env=env, expect=expect)
    sample = Sample()
    for _ in range(repeat):
        sample.add(run_once(cmd, cwd=cwd, env=env, expect=expect))
    return sample


def cli() -> list[str]:
    """How to run cmbagent-batch with this interpreter."""
    return [sys.executable, "-m", "cmbagent_batch"]


def console_script() -> str | None:
    """The ``cmbagent-batch`` script installed next to this interpreter, if there is one."""
    path = os.path.join(os.path.dirname(sys.executable), "cmbagent-batch")
    return path if os.access(path, os.X_OK) else None


# ---------------------------------------------------------------------------------------------------
# The report table


@dataclass
class Row:
    figure: str
    measured: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    verdict: str = "-"  # PASS, FAIL, ERROR or "-" (for context only)
    cpu: str = ""  # CPU seconds of measured / of baseline: less sensitive than wall time to a busy machine


def secs(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def cpu_cell(measured: Sample, baseline: Sample | None = None) -> str:
    """CPU seconds of both and their ratio; wall time on a loaded machine includes waiting for a core."""
    if baseline is None:
        return f"{measured.cpu:.3f} s"
    return f"{measured.cpu:.3f} / {baseline.cpu:.3f} s = {measured.cpu / max(baseline.cpu, 1e-9):.2f}x"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(title: str, rows: list[Row], notes: list[str]) -> None:
    header = Row("figure", "measured", "baseline", "ratio", "target", "result", "cpu: measured / baseline")
    cells = [[r.figure, r.measured, r.baseline, r.ratio, r.target, r.verdict, r.cpu] for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(7)]
    print(f"\n{title}")
    for n, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for note in notes:
        print(f"  * {note}")


Section = tuple[str, list[Row], list[str]]
Step = Callable[[list[Row], list[str]], None]


IO_PRESSURE = "/proc/pressure/io"
SETTLED_IO = 2.0  # % of the last 10 s some task waited for the disk, below which it counts as settled
SETTLE_LIMIT_S = 120.0


def io_pressure() -> float | None:
    """Linux's 'some avg10' IO pressure (% of the last 10 s in which a task waited for IO); None without PSI."""
    try:
        with open(IO_PRESSURE, encoding="ascii") as fh:
            first = fh.readline().split()
    except OSError:
        return None
    return float(first[1].partition("=")[2])


def settle() -> str | None:
    """Write back what earlier parts left dirty (``sync``) and wait, at most ``SETTLE_LIMIT_S``, until the
    disk is quiet, so that one part's writeback does not run during the next part's timings; a note
    saying how long that took, or None when there was nothing to wait for."""
    start = time.monotonic()
    os.sync()
    pressure = before = io_pressure()
    while pressure is not None and pressure > SETTLED_IO and time.monotonic() - start < SETTLE_LIMIT_S:
        time.sleep(1.0)
        pressure = io_pressure()
    waited = time.monotonic() - start
    if waited < 1.0:
        return None
    state = "" if before is None else f" (IO pressure {before:.0f}% after the sync, {pressure:.0f}% at the end)"
    return f"before this part: {waited:.0f} s to write back the earlier parts' files and let the disk settle{state}"


def run_sections(steps: Mapping[str, tuple[str, Step]], chosen: Sequence[str] | None, *, settled: bool = True
                 ) -> tuple[list[Section], list[str]]:
    """Run the chosen figures' steps (all when ``chosen`` is empty) in order, each after the disk has
    settled (``settle``) unless not ``settled`` (a smoke run); a failed command is an ERROR row in its
    section and a message in the list returned with the sections."""
    sections: list[Section] = []
    failed: list[str] = []
    for name, (title, step) in steps.items():
        if chosen and name not in chosen:
            continue
        rows: list[Row] = []
        notes: list[str] = [note] if settled and sections and (note := settle()) is not None else []
        try:
            step(rows, notes)
        except CommandFailed as exc:
            rows.append(Row("command failed", "-", verdict="ERROR"))
            failed.append(str(exc))
        sections.append((title, rows, notes))
    return sections, failed


def report(heading: str, sections: list[Section], failed: list[str], closing_notes: Sequence[str]) -> int:
    """Print the sections (``closing_notes`` under the last one) and the errors; the exit status."""
    sections[-1][2].extend(closing_notes)
    print(heading)
    for title, rows, notes in sections:
        print_table(title, rows, notes)
    for message in failed:
        print(f"\nERROR: {message}", file=sys.stderr)
    return 1 if failed else 0


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return f"{os.cpu_count()} cores"
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min) at the end of the run"


class TempDir:
    """``tempfile.mkdtemp`` removed on exit, even after an error or Ctrl-C."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="cmbagent-bench-")
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Commands that may not end, and what a run directory holds

_LIMITED_WRAPPER = r"""
import json, os, resource, signal, subprocess, sys, time
out, limit, grace, cmd = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
t0 = time.perf_counter()
proc = subprocess.Popen(cmd, start_new_session=True)
try:
    rc = proc.wait(limit)
except subprocess.TimeoutExpired:
    rc = None
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as fh:
    json.dump({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss}, fh)
"""
KILL_GRACE_S = 60.0  # after SIGTERM at the time limit, before SIGKILL


def run_limited(cmd: Sequence[str], *, cwd: str, env: dict[str, str], limit: float, expect: int | None = 0,
                stdout_path: str | None = None) -> Run | None:
    """``run_once`` with a time limit: None when ``cmd`` ran longer than ``limit`` seconds (its process
    group then gets SIGTERM, and SIGKILL ``KILL_GRACE_S`` later). ``expect=None`` accepts any exit code."""
    result, stderr = _wrapped([_LIMITED_WRAPPER, str(limit), str(KILL_GRACE_S)], cmd, cwd, env, stdout_path)
    if result is not None and result["rc"] is None:
        return None
    return _checked(result, stderr, cmd, expect)


@dataclass(frozen=True)
class Census:
    """What a directory tree costs a file system: its inodes, bytes and fullest directory."""

    inodes: int  # distinct inodes below the root (the root itself not counted; hard links count once)
    bytes: int  # apparent size of its regular files
    largest: int  # entries of its fullest directory (the root included)
    largest_path: str  # that directory, relative to the root


def census(root: str) -> Census:
    """Walk ``root`` (without following symbolic links) and count what it holds."""
    inodes: set[tuple[int, int]] = set()
    size = largest = 0
    largest_path = "."
    stack = [root]
    while stack:
        directory = stack.pop()
        entries = 0
        with os.scandir(directory) as it:
            for entry in it:
                entries += 1
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in inodes:
                    continue
                inodes.add((st.st_dev, st.st_ino))
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size += st.st_size
        if entries > largest:
            largest, largest_path = entries, os.path.relpath(directory, root)
    return Census(len(inodes), size, largest, largest_path)


def tree_bytes(path: str) -> int | None:
    """Apparent size of the file ``path``, or of the regular files below the directory; None if absent."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return census(path).bytes if os.path.isdir(path) else None
