"""The cost ledger's storage: entries, rank journals, the hash chain, merge and the spend meter.

Real files in tmp_path and real processes; ``tests/test_ledger_cli.py`` drives the commands.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from cmbagent_batch.ledger.chain import GENESIS, chain_lines
from cmbagent_batch.ledger.entry import FIELDS, OPTIONAL_FIELDS, make_entry
from cmbagent_batch.ledger.files import journal_path, ledger_path
from cmbagent_batch.ledger.journal import JournalWriter, next_call_id, read_journal
from cmbagent_batch.ledger.merge import merge
from cmbagent_batch.ledger.meter import SpendMeter
from cmbagent_batch.ledger.verify import read_chain
from cmbagent_batch.spec.pricing import Price
from tests.helpers.ledger_entries import PRICE, entry

ROOT = Path(__file__).resolve().parent.parent


def journal(run_dir: Path, rank: int, entries: list[dict[str, Any]]) -> Path:
    with JournalWriter(str(run_dir), rank) as writer:
        for e in entries:
            writer.append(e)
    return Path(journal_path(str(run_dir), rank))


def ledger_entries(run_dir: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(ledger_path(str(run_dir))).read_bytes().splitlines()]


# --- the entry ---


def test_an_entry_has_every_field_in_order_and_matches_its_schema() -> None:
    made = entry(3)
    assert tuple(made) == FIELDS
    schema = json.loads((ROOT / "schemas" / "ledger-entry.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(made)
    jsonschema.Draft202012Validator(schema).validate(entry(4, task=None))
    assert schema["required"] == list(FIELDS)
    assert list(schema["properties"]) == ["seq", "prev", *FIELDS, *OPTIONAL_FIELDS, "hash"]  # a merged line's order
    dated = entry(5, price_table_date="2025-08-15")
    assert tuple(dated) == (*FIELDS, "price_table_date")
    jsonschema.Draft202012Validator(schema).validate(dated)
    assert all(p.get("description") for p in schema["properties"].values())
    chained = {"seq": 1, "prev": "0" * 64, **made, "hash": "a" * 64}
    jsonschema.Draft202012Validator(schema).validate(chained)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**made, "seq": 1})  # a chain field alone


def test_the_schema_is_shipped_in_the_package_identical() -> None:
    assert (ROOT / "schemas" / "ledger-entry.schema.json").read_bytes() == \
        (ROOT / "cmbagent_batch" / "schemas" / "ledger-entry.schema.json").read_bytes()


def test_make_entry_takes_a_price_and_makes_numbers_floats() -> None:
    made = entry(1, price=Price(0.15, 0.6, 0.075), cost_usd=0, latency_s=2)
    assert made["price"] == PRICE and list(made["price"]) == list(PRICE)
    assert (type(made["cost_usd"]), type(made["latency_s"])) == (float, float)


@pytest.mark.parametrize(("changes", "message"), [
    ({"cost_usd": -1.0}, "cost_usd: must be at least 0, got -1.0"),
    ({"prompt_tokens": "12"}, "prompt_tokens: expected an integer, got '12'"),
    ({"attempt": True}, "attempt: expected an integer or null, got True"),
    ({"status": "fine"}, "status: expected one of ok, error, got 'fine'"),
    ({"source": "analysis"}, "an analysis call has task and attempt null"),
    ({"cached_prompt_tokens": 5000}, "cached_prompt_tokens: more than prompt_tokens (which include them)"),
    ({"timestamp": "2026-11-27 23:00"},
     "timestamp: expected ISO-8601 UTC like 2026-11-27T23:00:00.123+00:00, got '2026-11-27 23:00'"),
    ({"price": {"prompt_per_1m": 1}}, ("price: expected an object with prompt_per_1m, cached_prompt_per_1m, "
                                       "completion_per_1m, got {'prompt_per_1m': 1}")),
    ({"colour": "red"}, "unknown ledger entry field(s) colour; valid: " + ", ".join(FIELDS) + ", price_table_date"),
    ({"price_table_date": 20250815}, "price_table_date: expected a string or null, got 20250815"),
])
def test_make_entry_says_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        entry(1, **changes)
    assert str(info.value) == message


def test_make_entry_lists_missing_fields() -> None:
    fields = dict(entry(1))
    del fields["host"], fields["cost_usd"]
    with pytest.raises(ValueError) as info:
        make_entry(**fields)
    assert str(info.value) == "ledger entry lacks host, cost_usd"


def test_call_ids_count_per_process() -> None:
    first = next_call_id("run-9", 3)
    run_id, rank, pid, n = first.split("/")
    assert (run_id, rank, pid) == ("run-9", "3", str(os.getpid()))
    assert next_call_id("run-9", 3) == f"run-9/3/{pid}/{int(n) + 1}"


# --- the chain ---


def test_a_chain_verifies_intact() -> None:
    lines = list(chain_lines([entry(n) for n in range(1, 6)]))
    assert lines[0].startswith(b'{"seq":1,"prev":"' + GENESIS.encode() + b'","id":"run-1/0/4242/1",')
    for before, after in itertools.pairwise(lines):
        assert orjson.loads(after)["prev"] == orjson.loads(before)["hash"]


def test_an_empty_ledger_is_intact(tmp_path: Path) -> None:
    (tmp_path / "ledger.jsonl").write_bytes(b"")
    verdict = read_chain(str(tmp_path / "ledger.jsonl"))
    assert (verdict.intact, verdict.entries, verdict.head) == (True, 0, GENESIS)


# --- rank journals ---


def _append_many(run_dir: str, rank: int, tag: int, count: int) -> None:
    with JournalWriter(run_dir, rank) as writer:
        for n in range(1, count + 1):
            # A long error message makes each line several pages: interleaved writes would show.
            writer.append(entry(n, id=f"run-1/{rank}/{tag}/{n}", pid=tag, status="error", error=f"{tag}:" + "x" * 9000))


def start(target: Any, *arg_lists: tuple[Any, ...]) -> list[Any]:
    """One spawned process per argument tuple, started."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    return procs


