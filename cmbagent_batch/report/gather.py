"""What a run report is made of, read from the run directory in one pass: run.json, every line of the state
journals (each attempt, of every run of the job, as a row of compact columns), the journals' index (each
task's state now, as ``status`` counts it) and the ledger (merged, and the ranks' journals not merged yet).

Linear in the journals' lines and light per attempt: a few dozen bytes in arrays, no object per record.
"""

from __future__ import annotations

import glob
import heapq
import math
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from cmbagent_batch.ledger.reader import consume
from cmbagent_batch.ledger.verdict import ChainStatus
from cmbagent_batch.rundir.history import History
from cmbagent_batch.rundir.layout import journal_paths, read_json, runner_gone
from cmbagent_batch.rundir.runview import current_states, run_history
from cmbagent_batch.states import TaskState

STATES = list(TaskState)
CODE = {s.value: i for i, s in enumerate(STATES)}
_RUNNING = CODE["running"]
# An attempt's end: the record that closes its ``running`` record (a retrying record is a failed attempt).
_ENDS = frozenset(CODE[s.value] for s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.RETRYING,
                                          TaskState.INTERRUPTED, TaskState.CANCELLED, TaskState.BUDGET_EXCEEDED))


class Attempts:
    """Every attempt the journals hold, one row each: its task (an index in ``Gathered.ids``), run (an index
    in ``Gathered.runs``), number, rank, host (an index in ``Gathered.hosts``), start and end (epoch seconds;
    nan: still running), how it ended (``STATES`` index), cores and GPUs (of its placement; 1 and 0
    without one), CPU seconds, peak RSS (MB) and its lane among the attempts of its rank that overlap."""

    def __init__(self) -> None:
        self.task = array("i")
        self.run = array("H")
        self.number = array("H")
        self.rank = array("i")
        self.host = array("H")
        self.start = array("d")
        self.end = array("d")
        self.state = bytearray()
        self.cores = array("H")
        self.gpus = array("H")
        self.cpu = array("d")
        self.rss = array("d")
        self.lane = array("H")

    def __len__(self) -> int:
        return len(self.task)

    def add(self, task: int, run: int, number: int, start: float) -> int:
        self.task.append(task)
        self.run.append(run)
        self.number.append(number)
        self.rank.append(0)
        self.host.append(0)
        self.cores.append(1)
        self.gpus.append(0)
        self.lane.append(0)
        self.start.append(start)
        self.end.append(math.nan)
        self.cpu.append(0.0)
        self.rss.append(0.0)
        self.state.append(_RUNNING)
        return len(self.task) - 1


@dataclass
class RunLine:
    """One run of the job (a resumed job has several): when its records start and end, its attempts, the
    tasks it ended by state, the core-seconds of its attempts and its LLM cost."""

    run_id: str
    first: float = math.inf
    last: float = -math.inf
    attempts: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    core_s: float = 0.0
    cost: float = 0.0
    tokens: int = 0


@dataclass
class Failure:
    """A task's last record, for a task that did not succeed: why, and what its record adds."""

    state: str
    reason: str
    root: str | None
    error: str | None
    exit_code: Any
    rank: int
    host: str | None


@dataclass
class Gathered:
    """The run directory, read: see the module's docstring."""

    run_dir: str
    manifest: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    attempts: Attempts = field(default_factory=Attempts)
    lines: dict[str, RunLine] = field(default_factory=dict)
    state: dict[str, TaskState] = field(default_factory=dict)  # each task of the run: its state now
    planned_note: dict[str, str] = field(default_factory=dict)  # a task the run skipped: why
    failures: dict[str, Failure] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)  # ledger entries
    chains: list[ChainStatus] = field(default_factory=list)
    attempt_cost: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (run, task, attempt)
    runner_gone: bool = False
    now: float = 0.0

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id"))

    def task_index(self, tid: str) -> int:
        i = self.pos.get(tid)
        if i is None:
            i = self.pos[tid] = len(self.ids)
            self.ids.append(tid)
        return i

    def this_run(self) -> Iterator[int]:
        """The attempts of the run run.json describes."""
        code = self.runs.index(self.run_id) if self.run_id in self.runs else -1
        return (k for k, r in enumerate(self.attempts.run) if r == code)

    @property
    def started(self) -> float | None:
        return iso_time(self.manifest.get("started"))

    @property
    def ended(self) -> float | None:
        return iso_time(self.manifest.get("ended"))

    def window(self) -> tuple[float, float]:
        """The span of the run run.json describes: from its first journal record to its last (to now, while
        it runs); run.json's start and end when it journaled nothing."""
        line = self.lines.get(self.run_id)
        if line is None:
            start = self.started or self.now
            return start, max(start, self.ended or self.now)
        running = self.manifest.get("status") == "running" and not self.runner_gone
        return line.first, max(line.first, self.now if running else line.last)

    @property
    def makespan(self) -> float:
        """Of the run run.json describes: ``window``'s length."""
        start, end = self.window()
        return end - start


