"""What the ledger commands say is true: ``summarize`` and ``report`` verify the chain as they read it and say
``UNVERIFIED: ...`` first when it does not hold; the report names the chain's status, its head hash and the
price tables with their dates; money never reads ``$0.00`` for a sum that is not zero; the JSON summary has
every count; and the report's tables fit the page in a real browser."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from cmbagent_batch.ledger.costs import budget_spent_message
from cmbagent_batch.ledger.money import Total, usd
from cmbagent_batch.ledger.provenance import SPEC_TABLE
from cmbagent_batch.ledger.report import render_report
from cmbagent_batch.ledger.verdict import ChainStatus
from cmbagent_batch.spec import pricing
from tests.helpers.cli import cli
from tests.helpers.ledger_entries import entry, head_of, write_chain
from tests.helpers.runs import read_run
from tests.test_ledger_report import HAND, find_chromium, realistic, run_chromium

EDITED = "the hash does not match the line: the entry was edited"
NOT_ANCHORED = ("no head hash to compare with (no run.json beside the ledger; give --run-json FILE or --head HASH "
                "--entries N): a cut at a line boundary would not show")


def ledger(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cmbagent-batch ledger ARGS`` as a user runs it, in ``tmp_path``."""
    return cli(tmp_path, "ledger", *args, timeout=60)


def run_dir(tmp_path: Path, entries: list[dict[str, Any]], budget: float | None = None) -> tuple[Path, str]:
    """A run directory with a chained ledger of ``entries`` and the run.json recording its end; its head."""
    run = tmp_path / "run"
    run.mkdir()
    lines = write_chain(run / "ledger.jsonl", entries)
    record = {"file": "ledger.jsonl", "entries": len(lines), "head": head_of(lines),
              "cost_usd": sum(e["cost_usd"] for e in entries)}
    (run / "run.json").write_text(json.dumps({"ledger": record, "budget_usd": budget}))
    return run, head_of(lines)