def finish(procs: list[Any]) -> None:
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


@pytest.mark.slow
def test_concurrent_appenders_never_interleave(tmp_path: Path) -> None:
    finish(start(_append_many, *[(str(tmp_path), 0, tag, 60) for tag in range(6)]))
    read = list(read_journal(journal_path_bytes(tmp_path), "rank-0000.jsonl"))
    assert [problem for _, problem in read] == [None] * 360
    assert sorted(e["id"] for e, _ in read) == sorted(f"run-1/0/{t}/{n}" for t in range(6) for n in range(1, 61))
    assert all(e["error"] == f"{e['pid']}:" + "x" * 9000 for e, _ in read)


def _append_while_merging(run_dir: str, tag: int) -> None:
    with JournalWriter(run_dir, 0) as writer:
        for n in range(1, 101):
            writer.append(entry(n, id=f"run-1/0/{tag}/{n}", pid=tag, cost_usd=0.5))


@pytest.mark.slow
def test_merging_while_processes_append_loses_and_repeats_nothing(tmp_path: Path) -> None:
    procs = start(_append_while_merging, *[(str(tmp_path), tag) for tag in range(4)])
    while any(p.is_alive() for p in procs):
        merge(str(tmp_path))  # removes journals under the writers' feet
    finish(procs)
    result = merge(str(tmp_path))
    ids = [e["id"] for e in ledger_entries(tmp_path)]
    assert sorted(ids) == sorted(f"run-1/0/{t}/{n}" for t in range(4) for n in range(1, 101))
    assert (result.entries, result.cost_usd, result.problems) == (400, 200.0, ())
    assert read_chain(ledger_path(str(tmp_path))).intact


def journal_path_bytes(run_dir: Path, rank: int = 0) -> bytes:
    return Path(journal_path(str(run_dir), rank)).read_bytes()


def test_a_writer_whose_journal_was_merged_starts_a_new_one(tmp_path: Path) -> None:
    with JournalWriter(str(tmp_path), 0) as writer:
        writer.append(entry(1))
        assert merge(str(tmp_path)).added == 1
        assert not os.path.exists(journal_path(str(tmp_path), 0))
        writer.append(entry(2))
    assert merge(str(tmp_path)).added == 1
    assert [e["id"] for e in ledger_entries(tmp_path)] == ["run-1/0/4242/1", "run-1/0/4242/2"]