def iso_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def gather(run_dir: str, warn: Callable[[str], None] | None = None) -> Gathered:
    """The run directory ``run_dir`` (it holds a run.json), read."""
    g = Gathered(run_dir, read_json(os.path.join(run_dir, "run.json")), now=time.time())
    g.runner_gone = g.manifest.get("status") == "running" and runner_gone(run_dir)
    seen: dict[tuple[int, int, int], int] = {}  # (task, run, attempt) -> its row
    for path in journal_paths(run_dir):
        _read_journal(g, path, seen)
    _end_to_end(g.attempts)
    _lanes(g.attempts)
    a = g.attempts
    for k in range(len(a)):
        end = g.now if math.isnan(a.end[k]) else a.end[k]
        g.lines[g.runs[a.run[k]]].core_s += (end - a.start[k]) * a.cores[k]
    history = run_history(run_dir, g.manifest, warn)
    try:
        _current(g, history)
    finally:
        history.close()
    _read_ledger(g)
    return g


def _read_journal(g: Gathered, path: str, seen: dict[tuple[int, int, int], int]) -> None:
    """Fold the journal ``path`` in. An attempt's ``running`` record and its end may be in two journals
    (rank 0's, and the worker rank's copy of the end, which stands when rank 0's was lost): the first
    end read counts, a copy is passed over."""
    a = g.attempts
    loads, running, ends = orjson.loads, _RUNNING, _ENDS
    run_code: dict[str, int] = {r: n for n, r in enumerate(g.runs)}
    host_code: dict[str, int] = {h: n for n, h in enumerate(g.hosts)}
    default_host = str(g.manifest.get("host") or "")
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):  # a line still being written
                break
            try:
                r = loads(raw)
            except orjson.JSONDecodeError:
                continue
            if r.__class__ is not dict or (tid := r.get("task")).__class__ is not str:
                continue
            code = CODE.get(r.get("state"), -1)  # type: ignore[arg-type]
            run = r.get("run") or ""
            rc = run_code.get(run)
            if rc is None:
                rc = run_code[run] = len(g.runs)
                g.runs.append(run)
                g.lines[run] = RunLine(run)
            line = g.lines[run]
            t = r.get("t") or 0.0
            if t < line.first:
                line.first = t
            if t > line.last:
                line.last = t
            task = g.pos.get(tid)
            if task is None:
                task = g.task_index(tid)
            number = r.get("attempt") or 0
            key = (task, rc, number)
            k = seen.get(key, -1) if number else -1
            if code == running:
                if k < 0:
                    k = seen[key] = a.add(task, rc, number, t)
                    line.attempts += 1
                elif not math.isnan(a.end[k]):  # its end was read first (another journal)
                    a.start[k] = min(t, a.end[k])
                    continue
            elif code in ends and (k >= 0 or "wall_s" in r):
                wall = float(r.get("wall_s") or 0.0)
                if k >= 0 and not math.isnan(a.end[k]):  # a copy of an end already read
                    if wall and r.get("by") == "worker":  # the worker's own: when the attempt itself ran
                        a.start[k], a.end[k] = t - wall, t
                    continue
                if k < 0:  # its start was not journaled (yet): from its wall time
                    k = seen[key] = a.add(task, rc, number, t - wall)
                    line.attempts += 1
                a.end[k] = max(t, a.start[k])
                if wall:  # ``running`` is when it was handed over (a batch's: its first's start); this, its own
                    a.start[k] = max(a.start[k], a.end[k] - wall)
                a.state[k] = code
                a.cpu[k] = float(r.get("cpu_s") or 0.0)
                a.rss[k] = float(r.get("peak_rss_mb") or 0.0)
            else:
                k = -1
            if code != running and code >= 0 and code != CODE["retrying"]:
                line.ended[STATES[code].value] = line.ended.get(STATES[code].value, 0) + 1
            if k < 0:
                continue
            if (rank := r.get("rank")).__class__ is int and rank >= 0:
                a.rank[k] = rank
            host = r.get("host") or default_host
            hc = host_code.get(host)
            if hc is None:
                hc = host_code[host] = len(g.hosts)
                g.hosts.append(host)
            a.host[k] = hc
            placement = r.get("placement")
            if placement.__class__ is dict:
                a.cores[k] = max(1, sum(_count(c) for c in placement.get("cores") or []))
                a.gpus[k] = sum(len(x) for x in placement.get("gpus") or [] if isinstance(x, list))