def edit_cost(path: Path, line: int, old: bytes, new: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    path.write_bytes(b"".join(lines))


# --- summarize and report verify as they read ---------------------------------------------------------


def test_summarize_of_an_edited_ledger_says_unverified_first(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path, [entry(1), entry(2), entry(3)])
    table = ("model        calls  errors  prompt  cached  completion  reasoning  cost_usd\n"
             "-----------  -----  ------  ------  ------  ----------  ---------  --------\n"
             "gpt-4o-mini      3       0   3,006     300         606          6  {cost:>8}\n"
             "TOTAL            3       0   3,006     300         606          6  {cost:>8}\n")
    before = ledger(tmp_path, "summarize", "run")
    assert (before.returncode, before.stdout, before.stderr) == (0, table.format(cost="$0.003"), "")
    edit_cost(run / "ledger.jsonl", 2, b'"cost_usd":0.001', b'"cost_usd":0.5')
    after = ledger(tmp_path, "summarize", "run")
    unverified = f"UNVERIFIED: run/ledger.jsonl:2: {EDITED}\n"
    assert (after.returncode, after.stdout, after.stderr) == (0, unverified + table.format(cost="$0.502"), unverified)
    js = ledger(tmp_path, "summarize", "run", "--format", "json")
    data = json.loads(js.stdout)
    assert (data["verified"], data["unverified_reason"]) == (False, f"run/ledger.jsonl:2: {EDITED}")
    assert (js.returncode, js.stderr) == (0, unverified)
    as_csv = ledger(tmp_path, "summarize", "run", "--format", "csv")
    assert (as_csv.returncode, as_csv.stderr) == (0, unverified)  # stdout stays CSV
    assert list(csv.reader(io.StringIO(as_csv.stdout)))[1] == ["gpt-4o-mini", "3", "0", "3006", "300", "606", "6",
                                                              "0.502"]
    assert ledger(tmp_path, "verify", "run").stdout == f"run/ledger.jsonl:2: {EDITED}\n"  # the same reason


def test_a_cut_and_an_edited_intent_are_unverified_as_verify_says(tmp_path: Path) -> None:
    run, head = run_dir(tmp_path, [entry(1), entry(2)])
    path = run / "ledger.jsonl"
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])  # cut at a line boundary
    cut = (f"{path}: 1 entries where run.json records 2 (head {head}): the last 1 entry was cut")
    r = ledger(tmp_path, "summarize", str(path), "--format", "json")
    assert (r.stderr, json.loads(r.stdout)["unverified_reason"]) == (f"UNVERIFIED: {cut}\n", cut)
    assert ledger(tmp_path, "verify", str(path)).stdout == cut + "\n"
    # an intents file beside, whose first line was edited
    intent = {"id": "run-1/0/4242/9", "job": "demo", "run_id": "run-1", "source": "agent", "task": "sim-1",
              "attempt": 1, "call": 9, "rank": 0, "host": "node1", "pid": 4242, "agent": "engineer", "model": "fast",
              "requested_model": "gpt-4o-mini", "endpoint": "127.0.0.1:9", "prompt_chars": 4000,
              "prompt_tokens_estimate": 1000, "timestamp": "2026-11-28T00:00:09.000+00:00", "paired": False}
    from cmbagent_batch.ledger.chain import chain_lines
    from cmbagent_batch.ledger.intents import MERGED_FIELDS

    other = tmp_path / "other"
    other.mkdir()
    write_chain(other / "ledger.jsonl", [entry(1)])
    intents = other / "ledger.intents.jsonl"
    intents.write_bytes(b"".join(chain_lines([intent], fields=MERGED_FIELDS, optional=())).replace(
        b'"prompt_chars":4000', b'"prompt_chars":4'))
    r = ledger(tmp_path, "summarize", "other")
    reason = f"other/ledger.intents.jsonl:1: {EDITED}"
    assert r.stdout.splitlines()[0] == f"UNVERIFIED: {reason}" and r.stderr == f"UNVERIFIED: {reason}\n"
    assert ledger(tmp_path, "verify", "other").stdout.splitlines()[-1] == reason


def test_report_of_an_edited_ledger_has_a_red_banner_and_says_so_first(tmp_path: Path) -> None:
    run, head = run_dir(tmp_path, [entry(1), entry(2)])
    r = ledger(tmp_path, "report", "run", "-o", "report.html")
    assert (r.returncode, r.stdout, r.stderr) == (0, "wrote report.html: 2 calls, $0.002\n", "")
    page = (tmp_path / "report.html").read_text()
    assert 'id="unverified"' not in page
    assert (f'<td class="ok" id="chain-status-0" data-value="verified">verified<div class="note">matches run.json: '
            f'2 entries, head {head}</div></td>') in page
    assert f'<td class="hash" id="chain-head-0">{head}</td>' in page
    edit_cost(run / "ledger.jsonl", 1, b'"cost_usd":0.001', b'"cost_usd":0.0001')
    r = ledger(tmp_path, "report", "run", "-o", "report.html")
    reason = f"run/ledger.jsonl:1: {EDITED}"
    assert (r.returncode, r.stdout, r.stderr) == (
        0, f"UNVERIFIED: {reason}\nwrote report.html: 2 calls, $0.0011\n", f"UNVERIFIED: {reason}\n")
    page = (tmp_path / "report.html").read_text()
    body = page[page.index("<body>") + len("<body>"):]
    assert body.startswith(f'<div class="banner" id="unverified" role="alert"><div>UNVERIFIED: {reason}</div></div>')
    assert ".banner{background:var(--bad)" in page  # red
    assert (f'<td class="err" id="chain-status-0" data-value="unverified">UNVERIFIED: {reason}</td>'
            '<td class="n">0</td><td class="hash" id="chain-head-0">' + "0" * 64) in page


