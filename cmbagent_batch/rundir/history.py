"""What the state journals say of every task, held compactly, and the index that keeps it.

The journals (``journal/rank-NNNN.jsonl``: one line per state change, appended, safe against a SIGKILL
and a full disk) are the store of per-task detail. Reading them is what grows with the job, so
``History`` folds them into arrays by task position: a few dozen bytes a task (its last state, attempts,
time, wall time, rank, fingerprint, and where its last record is, read again only when its details are
asked for). ``journal/index`` keeps that fold: the run writes it, atomically, as it starts and as it
ends, with the bytes of each journal it covers, so a reader parses only what was appended since (after
a SIGKILL: the killed run's lines). The index also holds the run's table: the tasks of the run that
wrote it and how it planned each (pending, or skipped and why). An index that does not match the
journals (one shorter than it covers, a format this version does not read) is said and not used: the
journals are read in full.

The success records name the set of code files behind their task by a key (see ``plan/fingerprint.py``):
the index keeps each set, the short hash of each of its files, by its digest (``code_sets``). The run
that first journals a set writes it into the index as it starts, before any record refers to it.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, cast

import orjson

from cmbagent_batch.rundir.atomic import atomic_output
from cmbagent_batch.states import DONE_STATES, TaskState

__all__ = ["INDEX", "History", "TaskHistory", "load_history"]

INDEX = "index"  # RUN_DIR/journal/index
_FORMAT = 1
_STATES = list(TaskState)
_CODE = {s: i for i, s in enumerate(_STATES)}
_BY_VALUE = {s.value: i for i, s in enumerate(_STATES)}
NONE = 255  # no record (state), not in the run (planned)
_RUNNING = _CODE[TaskState.RUNNING]
_INTERRUPTED = _CODE[TaskState.INTERRUPTED]
_ENDS = frozenset({_CODE[TaskState.SUCCEEDED], _CODE[TaskState.FAILED]})
_DONE = frozenset(_CODE[s] for s in DONE_STATES)
_FP = 32  # bytes of a fingerprint (a sha256 in hex in the records)
_ZERO_FP = bytes(_FP)

# The columns (arrays, and bytearrays of a byte a task), in the index's order; the fingerprints follow.
_COLUMNS = ("state", "attempts", "attempt", "run", "t", "wall", "rank", "file", "offset", "planned", "note")
_EMPTY: dict[str, Any] = {"state": NONE, "wall": math.nan, "rank": -1, "planned": NONE}  # a task added, in a column (else 0)


class StaleIndex(Exception):
    """The index does not describe the journals beside it."""


class TaskHistory:
    """What the journals say of one task: its last state, its attempts (the highest journaled), and its
    last record (read from the journal when first asked for)."""

    __slots__ = ("_history", "_position", "_record", "attempts", "state")

    def __init__(self, state: TaskState, attempts: int, record: dict[str, Any] | None = None,
                 history: History | None = None, position: int = -1) -> None:
        self.state = state
        self.attempts = attempts
        self._record = record
        self._history = history
        self._position = position

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            assert self._history is not None
            self._record = self._history.record(self._position)
        return self._record

    @property
    def fp(self) -> str | None:
        """The fingerprint its last record journaled, if any."""
        if self._history is None:
            value = self.record.get("fp")
            return value if isinstance(value, str) else None
        return self._history.fp_of(self._position)

    @property
    def t(self) -> float:
        return self._history.t[self._position] if self._history is not None else float(self.record.get("t") or 0.0)


class History:
    """Every task's history, by position (``ids[i]``), with the run table of the index it came from."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._pos: dict[str, int] = {}
        self.state = bytearray()
        self.attempts = array("I")  # the highest attempt journaled
        self.attempt = array("I")  # the attempt of the last record
        self.run = array("H")  # the run of the last record: an index in ``runs``
        self.t = array("d")
        self.wall = array("d")  # nan: not measured
        self.rank = array("i")  # -1: not said
        self.file = array("H")  # where the last record is: an index in ``files`` ...
        self.offset = array("q")  # ... and its byte offset there
        self.planned = bytearray()  # the run table: NONE (not in the run) or the state the run gave it
        self.note = bytearray()  # why the run did not run it: an index in ``notes``
        self.fps = bytearray()  # _FP bytes a task, zero: none
        self.runs: list[str] = []
        self.files: list[str] = []  # journal file names (in RUN_DIR/journal)
        self.notes: list[str] = [""]
        self.covered: dict[str, int] = {}  # journal file name -> bytes folded in
        self.code_sets: dict[str, dict[str, str]] = {}  # the sets of code files records name: digest -> hashes
        self._code_keys: dict[str, dict[str, str]] = {}  # code_sets by the prefix of their digest that records keep
        self._code_keys_of = (0, 0)  # the length of that prefix, the number of sets
        self.run_id: str | None = None  # the run whose table this is
        self.journal_dir = ""
        self._readers: dict[int, IO[bytes]] = {}
        self._run_codes: dict[str, int] = {}
        self._last_run: Any = None  # the run of the last record folded, and its code: records come in runs
        self._last_code = 0

    # --- reading ------------------------------------------------------------------------------------

    def position(self, task_id: str) -> int | None:
        if len(self._pos) != len(self.ids):
            self._pos = dict(zip(self.ids, range(len(self.ids))))
        return self._pos.get(task_id)

    def not_done_with(self, values: Iterable[tuple[str, bytes]]) -> Iterator[str]:
        """The tasks of ``values`` (id, fingerprint as bytes) whose last record is not one of a done state
        (succeeded, skipped) with that fingerprint."""
        self.position("")  # the map of positions is up to date
        position, state, fps, done = self._pos.get, self.state, self.fps, _DONE
        for tid, raw in values:
            i = position(tid)
            if i is None or state[i] not in done or fps[i * _FP:(i + 1) * _FP] != raw:
                yield tid

    def code_files(self, key: str) -> dict[str, str] | None:
        """The hashes of the set of code files whose digest starts with ``key``, if the index keeps it."""
        if self._code_keys_of != (len(key), len(self.code_sets)):
            self._code_keys = {k[:len(key)]: v for k, v in self.code_sets.items()}
            self._code_keys_of = (len(key), len(self.code_sets))
        return self._code_keys.get(key) if key else None

    def get(self, task_id: str) -> TaskHistory | None:
        """The task's journaled history, or None when no journal speaks of it."""
        i = self.position(task_id)
        if i is None or self.state[i] == NONE:
            return None
        return TaskHistory(_STATES[self.state[i]], self.attempts[i], history=self, position=i)

    def __getitem__(self, task_id: str) -> TaskHistory:
        found = self.get(task_id)
        if found is None:
            raise KeyError(task_id)
        return found

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and self.get(task_id) is not None

    def __len__(self) -> int:
        return len(self.ids) - self.state.count(NONE)

    def items(self) -> Iterator[tuple[str, TaskHistory]]:
        for i, tid in enumerate(self.ids):
            if self.state[i] != NONE:
                yield tid, TaskHistory(_STATES[self.state[i]], self.attempts[i], history=self, position=i)

    def state_of(self, i: int) -> TaskState | None:
        return None if self.state[i] == NONE else _STATES[self.state[i]]

    def planned_of(self, i: int) -> TaskState | None:
        return None if self.planned[i] == NONE else _STATES[self.planned[i]]

    def fp_of(self, i: int) -> str | None:
        raw = bytes(self.fps[i * _FP:(i + 1) * _FP])
        return None if raw == _ZERO_FP else raw.hex()

    def wall_of(self, i: int) -> float | None:
        w = self.wall[i]
        return None if math.isnan(w) else w

    def in_run(self, i: int) -> bool:
        """Whether the task's last record is of the run whose table this is."""
        return self.state[i] != NONE and self.run_id is not None and self.runs[self.run[i]] == self.run_id

    def record(self, i: int) -> dict[str, Any]:
        """The task's last record, read from its journal ({} when it has none or it cannot be read)."""
        if self.state[i] == NONE:
            return {}
        f = self.file[i]
        fh = self._readers.get(f)
        try:
            if fh is None:
                fh = self._readers[f] = open(os.path.join(self.journal_dir, self.files[f]), "rb")  # noqa: SIM115
            fh.seek(self.offset[i])
            value = orjson.loads(fh.readline())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def close(self) -> None:
        for fh in self._readers.values():
            fh.close()
        self._readers.clear()

    # --- folding records ----------------------------------------------------------------------------

    def add(self, task_id: str) -> int:
        """The position of ``task_id``, added (with no record, not in the run) if new."""
        i = self.position(task_id)
        if i is not None:
            return i
        i = len(self.ids)
        self.ids.append(task_id)
        self._pos[task_id] = i
        self.state.append(NONE)
        self.planned.append(NONE)
        for column in (self.note, self.attempts, self.attempt, self.run, self.file, self.offset, self.t):
            column.append(0)
        self.wall.append(math.nan)
        self.rank.append(-1)
        self.fps.extend(_ZERO_FP)
        return i

    def _extend(self, new: list[str]) -> list[int]:
        """``add`` for every task of ``new`` (none of them here yet, none twice), a column at a time."""
        start, n = len(self.ids), len(new)
        self.ids.extend(new)
        self._pos.update(zip(new, range(start, start + n)))
        for name in _COLUMNS:
            column, empty = getattr(self, name), [_EMPTY.get(name, 0)]
            column.extend((bytes(empty) if isinstance(column, bytearray) else array(column.typecode, empty)) * n)
        self.fps.extend(bytes(n * _FP))
        return list(range(start, start + n))

    def fold(self, r: dict[str, Any], file: int, offset: int) -> None:
        """Take record ``r`` (at ``offset`` in journal ``file``) into its task's history. The last record
        by time stamp is the task's state, but for an attempt's end and its ``running`` record, which
        may be stamped out of order by two ranks' clocks: the end stands. (Run once per journal line:
        written for speed.)"""
        tid = r.get("task")
        if tid.__class__ is not str:
            return
        i = self._pos.get(tid)
        if i is None:
            i = self.add(tid)
        code = _BY_VALUE.get(r.get("state"), _INTERRUPTED)  # type: ignore[arg-type]  # a newer version's: not done
        t = r.get("t") or 0.0
        attempt = r.get("attempt") or 0
        run = r.get("run")
        if run == self._last_run:
            run_code = self._last_code
        else:
            run_code = self._last_code = self._run_code(run)
            self._last_run = run
        if attempt > self.attempts[i]:
            self.attempts[i] = attempt
        cur = self.state[i]
        if cur != NONE:
            same = self.run[i] == run_code and self.attempt[i] == attempt
            if same and code == _RUNNING and cur in _ENDS:
                return
            if t < self.t[i] and not (same and cur == _RUNNING and code in _ENDS):
                return
        self.state[i] = code
        self.attempt[i] = attempt
        self.run[i] = run_code
        self.t[i] = t
        wall = r.get("wall_s")
        self.wall[i] = wall if wall.__class__ is float or wall.__class__ is int else math.nan
        rank = r.get("rank")
        self.rank[i] = rank if rank.__class__ is int else -1
        self.file[i] = file
        self.offset[i] = offset
        fp = r.get("fp")
        if fp is not None or cur in _ENDS:
            try:
                raw = bytes.fromhex(fp) if fp.__class__ is str and len(fp) == 2 * _FP else _ZERO_FP
            except ValueError:
                raw = _ZERO_FP
            self.fps[i * _FP:(i + 1) * _FP] = raw

    def _run_code(self, run: Any) -> int:
        key = run if isinstance(run, str) else ""
        code = self._run_codes.get(key)
        if code is None:
            if len(self._run_codes) != len(self.runs):
                self._run_codes = {r: n for n, r in enumerate(self.runs)}
                code = self._run_codes.get(key)
            if code is None:
                code = self._run_codes[key] = len(self.runs)
                self.runs.append(key)
        return code

    def read_tails(self, paths: Iterable[str], warn: Callable[[str], None] | None = None) -> None:
        """Fold in what the journals ``paths`` hold beyond what this history covers; ``StaleIndex`` when
        one of them is shorter than that."""
        for path in paths:
            name = os.path.basename(path)
            if name not in self.files:
                self.files.append(name)
            file = self.files.index(name)
            start = self.covered.get(name, 0)
            try:
                fh = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                if start:
                    raise StaleIndex(f"{path} is missing") from None
                continue
            with fh:
                size = os.fstat(fh.fileno()).st_size
                if size < start:
                    raise StaleIndex(f"{path} holds {size} bytes, fewer than the {start} it covers")
                fh.seek(start)
                offset = start
                number = None  # line numbers are counted only to report a bad line
                for raw in fh:
                    if not raw.endswith(b"\n"):  # a line still being written, or torn by a kill
                        if warn is not None:
                            warn(f"{path}:{number or _line_number(path, offset)}: torn last line skipped")
                        break
                    try:
                        record = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        record = None
                    if isinstance(record, dict):
                        self.fold(record, file, offset)
                    elif warn is not None:
                        number = number or _line_number(path, offset)
                        warn(f"{path}:{number}: corrupt line skipped")
                    offset += len(raw)
                    if number is not None:
                        number += 1
                self.covered[name] = offset

    # --- the run table ------------------------------------------------------------------------------

    def plan_run(self, run_id: str, planned: Iterable[tuple[Iterable[str], TaskState, str]]) -> None:
        """Make this the table of run ``run_id``: its tasks, in groups, each with the state its tasks start
        in and why they do not run (empty when they do)."""
        self.run_id = run_id
        self.planned[:] = bytes([NONE]) * len(self.ids)
        self.note[:] = bytes(len(self.ids))
        self.position("")  # the map of positions is up to date
        table, notes = self.planned, self.note
        for ids, state, why in planned:
            listed = list(ids)
            found = list(map(self._pos.get, listed))
            new = found.count(None)  # all of them, distinct: a first run's tasks, added a column at a time
            positions = (cast("list[int]", found) if not new else self._extend(listed)
                         if new == len(found) == len(set(listed)) else [self.add(tid) for tid in listed])
            if positions and why not in self.notes:
                self.notes.append(why)
            code, note = _CODE[state], self.notes.index(why) if positions else 0
            if len(positions) == len(self.ids):  # every task (ids are distinct): the whole columns
                table[:], notes[:] = bytes([code]) * len(positions), bytes([note]) * len(positions)
                continue
            for i in positions:
                table[i] = code
                notes[i] = note

    def run_tasks(self) -> Iterator[int]:
        """The positions of the run's tasks."""
        planned = self.planned
        return (i for i in range(len(self.ids)) if planned[i] != NONE)

    # --- the index ----------------------------------------------------------------------------------

    def write_index(self, journal_dir: str) -> None:
        """Keep this history (with its run table) as ``journal_dir/index``, atomically."""
        ids = "\n".join(self.ids).encode("utf-8")
        columns = [getattr(self, name) for name in _COLUMNS] + [self.fps]
        header = {"format": _FORMAT, "tasks": len(self.ids), "covered": self.covered, "files": self.files,
                  "runs": self.runs, "notes": self.notes, "run_id": self.run_id, "ids_bytes": len(ids),
                  "code_sets": self.code_sets}
        with atomic_output(os.path.join(journal_dir, INDEX)) as fh:
            fh.write(orjson.dumps(header) + b"\n")
            fh.write(ids)
            for column in columns:
                fh.write(column if isinstance(column, bytearray) else column.tobytes())

    @classmethod
    def from_index(cls, journal_dir: str) -> History:
        """The history kept in ``journal_dir/index``; ``StaleIndex`` when it cannot be read as one."""
        path = os.path.join(journal_dir, INDEX)
        with open(path, "rb") as fh:
            try:
                header = orjson.loads(fh.readline())
            except orjson.JSONDecodeError:
                raise StaleIndex(f"{path} is not an index this version reads") from None
            if not isinstance(header, dict) or header.get("format") != _FORMAT:
                raise StaleIndex(f"{path} is not an index this version reads")
            h = cls()
            n = int(header["tasks"])
            ids = fh.read(int(header["ids_bytes"])).decode("utf-8")
            h.ids = ids.split("\n") if n else []
            for name in _COLUMNS:
                column = getattr(h, name)
                size = n * (1 if isinstance(column, bytearray) else column.itemsize)
                data = fh.read(size)
                if len(data) != size:
                    raise StaleIndex(f"{path} is cut short")
                if isinstance(column, bytearray):
                    column[:] = data
                else:
                    column.frombytes(data)
            h.fps[:] = fh.read(n * _FP)
            if len(h.ids) != n or len(h.fps) != n * _FP:
                raise StaleIndex(f"{path} is cut short")
        h.covered = {str(k): int(v) for k, v in header["covered"].items()}
        h.files, h.runs, h.notes = list(header["files"]), list(header["runs"]), list(header["notes"])
        h.run_id = header["run_id"]
        h.code_sets = dict(header.get("code_sets") or {})  # an index written before code sets has none
        h.journal_dir = journal_dir
        return h