def test_a_torn_journal_tail_is_reported_not_trusted(tmp_path: Path) -> None:
    path = journal(tmp_path, 0, [entry(1), entry(2)])
    whole = orjson.dumps(entry(3))
    with open(path, "ab") as fh:
        fh.write(whole[:100])  # a writer killed in the middle of its line
    result = merge(str(tmp_path))
    assert (result.added, result.entries) == (2, 2)
    assert result.problems == (
        "ledger/rank-0000.jsonl:3: incomplete last line ignored (a writer was killed while writing it?)",)


def test_a_torn_line_followed_by_another_writers_line_keeps_the_second(tmp_path: Path) -> None:
    path = journal(tmp_path, 0, [entry(1)])
    with open(path, "ab") as fh:
        fh.write(orjson.dumps(entry(2))[:150] + orjson.dumps(entry(3)) + b"\n")
    result = merge(str(tmp_path))
    assert [e["id"] for e in ledger_entries(tmp_path)] == ["run-1/0/4242/1", "run-1/0/4242/3"]
    assert result.problems == ("ledger/rank-0000.jsonl:2: a torn entry before the one at its end was dropped",)


# --- merge ---


def test_merge_sorts_by_time_and_removes_the_journals(tmp_path: Path) -> None:
    journal(tmp_path, 1, [entry(2, rank=1, cost_usd=0.25), entry(4, rank=1)])
    journal(tmp_path, 0, [entry(1), entry(3), entry(5, task=None)])
    result = merge(str(tmp_path))
    ledger = ledger_entries(tmp_path)
    assert [e["id"] for e in ledger] == ["run-1/0/4242/1", "run-1/1/4242/2", "run-1/0/4242/3", "run-1/1/4242/4",
                                         "run-1/0/4242/5"]
    assert [e["seq"] for e in ledger] == [1, 2, 3, 4, 5]
    assert not list((tmp_path / "ledger").glob("rank-*.jsonl"))
    assert result.manifest() == {"file": "ledger.jsonl", "entries": 5, "head": ledger[-1]["hash"],
                                 "cost_usd": 0.001 + 0.25 + 0.001 + 0.001 + 0.001}
    assert (result.added, result.problems) == (5, ())


def test_merge_with_nothing_new_changes_nothing(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1), entry(2)])
    first = merge(str(tmp_path))
    before = Path(ledger_path(str(tmp_path))).read_bytes()
    again = merge(str(tmp_path))
    assert (again.head, again.entries, again.added, again.cost_usd) == (first.head, 2, 0, first.cost_usd)
    assert Path(ledger_path(str(tmp_path))).read_bytes() == before


def test_reruns_append_to_the_same_chain(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1), entry(2)])
    first = merge(str(tmp_path))
    journal(tmp_path, 0, [entry(1, id="run-2/0/77/1", run_id="run-2", day=1)])
    second = merge(str(tmp_path))
    assert (second.entries, second.added) == (3, 1)
    assert ledger_entries(tmp_path)[2]["prev"] == first.head
    assert read_chain(ledger_path(str(tmp_path))).intact


def test_merge_after_a_crash_before_the_journals_were_removed_adds_nothing_twice(tmp_path: Path) -> None:
    path = journal(tmp_path, 0, [entry(1), entry(2), entry(3)])
    kept = path.read_bytes()
    first = merge(str(tmp_path))
    path.write_bytes(kept)  # as if merge died after appending, before removing the journal
    journal(tmp_path, 0, [entry(4)])  # and a call ended meanwhile
    again = merge(str(tmp_path))
    assert (again.entries, again.added, again.problems) == (4, 1, ())
    assert [e["id"] for e in ledger_entries(tmp_path)] == [f"run-1/0/4242/{n}" for n in range(1, 5)]
    assert ledger_entries(tmp_path)[3]["prev"] == first.head
    assert not path.exists()