def test_reprice_of_an_edited_ledger_says_unverified_and_writes_no_fresh_chain(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path, [entry(1), entry(2)])
    edit_cost(run / "ledger.jsonl", 2, b'"cost_usd":0.001', b'"cost_usd":0.5')
    (tmp_path / "prices.json").write_text(json.dumps({"id": "tiny", "date": "2026-01-05", "models": {
        "gpt-4o-mini": {"prompt_per_1m": 0.1, "completion_per_1m": 0.1}}}))
    unverified = f"UNVERIFIED: run/ledger.jsonl:2: {EDITED}\n"
    r = ledger(tmp_path, "reprice", "run", "--prices", "prices.json")
    assert (r.returncode, r.stderr) == (0, unverified)
    assert r.stdout.startswith(unverified + "prices: tiny (prices.json)\n")
    js = ledger(tmp_path, "reprice", "run", "--prices", "prices.json", "--format", "json")
    assert (js.returncode, js.stderr) == (0, unverified)
    data = json.loads(js.stdout)
    assert (data["verified"], data["unverified_reason"]) == (False, f"run/ledger.jsonl:2: {EDITED}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = ledger(tmp_path, "reprice", "run", "--prices", "prices.json", "-o", "new.jsonl")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (unverified + "cmbagent-batch: error: -o new.jsonl: run/ledger.jsonl does not verify, and a "
                        "repriced copy, chained afresh, would hide that: nothing written\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no new ledger, no temporary file
    # a rank journal has no chain to carry over either
    (run / "ledger").mkdir()
    (run / "ledger" / "rank-0000.jsonl").write_bytes(orjson.dumps(entry(3)) + b"\n")
    r = ledger(tmp_path, "reprice", "run/ledger/rank-0000.jsonl", "--prices", "prices.json", "-o", "new.jsonl")
    assert (r.returncode, r.stderr.splitlines()[0]) == (
        2, "UNVERIFIED: run/ledger/rank-0000.jsonl: a rank journal has no chain to verify")
    assert not (tmp_path / "new.jsonl").exists()


def test_report_and_summarize_agree_on_a_run_json_that_is_no_json(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path, [entry(1), entry(2)], budget=0.01)
    (run / "run.json").write_text("{bad")
    unverified = ("UNVERIFIED: run/run.json: not valid JSON (Expecting property name enclosed in double quotes: "
                  "line 1 column 2 (char 1))\n")
    summary = ledger(tmp_path, "summarize", "run")
    assert (summary.returncode, summary.stderr, summary.stdout.splitlines()[0] + "\n") == (0, unverified, unverified)
    r = ledger(tmp_path, "report", "run", "-o", "report.html")
    assert (r.returncode, r.stdout, r.stderr) == (0, unverified + "wrote report.html: 2 calls, $0.002\n", unverified)
    page = (tmp_path / "report.html").read_text()
    assert 'id="budget-used" data-value="">no budget set</div>' in page  # the budget was in the unreadable file
    # a good run.json: its budget, read once, with the chain's anchor
    (tmp_path / "ok").mkdir()
    run_dir(tmp_path / "ok", [entry(1), entry(2)], budget=0.01)
    r = ledger(tmp_path, "report", "ok/run", "-o", "ok.html")
    assert (r.returncode, r.stderr) == (0, "")
    assert '<span id="budget" data-value="0.01">$0.01</span>' in (tmp_path / "ok.html").read_text()


@pytest.mark.parametrize(("record", "problem"), [
    ({"entries": True}, "entries: expected an integer of at least 0, got true"),
    ({"entries": -1}, "entries: expected an integer of at least 0, got -1"),
    ({"entries": None}, "entries: expected an integer of at least 0, got null"),
    ({"entries": "absent"}, "entries: expected an integer of at least 0, got nothing"),
    ({"head": "abc"}, 'head: expected 64 lowercase hex digits, got "abc"'),
    ({"head": "A" * 64}, f'head: expected 64 lowercase hex digits, got "{"A" * 64}"'),
    ({"head": "a" * 100}, f'head: expected 64 lowercase hex digits, got "{"a" * 79}...'),
    ({"file": 7}, "file: expected a string, got 7"),
    (["not", "a", "record"], 'expected an object with entries and head, got ["not","a","record"]'),
])
def test_a_malformed_ledger_record_is_blamed_on_run_json(tmp_path: Path, record: Any, problem: str) -> None:
    run, _ = run_dir(tmp_path, [entry(1), entry(2)])
    manifest = read_run(run)
    if isinstance(record, dict):
        manifest["ledger"].update(record)
        if record.get("entries") == "absent":
            del manifest["ledger"]["entries"]
    else:
        manifest["ledger"] = record
    (run / "run.json").write_text(json.dumps(manifest))
    message = f"run/run.json: malformed ledger record ({problem})"
    r = ledger(tmp_path, "verify", "run")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")
    r = ledger(tmp_path, "verify", "run", "--run-json", "run/run.json")
    assert (r.returncode, r.stderr) == (2, f"cmbagent-batch: error: {message}\n")
    r = ledger(tmp_path, "summarize", "run", "--format", "json")
    assert (r.returncode, r.stderr, json.loads(r.stdout)["unverified_reason"]) == (0, f"UNVERIFIED: {message}\n",
                                                                                   message)


def test_a_run_json_with_no_ledger_record_is_not_malformed(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path, [entry(1)])
    (run / "run.json").write_text(json.dumps({"ledger": None}))
    r = ledger(tmp_path, "verify", "run")
    assert (r.returncode, r.stdout.splitlines()[1]) == (
        0, "no head hash to compare with (run.json beside it records no ledger): a cut at a line boundary would not "
           "show")
    assert ledger(tmp_path, "summarize", "run").stderr == ""


def test_a_rank_journal_is_said_to_have_no_chain(tmp_path: Path) -> None:
    journal = tmp_path / "run" / "ledger" / "rank-0000.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(b"".join(orjson.dumps(entry(n)) + b"\n" for n in (1, 2)))
    reason = "run/ledger/rank-0000.jsonl: a rank journal has no chain to verify"
    r = ledger(tmp_path, "summarize", "run/ledger/rank-0000.jsonl")
    assert (r.returncode, r.stderr, r.stdout.splitlines()[0]) == (0, f"UNVERIFIED: {reason}\n", f"UNVERIFIED: {reason}")
    r = ledger(tmp_path, "verify", "run/ledger/rank-0000.jsonl")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"cmbagent-batch: error: {reason}\n")
    r = ledger(tmp_path, "report", "run/ledger/rank-0000.jsonl", "-o", "report.html")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    assert (f'<td class="err" id="chain-status-0" data-value="unverified">UNVERIFIED: {reason}</td>'
            '<td class="n">0</td><td class="hash" id="chain-head-0">-</td>') in page


