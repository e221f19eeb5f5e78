"""The slots that bound what a thread pool executes, and the journal's write batching: real threads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cmbagent_batch.attempt import Stopped
from cmbagent_batch.backends.slots import Slots
from cmbagent_batch.rundir.journal import Journal, read_records, replay


def enter_in_thread(gate: object, log: list[str], name: str) -> threading.Thread:
    def run() -> None:
        try:
            gate.enter()  # type: ignore[attr-defined]
            log.append(name)
        except Stopped:
            log.append(f"{name} stopped")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def settle(seconds: float = 0.2) -> None:
    time.sleep(seconds)  # long enough for a woken thread to run, here


def test_slots_go_in_hand_over_order_not_arrival_order() -> None:
    slots = Slots(1)
    started: list[str] = []
    first = slots.gate(lambda: started.append("on_start a"))
    second, third = slots.gate(lambda: None), slots.gate(lambda: None)
    first.enter()
    log: list[str] = []
    late = enter_in_thread(third, log, "c")  # reaches the gate before b, was handed over after it
    settle()
    early = enter_in_thread(second, log, "b")
    settle()
    assert log == [] and started == ["on_start a"]
    first.leave(True)
    early.join(5)
    settle()
    assert log == ["b"]
    second.leave(True)
    late.join(5)
    assert log == ["b", "c"]


def test_a_slot_is_kept_for_an_attempt_still_preparing_until_it_withdraws() -> None:
    slots = Slots(1)
    preparing, ready = slots.gate(lambda: None), slots.gate(lambda: None)
    log: list[str] = []
    waiter = enter_in_thread(ready, log, "ready")
    settle()
    assert log == []  # the one handed over first has not arrived, and there is one slot
    preparing.withdraw()  # it ended before it started (a missing input, say)
    waiter.join(5)
    assert log == ["ready"]


def test_a_failure_keeps_its_slot_until_the_scheduler_settles_it() -> None:
    slots = Slots(1)
    failing, next_one = slots.gate(lambda: None), slots.gate(lambda: None)
    failing.enter()
    log: list[str] = []
    waiter = enter_in_thread(next_one, log, "next")
    failing.leave(False)
    settle()
    assert log == []  # nothing starts before the failure is seen (fail-fast would stop it)
    slots.stop()
    failing.settle()
    waiter.join(5)
    assert log == ["next stopped"]


def test_a_worker_ranks_gate_starts_what_is_ready_the_most_urgent_first() -> None:
    slots = Slots(1, keep_order=False)
    holder = slots.gate(lambda: None)
    holder.enter()
    preparing = slots.gate(lambda: None, priority=9)  # first in line, still making its work directory
    low, high = slots.gate(lambda: None, priority=1), slots.gate(lambda: None, priority=5)
    log: list[str] = []
    waiters = [enter_in_thread(low, log, "low")]
    settle()
    waiters.append(enter_in_thread(high, log, "high"))
    settle()
    holder.leave(True)
    waiters[1].join(5)
    settle()
    assert log == ["high"]  # ready and the most urgent: the one still preparing keeps no slot
    high.leave(True)
    waiters[0].join(5)
    assert log == ["high", "low"]
    low.leave(True)
    log.clear()
    late = enter_in_thread(preparing, log, "preparing")
    late.join(5)
    assert log == ["preparing"]


def test_stop_wakes_every_waiting_attempt_and_none_starts() -> None:
    slots = Slots(1)
    holder = slots.gate(lambda: None)
    holder.enter()
    log: list[str] = []
    threads = [enter_in_thread(slots.gate(lambda: None), log, f"w{i}") for i in range(3)]
    settle()
    slots.stop()
    for t in threads:
        t.join(5)
    assert sorted(log) == ["w0 stopped", "w1 stopped", "w2 stopped"]
    with pytest.raises(Stopped):
        slots.gate(lambda: None).enter()


def test_journal_records_reach_the_file_at_flush_and_close(tmp_path: Path) -> None:
    path = tmp_path / "journal" / "rank-0000.jsonl"
    journal = Journal(str(path))
    journal.append({"task": "a", "state": "running"})
    journal.append({"task": "a", "state": "succeeded", "note": "ünïcode"})
    time.sleep(0.1)
    assert path.read_bytes() == b""  # queued, not handed to the writer
    journal.flush()  # the writer thread writes them at once
    deadline = time.monotonic() + 10
    while path.read_bytes().count(b"\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"task": "a", "state": "running"}, {"task": "a", "state": "succeeded", "note": "ünïcode"}]
    journal.append({"task": "b", "state": "failed"})
    journal.close()
    assert [r["task"] for r in read_records(str(path))] == ["a", "a", "b"]


def test_a_flush_that_waits_returns_with_the_records_in_the_file(tmp_path: Path) -> None:
    """What a scheduler does before it starts the tasks that ends freed: those ends are in the file."""
    path = tmp_path / "journal" / "rank-0000.jsonl"
    journal = Journal(str(path))
    for i in range(50):
        journal.append({"task": f"t{i}", "state": "succeeded"})
        journal.flush(wait=True)
        assert path.read_bytes().count(b"\n") == i + 1
    journal.close()


def test_replay_keeps_an_end_a_worker_journaled_on_a_clock_behind_rank_0s(tmp_path: Path) -> None:
    (tmp_path / "rank-0000.jsonl").write_text(json.dumps(
        {"t": 100.000, "run": "r1", "task": "a", "state": "running", "attempt": 1, "rank": -1}) + "\n")
    (tmp_path / "rank-0001.jsonl").write_text(json.dumps(
        {"t": 99.995, "run": "r1", "task": "a", "state": "succeeded", "attempt": 1, "rank": 1}) + "\n")
    history = replay([str(tmp_path / "rank-0000.jsonl"), str(tmp_path / "rank-0001.jsonl")])
    assert history["a"].state == "succeeded"
