"""The MPI backend: ``RankExecutor`` on rank 0 and ``serve`` on the workers, under a real ``mpiexec``.

Each MPI test runs ``mpiexec -n N python tests/mpi_scripts/scenarios.py NAME DIR`` and reads the JSON
that rank 0 prints. Overlap is shown by timestamps the calls record, never by speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.backends.mpi.failures import (
    WorkerTraceback,
    decode_failure,
    encode_failure,
)
from cmbagent_batch.backends.mpi.slots import Pace, SlotTable
from cmbagent_batch.backends.mpi.wire import PollWait
from cmbagent_batch.errors import MISSING_MPI4PY
from tests.helpers.cli import clean_env

pytestmark = pytest.mark.slow  # ranks under mpiexec

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "mpi_scripts" / "scenarios.py"
BENCH = HERE.parent / "bench" / "bench_mpi_executor.py"


def find_mpiexec() -> str | None:
    """``mpiexec`` beside this interpreter (a venv with the mpich wheel), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="MPI tests need mpiexec (beside sys.executable or on PATH) and mpi4py: pip install 'cmbagent-batch[mpi]'",
)


def mpi_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's subprocesses: HOME in tmp_path, this tree's package first on the path
    (as for the tests themselves), ``mpiexec``'s directory first on PATH."""
    env = clean_env(tmp_path, drop=())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    if MPIEXEC is not None:
        env["PATH"] = os.path.dirname(MPIEXEC) + os.pathsep + env.get("PATH", "")
    return env


def run_scenario(name: str, tmp_path: Path, n: int = 3, expect_rc: int = 0) -> tuple[Any, str]:
    """Run a scenario on ``n`` ranks; rank 0's JSON (None if it printed none) and all the output."""
    scratch = tmp_path / name
    scratch.mkdir()
    assert MPIEXEC is not None
    r = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(SCENARIOS), name, str(scratch)],
                       check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=mpi_env(tmp_path))
    output = r.stdout + r.stderr
    assert r.returncode == expect_rc, output
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return (json.loads(lines[0][len("RESULT "):]) if lines else None), output


# Without MPI.

def test_import_without_mpi4py_works_and_calling_in_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['mpi4py'] = None  # as if not installed\n"
        "import cmbagent_batch.backends.mpi as m\n"
        "for call in (m.world, lambda: m.run_in_world(lambda ex: 0, 1), lambda: m.serve(None, 1),\n"
        "             lambda: m.RankExecutor(None, 1)):\n"
        "    try:\n"
        "        call()\n"
        "    except m.MPIUnavailable as exc:\n"
        "        print(exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                       env=mpi_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["the MPI backend needs mpi4py: pip install 'cmbagent-batch[mpi]'"] * 4
    assert MISSING_MPI4PY == "the MPI backend needs mpi4py: pip install 'cmbagent-batch[mpi]'"


def test_slot_table_gives_the_least_loaded_rank_lowest_first() -> None:
    table = SlotTable([3, 1, 2], per_rank=2)
    assert [table.take() for _ in range(7)] == [1, 2, 3, 1, 2, 3, None]
    table.give(2)
    table.give(3)
    table.give(3)
    assert [table.take(), table.take(), table.take(), table.take()] == [3, 2, 3, None]
    with pytest.raises(ValueError, match="rank 1 has no call in flight"):
        for _ in range(3):
            table.give(1)


def test_slot_table_stays_small_when_every_slot_stays_busy() -> None:
    table = SlotTable([1], per_rank=2)
    table.take()
    table.take()
    for _ in range(1000):
        table.give(1)
        assert table.take() == 1
    assert len(table._heap) <= 4


def test_a_loop_polls_again_at_once_after_finding_something_else_waits_its_interval() -> None:
    w = PollWait(0.002)
    assert [w.next() for _ in range(3)] == [0.0, 0.002, 0.002]
    w.reset()
    assert [w.next() for _ in range(2)] == [0.0, 0.002]