def in_terminals(tmp_path: Path, args: list[str], same: bool) -> tuple[str, str]:
    """``cmbagent-batch ARGS`` with stdout and stderr on terminals (pseudo-terminals): one for both when
    ``same``, else one each; what each terminal showed."""
    import os
    import pty

    from tests.helpers.cli import COMMAND, clean_env

    terminals = [pty.openpty() for _ in range(1 if same else 2)]
    out_tty, err_tty = terminals[0][1], terminals[-1][1]
    proc = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, env=clean_env(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=out_tty, stderr=err_tty)
    for _, follower in terminals:
        os.close(follower)
    shown = []
    for leader, _ in terminals:
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        shown.append(b"".join(chunks).decode().replace("\r\n", "\n"))
    assert proc.wait(timeout=60) == 0
    return shown[0], shown[-1]


def test_in_one_terminal_unverified_shows_once_and_first(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path, [entry(1), entry(2)])
    edit_cost(run / "ledger.jsonl", 1, b'"cost_usd":0.001', b'"cost_usd":0.5')
    line = f"UNVERIFIED: run/ledger.jsonl:1: {EDITED}\n"
    shown, _ = in_terminals(tmp_path, ["ledger", "summarize", "run"], same=True)
    assert shown.count("UNVERIFIED") == 1 and shown.startswith(line + "model ")
    shown, _ = in_terminals(tmp_path, ["ledger", "report", "run", "-o", "report.html"], same=True)
    assert shown == line + "wrote report.html: 2 calls, $0.501\n"
    out, err = in_terminals(tmp_path, ["ledger", "summarize", "run"], same=False)  # two terminals: each says it
    assert (out.startswith(line + "model "), err) == (True, line)