def test_merge_after_a_crash_in_the_middle_of_its_write_repairs_the_tail(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1)])
    merge(str(tmp_path))
    path = journal(tmp_path, 0, [entry(2), entry(3)])
    kept = path.read_bytes()
    merge(str(tmp_path))
    ledger = Path(ledger_path(str(tmp_path)))
    data = ledger.read_bytes()
    ledger.write_bytes(data[:len(data) - 200])  # the second line whole, the third torn
    path.write_bytes(kept)
    result = merge(str(tmp_path))
    assert (result.entries, result.added) == (3, 1)
    assert result.problems == (("ledger.jsonl:3: incomplete last line removed (a merge was killed while writing "
                                "it; its entries are merged again from the journals)"),)
    assert ledger.read_bytes() == data
    assert read_chain(str(ledger)).intact


def test_one_id_with_different_content_is_two_calls(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1)])
    merge(str(tmp_path))
    journal(tmp_path, 0, [entry(1, day=1, cost_usd=0.5)])  # a process id reused later in the run
    assert merge(str(tmp_path)).added == 1


def test_an_invalid_journal_entry_is_skipped_and_reported(tmp_path: Path) -> None:
    path = journal(tmp_path, 0, [entry(1)])
    with open(path, "ab") as fh:
        fh.write(orjson.dumps({**entry(2), "cost_usd": -3}) + b"\n")
    result = merge(str(tmp_path))
    assert result.added == 1
    assert result.problems == (
        "ledger/rank-0000.jsonl: entry 'run-1/0/4242/2' skipped: cost_usd: must be at least 0, got -3",)


@pytest.mark.slow
def test_two_runs_of_merge_at_once_keep_one_chain(tmp_path: Path) -> None:
    for rank in range(8):
        journal(tmp_path, rank, [entry(n, rank=rank) for n in range(1, 51)])
    finish(start(merge, *[(str(tmp_path),)] * 3))
    assert len(ledger_entries(tmp_path)) == 400
    assert read_chain(ledger_path(str(tmp_path))).intact


# --- the spend meter ---


def test_the_meter_counts_each_call_once_and_reads_what_is_new(tmp_path: Path) -> None:
    meter = SpendMeter(str(tmp_path))
    assert meter.refresh() == 0.0
    path = journal(tmp_path, 0, [entry(1, cost_usd=0.5), entry(2, task="sim-2", cost_usd=0.25)])
    assert meter.refresh() == 0.75
    assert (meter.task_usd("sim-1"), meter.task_usd("sim-2"), meter.task_usd("other")) == (0.5, 0.25, 0.0)
    kept = path.read_bytes()
    merge(str(tmp_path))
    path.write_bytes(kept)  # in the ledger and in a journal at once
    assert meter.refresh() == 0.75
    with open(path, "ab") as fh:
        line = orjson.dumps(entry(3, cost_usd=1.0)) + b"\n"
        fh.write(line[:50])  # still being written
        fh.flush()
        assert meter.refresh() == 0.75
        fh.write(line[50:])
    assert meter.refresh() == 1.75
    assert meter.task_usd("sim-1") == 1.5
    assert meter.calls == 3


def test_the_meter_follows_a_journal_merged_and_started_again(tmp_path: Path) -> None:
    meter = SpendMeter(str(tmp_path))
    journal(tmp_path, 0, [entry(1, cost_usd=0.5)])
    assert meter.refresh() == 0.5
    merge(str(tmp_path))
    journal(tmp_path, 0, [entry(2, cost_usd=0.125)])  # a new, shorter file under the same name
    assert meter.refresh() == 0.625
    assert meter.refresh() == 0.625


def test_the_meter_of_a_run_dir_with_a_ledger_from_before(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1, cost_usd=2.0)])
    merge(str(tmp_path))
    assert SpendMeter(str(tmp_path)).refresh() == 2.0


def test_the_tree_holds_no_leftovers(tmp_path: Path) -> None:
    journal(tmp_path, 0, [entry(1)])
    merge(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ledger", "ledger.jsonl"]
    assert os.listdir(tmp_path / "ledger") == ["merge.lock"]
    shutil.rmtree(tmp_path / "ledger")
    assert merge(str(tmp_path)).entries == 1


def test_merge_where_no_call_was_made_writes_nothing(tmp_path: Path) -> None:
    result = merge(str(tmp_path))
    assert (result.entries, result.head, result.added, result.cost_usd) == (0, GENESIS, 0, 0.0)
    assert os.listdir(tmp_path) == []
