"""What a run directory's calls have cost so far, for budgets: cheap enough to ask before every call.

``SpendMeter.refresh`` reads only the bytes added to ``ledger.jsonl`` and to each rank journal since
the last refresh. A call can be in both files (merged, journal not yet removed), so each is counted
once, by id and timestamp (a process id reused within a run can give two calls one id). A file that
was replaced (a journal merged and started again) is read from its start.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cmbagent_batch.ledger.files import journal_paths, ledger_path
from cmbagent_batch.ledger.journal import parse_line

_ID_BYTES = 64  # the first bytes of a file, which name its first entry: a replaced file shows here


@dataclass
class _Cursor:
    """How far a file has been read: up to its last complete line."""

    inode: tuple[int, int] = (0, 0)
    head: bytes = b""
    done: int = 0


class SpendMeter:
    """Spending of a run directory's calls so far: ``total_usd`` and ``task_usd(task)``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.total_usd = 0.0
        self.calls = 0
        self.problems: list[str] = []
        self._tasks: dict[str, float] = {}
        self._seen: set[tuple[str, str]] = set()
        self._cursors: dict[str, _Cursor] = {}

    def task_usd(self, task_id: str) -> float:
        """What the calls of task ``task_id`` (every attempt) have cost so far."""
        return self._tasks.get(task_id, 0.0)

    def refresh(self) -> float:
        """Count the calls written since the last refresh; return ``total_usd``."""
        for path in [ledger_path(self.run_dir), *journal_paths(self.run_dir)]:
            self._read_new(path)
        return self.total_usd

    def _read_new(self, path: str) -> None:
        try:
            with open(path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                cursor = self._cursors.setdefault(path, _Cursor())
                head = fh.read(_ID_BYTES)
                if (stat.st_dev, stat.st_ino) != cursor.inode or head[:len(cursor.head)] != cursor.head \
                        or stat.st_size < cursor.done:
                    cursor.inode, cursor.done = (stat.st_dev, stat.st_ino), 0
                cursor.head = head
                if stat.st_size == cursor.done:
                    return
                fh.seek(cursor.done)
                data = fh.read(stat.st_size - cursor.done)
        except FileNotFoundError:  # a journal removed by merge: its calls are in ledger.jsonl now
            self._cursors.pop(path, None)
            return
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        cursor.done += end
        for line in data[:end].split(b"\n")[:-1]:
            self._count(line, path)

    def _count(self, line: bytes, path: str) -> None:
        entry, problem = parse_line(line)
        try:
            key = (entry["id"], entry["timestamp"])
            cost = float(entry["cost_usd"])
            task = entry["task"]
        except (KeyError, TypeError, ValueError):
            self.problems.append(f"{path}: {problem or 'a line that is not a ledger entry'}")
            return
        if key in self._seen:
            return
        self._seen.add(key)
        self.calls += 1
        self.total_usd += cost
        if task is not None:
            self._tasks[task] = self._tasks.get(task, 0.0) + cost


_meters: dict[str, SpendMeter] = {}
_meters_lock = threading.Lock()


def spent(run_dir: str, task_id: str) -> tuple[float, float]:
    """USD spent so far by the whole job and by one task (all runs), from the ledger files of ``run_dir``:
    one meter per run directory in this process, which reads only what was added since it last looked."""
    with _meters_lock:
        meter = _meters.get(run_dir)
        if meter is None:
            meter = _meters[run_dir] = SpendMeter(run_dir)
        meter.refresh()
        return meter.total_usd, meter.task_usd(task_id)


def budget_problem(job_usd: float | None, task_usd: float | None, job_spent: float, task_spent: float) -> str | None:
    """Why no more LLM calls may start for a task, or None: its job's cap (``job.budget_usd``) or its own
    (``budget_usd``) is reached. Pure: the spending is measured elsewhere."""
    from cmbagent_batch.ledger.costs import budget_spent_message

    if job_usd is not None and job_spent >= job_usd:
        return budget_spent_message("job", job_spent, job_usd)
    if task_usd is not None and task_spent >= task_usd:
        return budget_spent_message("task", task_spent, task_usd)
    return None