# --- the reader checks chains without the verify command's module -------------------------------------


def test_reading_a_ledger_does_not_import_the_verify_command() -> None:
    import sys

    code = ("import sys, cmbagent_batch.ledger.reader; "
            "print(sorted(m for m in sys.modules if m.startswith('cmbagent_batch.ledger.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cmbagent_batch.ledger.check" in loaded and "cmbagent_batch.ledger.verify" not in loaded


# --- the price tables and their dates -----------------------------------------------------------------


def test_the_report_names_each_price_table_with_its_date(tmp_path: Path) -> None:
    builtin = pricing.builtin_table()
    entries = [entry(1, price_table=builtin.id, price_table_date=builtin.date),
               entry(2, model="gpt-4.1", price_table="spec", price_table_date=None),
               entry(3, model="o4-mini", price_table=builtin.id),  # written before entries kept the date
               entry(4, model="gpt-4.1", price_table="spec"),  # the same, priced in the spec
               entry(5, model="gpt-5", price_table="negotiated-2024"),  # the same, a table no longer known
               entry(6, model="gpt-5", price_table="undated", price_table_date=None)]
    run_dir(tmp_path, entries)
    r = ledger(tmp_path, "report", "run", "-o", "report.html")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    section = page[page.index('<section id="prices">'):]
    section = section[:section.index("</section>")]
    rows = re.findall(r"<tr><td[^>]*>(.*?)</td><td[^>]*>(.*?)</td><td[^>]*>(.*?)</td>", section)
    assert builtin.date == "2025-08-15"
    assert rows == [(builtin.id, "2025-08-15", "gpt-4o-mini"), (builtin.id, "2025-08-15", "o4-mini"),
                    ("negotiated-2024", "unknown (older ledger)", "gpt-5"),
                    ("spec", "priced in the spec (no table)", "gpt-4.1"),
                    ("undated", "none given by the table", "gpt-5")]
    assert SPEC_TABLE == pricing.SPEC_TABLE


def test_a_call_recorded_now_keeps_its_price_tables_date(tmp_path: Path) -> None:
    from cmbagent_batch.ledger.costs import CallRecorder, Priced

    builtin = pricing.builtin_table()
    made = []
    for table, price in ((builtin.id, builtin.models["gpt-4o-mini"]), (pricing.SPEC_TABLE, pricing.Price(1.0, 2.0))):
        recorder = CallRecorder(run_dir=str(tmp_path), job="demo", run_id="run-1", rank=0, host="node1",
                                source="agent", task="t", attempt=1, agent="engineer",
                                model=Priced("m", "gpt-4o-mini", price, table))
        made.append(recorder.record(started="2026-11-27T23:00:00.000+00:00", latency_s=1.0, status="ok",
                                    prompt_tokens=10, completion_tokens=2))
        recorder.close()
    assert [(e["price_table"], e["price_table_date"]) for e in made] == [(builtin.id, builtin.date), ("spec", None)]
    journal = [orjson.loads(line) for line in (tmp_path / "ledger" / "rank-0000.jsonl").read_bytes().splitlines()]
    assert [list(e)[-1] for e in journal] == ["price_table_date"] * 2  # after the other fields


# --- money --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [
    (0.0, "$0.00"), (0.000238, "$0.000238"), (0.0002, "$0.0002"), (0.0000001234, "$0.000000123"),
    (0.0123, "$0.0123"), (0.24, "$0.24"), (0.119, "$0.119"), (0.5, "$0.50"), (0.009999, "$0.01"), (1.0, "$1.00"),
    (1234.5, "$1,234.50"), (-0.00176, "-$0.00176"), (-2.5, "-$2.50"),
    (-1.1102230246251565e-16, "$0.00"), (9.9e-11, "$0.00"), (2e-10, "$0.0000000002"),  # below 1e-10: drift
])
def test_money_has_enough_digits(value: float, shown: str) -> None:
    assert usd(value) == shown