def test_a_loop_with_nothing_urgent_to_hear_waits_that_long_within_its_shortest_and_longest_wait() -> None:
    w = PollWait(0.002, 0.02)
    assert [w.next(0.01), w.next(0.01), w.next(1.0), w.next(0.0001), w.next()] == [0.0, 0.01, 0.02, 0.002, 0.002]
    w.reset()
    assert [w.next(0.01), w.next(0.01)] == [0.0, 0.01]


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_a_failure_keeps_its_type_message_traceback_and_place() -> None:
    exc = _raise(KeyError("missing"))
    err = decode_failure(encode_failure(exc), rank=2, host="node7", size=3)
    assert str(err) == "KeyError: 'missing' [rank 2 on node7]"
    assert (err.type_name, err.message, err.rank, err.host) == ("KeyError", "'missing'", 2, "node7")
    assert err.traceback.startswith("Traceback (most recent call last):\n")
    assert "in _raise" in err.traceback
    assert isinstance(err.__cause__, KeyError)
    assert isinstance(err.__cause__.__cause__, WorkerTraceback)
    assert str(err.__cause__.__cause__).startswith('\n### Worker 2 of 3 on node7\n"""\nTraceback')
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.traceback) == (str(err), err.traceback)


class _HoldsLock(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def test_an_exception_that_does_not_pickle_still_comes_back_as_text() -> None:
    err = decode_failure(encode_failure(_raise(_HoldsLock())), rank=1, host="h", size=2)
    assert str(err) == "tests.test_mpi_executor._HoldsLock: holds a lock [rank 1 on h]"
    assert isinstance(err.__cause__, WorkerTraceback)
    assert "_HoldsLock: holds a lock" in str(err.__cause__)


def test_slot_table_takes_among_a_nodes_ranks_the_least_loaded_and_none_when_they_are_full() -> None:
    table = SlotTable([1, 2, 3, 4], per_rank=2)
    assert table.take() == 1
    assert [table.take_among([1, 3]) for _ in range(4)] == [3, 1, 3, None]
    assert table.take_among([2]) == 2
    table.give(1)
    assert table.take_among([3, 1]) == 1
    assert [table.take() for _ in range(4)] == [4, 2, 4, None]  # the loads it booked count for take too


# Under mpiexec.

@needs_mpi
def test_calls_bound_to_a_node_go_to_its_workers_and_wait_there_without_holding_back_other_nodes(
        tmp_path: Path) -> None:
    out, _ = run_scenario("routed", tmp_path)
    assert [h[1] for h in out["hellos"].values()] == ["", ""] and sorted(out["hellos"]) == ["1", "2"]
    assert (out["blocker"], out["behind"], out["others"]) == (1, 1, [2])
    assert out["sent_early"] is False  # it waited on rank 0 for node a's worker, however urgent
    assert out["error"] == "no worker rank is routed to node 'c' (routes: ['a', 'b'])"


@needs_mpi
@pytest.mark.parametrize("n", [3, 4])
def test_calls_land_on_every_worker_rank(n: int, tmp_path: Path) -> None:
    out, _ = run_scenario("placement", tmp_path, n=n)
    ranks = list(range(1, n))
    assert out["workers"] == ranks
    assert out["slots"] == n - 1
    assert out["future_ranks"] == ranks
    assert out["call_ranks"] == ranks  # the rank each call saw is the one its future names
    assert out["whoami"] == [[7, 1]]


@needs_mpi
def test_many_calls_come_back_in_order_and_queued_calls_start_first_in_first_out(tmp_path: Path) -> None:
    out, _ = run_scenario("many", tmp_path)
    assert out["ok"] is True  # 3,000 results, each the square of its argument, in submission order
    assert out["ranks"] == [1, 2]
    assert out["map"] == [0, 1, 4, 9, 16]
    assert out["blocker_rank"] == 1
    assert out["behind_blocker"] == [1]  # sent ahead to rank 1 (a tie with rank 2 goes to the lower rank)
    assert out["queued_ranks"] == [2]
    assert out["start_order"] == [0] + list(range(2, 20))


@needs_mpi
def test_calls_queued_behind_a_single_slot_all_run(tmp_path: Path) -> None:
    result, _ = run_scenario("queued_behind_one_slot", tmp_path, n=2)
    assert result == 30


@needs_mpi
def test_a_worker_holds_calls_ahead_by_the_pace_few_while_calls_are_long_many_once_they_are_short(
        tmp_path: Path) -> None:
    out, _ = run_scenario("paced", tmp_path)
    assert out == {"long_sent": 4, "short_sent": 16}  # 2 per rank (least); then 1 + 8 ahead (most)


def test_pace_holds_least_until_the_window_is_full_then_what_covers_its_seconds_at_most_most() -> None:
    pace = Pace(workers=2, least=2, most=9, cover=0.5, window=5)
    for t in (0.0, 0.1, 0.2, 0.3):
        pace.ended(t)
        assert pace.limit() == 2
    pace.ended(0.4)  # 4 ends in 0.4 s over 2 ranks: 5 a second each, 2.5 in 0.5 s
    assert pace.limit() == 2 + 2
    for t in (0.401, 0.402, 0.403, 0.404):
        pace.ended(t)
    assert pace.limit() == 9  # 500 a second each
    for t in (10.0, 20.0, 30.0, 40.0, 50.0):
        pace.ended(t)
    assert pace.limit() == 2  # 0.05 a second each: back to least


def test_pace_says_the_time_between_two_ends_on_a_rank_once_enough_calls_have_ended() -> None:
    pace = Pace(workers=2, least=2, most=9, cover=0.5, window=5)
    pace.ended(0.0)
    assert pace.gap() is None and pace.gap(known=2) is None
    for t in (0.1, 0.2):
        pace.ended(t)
    assert pace.gap() is None and pace.gap(known=3) == pytest.approx(0.2)  # 3 ends in 0.2 s over 2 ranks
    for t in (0.3, 0.4, 0.5):
        pace.ended(t)
    assert pace.gap() == pytest.approx(0.2)  # the last 5: 0.1 to 0.5
    with pytest.raises(ValueError, match="need 1 <= least <= most"):
        Pace(workers=1, least=3, most=2, cover=1.0)


def test_slot_table_follows_a_limit_that_changes() -> None:
    table = SlotTable([1, 2], per_rank=1)
    assert [table.take(), table.take(), table.take()] == [1, 2, None]
    table.per_rank = 2
    assert table.room()
    assert [table.take(), table.take(), table.take()] == [1, 2, None]
    table.per_rank = 1  # both ranks above it: nothing until two of each rank's calls end
    table.give(1)
    assert not table.room() and table.take() is None
    table.give(1)
    assert table.take() == 1
    with pytest.raises(ValueError, match="slots per rank must be at least 1, not 0"):
        table.per_rank = 0


@needs_mpi
def test_calls_submitted_while_every_worker_is_full_wait_for_room_and_go_out_the_most_urgent_first(
        tmp_path: Path) -> None:
    out, _ = run_scenario("full", tmp_path, n=2)
    assert out == {"sent_early": [False] * 5, "held": ["held-0", "held-1"], "order": [3, 2, 1, 10, 11]}


@needs_mpi
def test_calls_queued_on_rank_0_go_out_the_most_urgent_first(tmp_path: Path) -> None:
    result, _ = run_scenario("priority_order", tmp_path, n=2)
    assert result == [0, 3, 2, 1, 10, 11]  # the one sent ahead, then by priority, then submission order


def test_three_slots_run_three_calls_at_once_on_one_rank(tmp_path: Path) -> None:
    out, _ = run_scenario("overlap", tmp_path)
    by_rank: dict[int, list[list[int]]] = {}
    for _, rank, start, end in out["calls"]:
        by_rank.setdefault(rank, []).append([start, end])
    assert sorted(by_rank) == [1, 2]
    for spans in by_rank.values():
        assert len(spans) == 3
        assert max(s for s, _ in spans) < min(e for _, e in spans)  # a moment when all three ran


@needs_mpi
def test_an_exception_on_rank_2_says_what_where_and_keeps_the_traceback(tmp_path: Path) -> None:
    out, _ = run_scenario("failure", tmp_path)
    assert out["ok"] == [1]
    err = out["error"]
    host = out["hosts"]["2"]
    assert (err["type_name"], err["message"], err["rank"], err["host"]) == \
        ("ValueError", "bad input on rank 2", 2, host)
    assert (err["future_rank"], err["future_host"]) == (2, host)
    assert err["str"] == f"ValueError: bad input on rank 2 [rank 2 on {host}]"
    assert err["traceback"].startswith("Traceback (most recent call last):\n")
    assert 'raise ValueError(f"bad input on rank {RANK}")' in err["traceback"]
    assert err["traceback"].endswith("ValueError: bad input on rank 2\n")
    assert err["cause"] == "ValueError"
    assert f'### Worker 2 of 3 on {host}\n"""\nTraceback' in err["format_exc"]
    assert err["format_exc"].rstrip().endswith(f"RemoteTaskError: ValueError: bad input on rank 2 [rank 2 on {host}]")
    assert err["pickles"] == err["str"]
    two = out["needs_two"]  # pickles on the worker, but cannot be rebuilt on rank 0
    assert (two["type_name"], two["message"], two["cause"]) == ("__main__.NeedsTwo", "1 and 2", "WorkerTraceback")
    assert "raise NeedsTwo(1, 2)" in two["traceback"]
    assert "raise NeedsTwo(1, 2)" in two["cause_str"]


@needs_mpi
def test_a_result_that_does_not_pickle_fails_its_call_and_the_worker_goes_on(tmp_path: Path) -> None:
    out, _ = run_scenario("unpicklable", tmp_path)
    assert re.fullmatch(r"TypeError: cannot send the result back to rank 0: "
                        r"cannot pickle '_thread.lock' object \[rank 1 on \S+\]", out["error"]), out["error"]
    assert (out["type_name"], out["rank"], out["bad_rank"]) == ("TypeError", 1, 1)
    assert out["after_ranks"] == [1, 2]
    assert sorted(set(out["after"])) == [1, 2]
    assert out["strange"].startswith("AttributeError: cannot unpickle its result on rank 0: "
                                     "Can't get attribute 'OnlyOnWorkers'")
    assert out["local"] == "AttributeError: Can't pickle local object 'unpicklable.<locals>.<lambda>'"


@needs_mpi
def test_stop_tasks_reaches_the_hook_of_every_worker(tmp_path: Path) -> None:
    out, _ = run_scenario("stop", tmp_path)
    assert sorted(map(tuple, out["results"])) == [("stopped", 1), ("stopped", 1), ("stopped", 2), ("stopped", 2)]
    assert out["stopped_files"] == ["stopped-1", "stopped-2"]
    assert out["queued_cancelled"] == 3  # a stop starts nothing more
    assert out["still_serving"] == 81


@needs_mpi
def test_shutdown_cancel_futures_cancels_queued_calls_and_running_ones_finish(tmp_path: Path) -> None:
    out, _ = run_scenario("cancel", tmp_path)
    assert out["queued_cancelled"] == [True] * 5
    assert out["blockers"] == [1, 2]
    assert out["refused"] == "cannot schedule new futures after shutdown"


@needs_mpi
def test_waiting_for_a_sleeping_call_does_not_spin_a_core(tmp_path: Path) -> None:
    out, _ = run_scenario("idle_cpu", tmp_path)
    # CPU time over a 1 s wait, not speed: a spinning loop would use about 1 s.
    assert out["rank0_cpu"] < 0.25, out
    assert out["worker_cpu"] < 0.25, out


@needs_mpi
def test_when_main_raises_rank_0_stops_the_workers_tasks_and_the_job_fails(tmp_path: Path) -> None:
    out, output = run_scenario("main_raises", tmp_path, expect_rc=1)
    assert out is None
    assert "RuntimeError: planned failure of rank 0's main" in output
    assert sorted(p.name for p in (tmp_path / "main_raises").glob("stopped-*")) == ["stopped-1", "stopped-2"]


@needs_mpi
def test_ctrl_c_stops_the_workers_tasks_through_rank_0_and_the_job_ends(tmp_path: Path) -> None:
    scratch = tmp_path / "interrupt"
    scratch.mkdir()
    assert MPIEXEC is not None
    proc = subprocess.Popen([MPIEXEC, "-n", "3", sys.executable, str(SCENARIOS), "interrupt", str(scratch)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mpi_env(tmp_path))
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ends at EOF if the job dies first
            seen.append(line)
            if line.strip() == "READY":
                proc.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal: Hydra passes it to every rank
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert result == {"interrupted": True, "stopped": ["stopped-1", "stopped-2"]}


@needs_mpi
def test_when_rank_0_is_killed_the_launcher_ends_the_workers(tmp_path: Path) -> None:
    # Documents what serve relies on: it has no timeout of its own, Hydra ends the job (the call left
    # running on rank 1 would wait 30 s, then the worker forever, without it).
    out, output = run_scenario("rank0_killed", tmp_path, expect_rc=9)
    assert out is None
    assert "Killed (signal 9)" in output


@needs_mpi
def test_a_single_rank_job_says_there_is_no_worker_rank(tmp_path: Path) -> None:
    scratch = tmp_path / "single"
    scratch.mkdir()
    r = subprocess.run([sys.executable, str(SCENARIOS), "single", str(scratch)], check=False,
                       capture_output=True, text=True, timeout=120, env=mpi_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout.split("RESULT ", 1)[1]) == {
        "error": "the MPI job has 1 rank, so no worker rank to run tasks on (start it with mpiexec -n 2 or more)"}


@needs_mpi
def test_the_benchmark_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--quick"], check=False, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=mpi_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "calls/s" in r.stdout