def _count(ranges: Any) -> int:
    """CPUs in a placement's compact ranges (``"0-3,8"``)."""
    if isinstance(ranges, int):
        return 1
    if not isinstance(ranges, str):
        return len(ranges) if isinstance(ranges, list) else 0
    n = 0
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if lo.strip().isdigit():
            n += int(hi) - int(lo) + 1 if hi.strip().isdigit() else 1
    return n


TOGETHER_S = 0.001  # ends of one rank journaled this close together: a batch's, journaled as it ended


def _end_to_end(a: Attempts) -> None:
    """A worker journals the ends of a batch's attempts together, after the last of them, though it ran
    them one after the other: each attempt's bar (its end less its wall time) would then stack on the
    others at the batch's end. Ends of one rank journaled within ``TOGETHER_S`` of each other whose bars
    overlap are laid end to end, the last ending at its record's time, each keeping its length."""
    order = sorted((k for k in range(len(a)) if not math.isnan(a.end[k])), key=lambda k: (a.rank[k], a.end[k]))
    group: list[int] = []
    for k in [*order, -1]:
        last = group[-1] if group else -1
        if k >= 0 and last >= 0 and a.rank[k] == a.rank[last] and a.end[k] - a.end[last] <= TOGETHER_S \
                and a.start[k] < a.end[last]:
            group.append(k)
            continue
        if len(group) > 1:
            end = a.end[group[-1]]
            for m in reversed(group):
                length = a.end[m] - a.start[m]
                a.start[m], a.end[m] = end - length, end
                end -= length
        group = [k]


def _lanes(a: Attempts) -> None:
    """Give each attempt the first lane of its rank free at its start (greedy, by start time)."""
    order = sorted(range(len(a)), key=lambda k: (a.rank[k], a.start[k]))
    rank, used = None, 0
    free: list[tuple[float, int]] = []  # (end, lane) of the rank's lanes
    for k in order:
        if a.rank[k] != rank:
            rank, used = a.rank[k], 0
            free = []
        start = a.start[k]
        if free and free[0][0] <= start:
            _, lane = heapq.heappop(free)
        else:
            lane, used = used, used + 1
        a.lane[k] = lane
        end = a.end[k]
        heapq.heappush(free, (math.inf if math.isnan(end) else end, lane))


def _current(g: Gathered, history: History) -> None:
    """Each task of the run and its state in it (as run.json counts it: its record in the run, else the
    state the run gave it as it started, skipped or pending); the last record of each that did not
    succeed; why the run skipped those it skipped."""
    troubled = {TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.INTERRUPTED, TaskState.CANCELLED,
                TaskState.BUDGET_EXCEEDED}
    for i, _ in current_states(history, g.runner_gone):
        tid = history.ids[i]
        ran = history.in_run(i)
        state = (history.state_of(i) if ran else None) or history.planned_of(i) or TaskState.PENDING
        if g.runner_gone and state is TaskState.RUNNING:
            state = TaskState.INTERRUPTED
        g.state[tid] = state
        if not ran and history.notes[history.note[i]]:
            g.planned_note[tid] = history.notes[history.note[i]]
        if state in troubled:
            r = history.record(i) if ran else {}
            rank = r.get("rank")
            g.failures[tid] = Failure(state.value, str(r.get("reason") or r.get("error") or g.planned_note.get(tid, "")),
                                      r.get("root") if isinstance(r.get("root"), str) else None,
                                      r.get("error") if isinstance(r.get("error"), str) else None, r.get("exit_code"),
                                      rank if isinstance(rank, int) else 0, r.get("host") or g.manifest.get("host"))


def _read_ledger(g: Gathered) -> None:
    """The ledger's entries: the merged ledger and the ranks' journals not merged yet (during a run)."""
    merged = os.path.join(g.run_dir, "ledger.jsonl")
    entries = g.entries
    if os.path.isfile(merged):
        g.chains = consume([merged], entries.extend, verify=True)
    consume(sorted(glob.glob(os.path.join(g.run_dir, "ledger", "rank-*.jsonl"))), entries.extend)
    for e in entries:
        cost = float(e.get("cost_usd") or 0.0)
        run = str(e.get("run_id") or "")
        if run in g.lines:
            g.lines[run].cost += cost
            g.lines[run].tokens += int(e.get("prompt_tokens") or 0) + int(e.get("completion_tokens") or 0)
        key = (run, str(e.get("task")), int(e.get("attempt") or 0))
        g.attempt_cost[key] = g.attempt_cost.get(key, 0.0) + cost