def test_a_repriced_tiny_run_shows_its_real_figures(tmp_path: Path) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2)])
    (tmp_path / "prices.json").write_text(json.dumps({"id": "tiny", "date": "2026-01-05", "source": "test", "models": {
        "gpt-4o-mini": {"prompt_per_1m": 0.1, "completion_per_1m": 0.1}}}))
    r = ledger(tmp_path, "reprice", "ledger.jsonl", "--prices", "prices.json", "-o", "new.jsonl")
    # (1001 + 201) * 0.1 / 1e6 + (1002 + 202) * 0.1 / 1e6 = 0.0002406, against 2 x 0.001 before
    assert r.stdout == ("prices: tiny (prices.json)\n"
                        "model        priced_as    calls  old_cost_usd  new_cost_usd  change_usd\n"
                        "-----------  -----------  -----  ------------  ------------  ----------\n"
                        "gpt-4o-mini  gpt-4o-mini      2        $0.002     $0.000241   -$0.00176\n"
                        "TOTAL                         2        $0.002     $0.000241   -$0.00176\n")
    r = ledger(tmp_path, "report", "new.jsonl", "-o", "report.html", "--budget", "0.0002")
    assert r.stdout == "wrote report.html: 2 calls, $0.000241\n"
    page = (tmp_path / "report.html").read_text()
    assert 'id="total-cost" data-value="0.00024060000000000002">$0.000241</div>' in page
    assert ('id="budget-used" data-value="120.3">120.3%</div><div class="detail">$0.000241 of '
            '<span id="budget" data-value="0.0002">$0.0002</span>') in page
    assert '<td class="wrap">tiny</td><td class="price-date">2026-01-05</td>' in page
    assert ledger(tmp_path, "summarize", "new.jsonl").stdout.splitlines()[-1] == (
        "TOTAL            2       0   2,003     200         403          3  $0.000241")
    assert ledger(tmp_path, "diff", "new.jsonl", "new.jsonl").stdout == "identical: 2 calls, $0.000241\n"


def test_a_running_total_does_not_depend_on_the_order() -> None:
    costs = [0.1, 0.2, 0.3, 0.000183, 1e-5, 0.7, 0.000183, 0.3]
    seen = set()
    for order in itertools.permutations(costs):
        total = Total()
        for cost in order:
            total.add(cost)
        seen.add(total.value)
    assert seen == {math.fsum(costs)}
    parts = [Total(), Total()]
    for i, cost in enumerate(costs):
        parts[i % 2].add(cost)
    assert Total.of(parts) == math.fsum(costs)