def _line_number(path: str, offset: int) -> int:
    """The number of the line starting at ``offset`` (read only to report a bad line)."""
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1


def load_history(journal_dir: str, paths: list[str], warn: Callable[[str], None] | None = None) -> History:
    """Every task's history from the journals ``paths`` of ``journal_dir``: the index and what was
    appended since, or (no index, or one that does not match) the journals in full, with the run table
    of the index when it could be read."""
    indexed: History | None = None
    path = os.path.join(journal_dir, INDEX)
    if os.path.exists(path):
        try:
            indexed = History.from_index(journal_dir)
            indexed.read_tails(paths, warn)
            return indexed
        except (StaleIndex, OSError, ValueError, KeyError, TypeError) as exc:
            if warn is not None:
                warn(f"{path} does not match the journals ({exc}); reading them in full")
    history = History()
    history.journal_dir = journal_dir
    history.read_tails(paths, warn)
    if indexed is not None:
        history.code_sets = {**indexed.code_sets, **history.code_sets}
    if indexed is not None and indexed.run_id is not None:  # its table still says what the run was about
        groups: dict[tuple[int, int], list[str]] = {}
        for i in indexed.run_tasks():
            groups.setdefault((indexed.planned[i], indexed.note[i]), []).append(indexed.ids[i])
        history.plan_run(indexed.run_id, ((ids, _STATES[state], indexed.notes[note]) for (state, note), ids in groups.items()))
    return history