def test_the_same_costs_in_another_order_differ_by_nothing(tmp_path: Path) -> None:
    write_chain(tmp_path / "a.jsonl", [entry(1, cost=0.1), entry(2, cost=0.2), entry(3, cost=0.3, task="x")])
    write_chain(tmp_path / "b.jsonl", [entry(3, cost=0.3, task="y"), entry(2, cost=0.2), entry(1, cost=0.1)])
    r = ledger(tmp_path, "diff", "a.jsonl", "b.jsonl")
    assert (r.returncode, r.stdout) == (1, "A: a.jsonl (3 calls)\nB: b.jsonl (3 calls)\n\n"
                                           "model        calls_a  calls_b  cost_a_usd  cost_b_usd  change_usd\n"
                                           "-----------  -------  -------  ----------  ----------  ----------\n"
                                           "gpt-4o-mini        3        3       $0.60       $0.60       $0.00\n"
                                           "TOTAL              3        3       $0.60       $0.60       $0.00\n\n"
                                           "different content: 1 call\n"
                                           '  run-1/0/4242/3 @ 2026-11-28T00:00:03.000+00:00: task "x" -> "y"\n')
    totals = [json.loads(ledger(tmp_path, "summarize", name, "--format", "json").stdout)["total"]["cost_usd"]
              for name in ("a.jsonl", "b.jsonl")]
    assert totals == [0.6, 0.6]
    (tmp_path / "prices.json").write_text(json.dumps({"id": "same", "models": {
        "gpt-4o-mini": {"prompt_per_1m": 0.15, "cached_prompt_per_1m": 0.075, "completion_per_1m": 0.6}}}))
    repriced = [json.loads(ledger(tmp_path, "reprice", name, "--prices", "prices.json", "--format", "json").stdout)
                ["total"]["old_cost_usd"] for name in ("a.jsonl", "b.jsonl")]
    assert repriced == [0.6, 0.6]


def test_budget_messages_show_sub_cent_amounts() -> None:
    assert budget_spent_message("job", 0.000238, 0.0002) == (
        "the job's LLM budget is spent: $0.000238 of job.budget_usd $0.0002")
    assert budget_spent_message("task", 0.0119, 0.01) == "the task's LLM budget is spent: $0.0119 of budget_usd $0.01"


# --- the JSON summary has every count -----------------------------------------------------------------


def test_summarize_json_has_errors_cached_and_reasoning_tokens(tmp_path: Path) -> None:
    entries = [entry(1, agent="engineer", status="error", cached_prompt_tokens=40, reasoning_tokens=5, cost=0.5),
               entry(2, agent="critic", cached_prompt_tokens=7, reasoning_tokens=0, cost=0.25),
               entry(3, agent="engineer", cached_prompt_tokens=1, reasoning_tokens=2, cost=0.125)]
    run_dir(tmp_path, entries)
    data = json.loads(ledger(tmp_path, "summarize", "run", "--by", "agent", "--format", "json").stdout)
    assert data == {
        "verified": True, "unverified_reason": None,
        "total": {"calls": 3, "errors": 1, "prompt_tokens": 3006, "cached_prompt_tokens": 48,
                  "completion_tokens": 606, "reasoning_tokens": 7, "cost_usd": 0.875},
        "groups": [
            {"key": {"agent": "engineer"}, "calls": 2, "errors": 1, "prompt_tokens": 2004,
             "cached_prompt_tokens": 41, "completion_tokens": 404, "reasoning_tokens": 7, "cost_usd": 0.625},
            {"key": {"agent": "critic"}, "calls": 1, "errors": 0, "prompt_tokens": 1002,
             "cached_prompt_tokens": 7, "completion_tokens": 202, "reasoning_tokens": 0, "cost_usd": 0.25},
        ]}


# --- the report's tables fit the page, in a real browser ----------------------------------------------

MEASURE = """<script>
document.body.setAttribute("data-overflow", JSON.stringify(Array.from(document.querySelectorAll("table"),
  t => { const s = t.closest("section"); return [s.id, s.scrollWidth, s.clientWidth]; })));
</script>"""


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280, 1400])
def test_chromium_shows_every_table_without_scrolling(tmp_path: Path, width: int) -> None:
    chromium = find_chromium()
    long_names = entry(1, agent="literature-reviewer-and-summariser", model="claude-sonnet-4-20250514",
                       prompt_tokens=5_000_000_000, completion_tokens=1_000_000_000, cost=1234.5)
    chains = [ChainStatus(f"{tmp_path}/scratch/cmb-pipeline/runs/lensing/ledger.jsonl", 2405, "e" * 64, None,
                          f"matches run.json: 2405 entries, head {'e' * 64}")]
    page = render_report(realistic() + HAND + [long_names], title="cmb-pipeline", budget_usd=50.0, chains=chains)
    # The page runs no script (its Content-Security-Policy says so): this copy measures itself.
    measured = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace("</body>",
                                                                                            MEASURE + "</body>")
    path = tmp_path / "measured.html"
    path.write_text(measured, encoding="utf-8")
    dom = run_chromium(chromium, tmp_path, f"--window-size={width},900", "--dump-dom", path.as_uri()).stdout
    found = re.search(r'data-overflow="([^"]*)"', dom)
    assert found, dom[:2000]
    sections = json.loads(found.group(1).replace("&quot;", '"'))
    assert [s[0] for s in sections] == ["chain", "by-model", "by-agent", "by-task", "prices", "failed"]
    assert [s for s in sections if s[1] > s[2]] == []  # scrollWidth <= clientWidth: nothing scrolls
    if width == 1400:  # by model and by agent side by side, each with its share column in view
        assert sections[1][2] == sections[2][2] < sections[3][2] / 2


# --- end to end: a run's ledger, then the same ledger edited ------------------------------------------


@pytest.mark.slow
def test_a_real_runs_ledger_verifies_and_an_edit_of_it_does_not(tmp_path: Path) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    from tests.helpers.cli import clean_env
    from tests.helpers.scripted_llm import Reply, ScriptedLLM

    usage = {"prompt_tokens": 1200, "completion_tokens": 30, "total_tokens": 1230,
             "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 10}}
    with ScriptedLLM([Reply("done", usage=usage)]) as srv:
        spec = tmp_path / "job.yaml"
        spec.write_text("version: 1\njob: {name: honest}\nllm:\n  default_model: m\n  models:\n"
                        f"    m: {{model: gpt-4o-mini, base_url: \"{srv.base_url}\", api_key_env: HONEST_KEY}}\n"
                        "tasks:\n  - {id: write, kind: agent, instructions: \"WRITE: say done\"}\n")
        r = cli(tmp_path, "run", str(spec), env=clean_env(tmp_path, HONEST_KEY="sk-test"), timeout=180)
        assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "honest"
    builtin = pricing.builtin_table()
    [line] = (run / "ledger.jsonl").read_bytes().splitlines()
    written = orjson.loads(line)
    assert (written["price_table"], written["price_table_date"]) == (builtin.id, builtin.date)
    cost = ((1200 - 200) * 0.15 + 200 * 0.075 + 30 * 0.6) / 1e6  # the shipped gpt-4o-mini prices: $0.000183
    assert written["cost_usd"] == pytest.approx(cost)
    summary = ledger(tmp_path, "summarize", str(run))
    assert (summary.stderr, summary.stdout.splitlines()[-2:]) == (
        "", ["TOTAL            1       0   1,200     200          30         10  $0.000183",
             "unresolved: 0 (every one of 1 calls sent has its result)"])
    edit_cost(run / "ledger.jsonl", 1, b'"cost_usd":' + str(written["cost_usd"]).encode(), b'"cost_usd":0.0')
    summary = ledger(tmp_path, "summarize", str(run))
    reason = f"{run / 'ledger.jsonl'}:1: {EDITED}"
    assert summary.stdout.splitlines()[0] == f"UNVERIFIED: {reason}" and summary.stderr == f"UNVERIFIED: {reason}\n"
    r = ledger(tmp_path, "report", str(run), "-o", "report.html")
    assert r.stdout.splitlines()[0] == f"UNVERIFIED: {reason}"
    page = (tmp_path / "report.html").read_text()
    assert f"<div>UNVERIFIED: {reason}</div>" in page
    assert f'<td class="wrap">{builtin.id}</td><td class="price-date">{builtin.date}</td>' in page
