"""``cmbagent-batch ledger ...``: summarize, verify, export, reprice, diff and report, on real files.

Most tests call ``cli.main`` in this process; those about exit codes, tracebacks and imports run the
real command in a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from cmbagent_batch import cli
from cmbagent_batch.ledger.chain import chain_lines
from cmbagent_batch.ledger.entry import FIELDS
from cmbagent_batch.ledger.export import CSV_COLUMNS
from tests.helpers.cli import cli as run_cli
from tests.helpers.ledger_entries import entry, head_of, write_chain


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["ledger", *args])
    out, err = capsys.readouterr()
    return code, out, err


def command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ledger ARGS`` in ``tmp_path``, in this process's environment (tests list what tmp_path holds)."""
    return run_cli(tmp_path, "ledger", *args, env=os.environ)


def mixed() -> list[dict[str, Any]]:
    """Calls over two days, three models, two ranks, tasks with two attempts, analysis calls, failures."""
    out = []
    for n in range(1, 41):
        task = None if n % 10 == 0 else f"sim-{n % 4}"
        out.append(entry(n, task=task, model=("gpt-4o-mini", "gpt-4.1", "o4-mini")[n % 3],
                         cost=round(0.001 * n + 0.0003 * (n % 5), 6), rank=n % 2, attempt=1 + n % 2,
                         agent=("engineer", "critic")[n % 2], status="error" if n % 9 == 0 else "ok",
                         day=n // 25))
    return out


# --- summarize ---


KEYS = {
    "model": lambda e: {"model": e["requested_model"]},
    "task": lambda e: {"task": e["task"]},
    "agent": lambda e: {"agent": e["agent"]},
    "rank": lambda e: {"rank": e["rank"]},
    "attempt": lambda e: {"task": e["task"], "attempt": e["attempt"]},
    "day": lambda e: {"day": e["timestamp"][:10]},
}


@pytest.mark.parametrize("by", list(KEYS))
def test_summarize_json_is_the_sums_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str], by: str) -> None:
    entries = mixed()
    write_chain(tmp_path / "a.jsonl", entries[:25])
    (tmp_path / "b.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries[25:]))  # a journal
    code, out, err = run(capsys, "summarize", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                         "--by", by, "--format", "json")
    unchained = f"{tmp_path / 'b.jsonl'}:1: not a chained ledger line (it does not start with seq and prev)"
    assert (code, err) == (0, f"UNVERIFIED: {unchained}\n")  # a journal has no chain
    counts = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")
    expected: dict[str, dict[str, Any]] = {}
    for e in entries:
        key = KEYS[by](e)
        g = expected.setdefault(json.dumps(key), {"key": key, "calls": 0, "errors": 0, **dict.fromkeys(counts, 0),
                                                  "cost_usd": []})
        g["calls"] += 1
        g["errors"] += e["status"] == "error"
        for c in counts:
            g[c] += e[c]
        g["cost_usd"].append(e["cost_usd"])
    for g in expected.values():
        g["cost_usd"] = math.fsum(g["cost_usd"])  # the sum correctly rounded, whatever the order
    printed = json.loads(out)
    assert (printed["verified"], printed["unverified_reason"]) == (False, unchained)
    assert printed["total"] == {"calls": 40, "errors": sum(e["status"] == "error" for e in entries),
                                **{c: sum(e[c] for e in entries) for c in counts},
                                "cost_usd": math.fsum(e["cost_usd"] for e in entries)}
    assert sorted(printed["groups"], key=lambda g: json.dumps(g["key"])) == \
        sorted(expected.values(), key=lambda g: json.dumps(g["key"]))
    costs = [g["cost_usd"] for g in printed["groups"]]
    assert costs == sorted(costs, reverse=True)


def test_summarize_table_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1, cost=0.5), entry(2, model="gpt-4.1", cost=1.25, status="error"),
                                            entry(3, cost=0.25)])
    code, out, _ = run(capsys, "summarize", str(tmp_path))  # a run directory: its ledger.jsonl
    assert code == 0
    assert out == textwrap.dedent("""\
        model        calls  errors  prompt  cached  completion  reasoning  cost_usd
        -----------  -----  ------  ------  ------  ----------  ---------  --------
        gpt-4.1          1       1   1,002     100         202          2     $1.25
        gpt-4o-mini      2       0   2,004     200         404          4     $0.75
        TOTAL            3       1   3,006     300         606          6     $2.00
        """)
    code, out, _ = run(capsys, "summarize", str(tmp_path), "--by", "attempt", "--format", "csv")
    assert out == textwrap.dedent("""\
        task,attempt,calls,errors,prompt_tokens,cached_prompt_tokens,completion_tokens,reasoning_tokens,cost_usd
        sim-1,1,3,1,3006,300,606,6,2.0
        """)


def test_summarize_of_an_empty_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ledger.jsonl").write_bytes(b"")
    code, out, _ = run(capsys, "summarize", str(tmp_path / "ledger.jsonl"), "--format", "json")
    assert code == 0
    assert json.loads(out) == {"verified": True, "unverified_reason": None,
                               "total": {"calls": 0, "errors": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                                         "completion_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.0},
                               "groups": []}


@pytest.mark.parametrize(("content", "message"), [
    (b"hello\n", "L:1: not a JSON object: a ledger holds one entry per line"),
    (b'{"task": "a", "state": "succeeded"}\n', "L:1: not a ledger entry: lacks id, job, run_id and 21 more fields"),
    (b"[1, 2]\n", "L:1: not a JSON object: a ledger holds one entry per line"),
    (orjson.dumps({**entry(1), "cost_usd": "free"}) + b"\n",
     "L:1: not a ledger entry: cost_usd: expected a number, got 'free'"),
    (orjson.dumps(entry(1)) + b"\n" + orjson.dumps(entry(2)) + b"\n{oops\n",
     "L:3: not a JSON object: a ledger holds one entry per line"),
    (orjson.dumps(entry(1)) + b"\n" + orjson.dumps({k: v for k, v in entry(2).items() if k != "requested_model"})
     + b"\n", "L:2: not a ledger entry: lacks requested_model"),
    (orjson.dumps(entry(1)) + b"\n" + orjson.dumps({**entry(2), "prompt_tokens": None}) + b"\n",
     "L:2: not a ledger entry: prompt_tokens: must not be null"),
    (orjson.dumps(entry(1)) + b"\n" + orjson.dumps(entry(2))[:90],
     "L:2: incomplete last line: the file ends in the middle of an entry"),
])
def test_summarize_names_the_bad_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "L").write_bytes(content)
    r = command(tmp_path, "summarize", "L")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")


def test_missing_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = command(tmp_path, "summarize", "nope.jsonl")
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: nope.jsonl: no such file\n")
    r = command(tmp_path, "verify", "empty")
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: empty: no ledger.jsonl in this directory\n")


# --- verify ---


@pytest.fixture
def chained(tmp_path: Path) -> tuple[Path, list[bytes]]:
    path = tmp_path / "run" / "ledger.jsonl"
    path.parent.mkdir()
    return path, write_chain(path, [entry(n) for n in range(1, 6)])


def test_verify_intact_without_an_anchor_says_so(chained: tuple[Path, list[bytes]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, lines = chained
    code, out, _ = run(capsys, "verify", str(path))
    assert code == 0
    assert out == (f"intact: 5 entries, head {head_of(lines)}\n"
                   "no head hash to compare with (no run.json beside the ledger; give --run-json FILE or "
                   "--head HASH --entries N): a cut at a line boundary would not show\n")


def test_verify_intact_against_run_json(chained: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, lines = chained
    record = {"file": "ledger.jsonl", "entries": 5, "head": head_of(lines), "cost_usd": 0.005}
    (path.parent / "run.json").write_text(json.dumps({"ledger": record}))
    code, out, _ = run(capsys, "verify", str(path.parent))
    assert (code, out) == (0, (f"intact: 5 entries, head {head_of(lines)}\n"
                               f"matches run.json: 5 entries, head {head_of(lines)}\n"))


def _edit_cost(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"cost_usd":0.001', b'"cost_usd":0.0001')
    return lines


def _forge(lines: list[bytes]) -> list[bytes]:
    """A line inserted after line 2 with a correct seq, prev and hash of its own."""
    prev = orjson.loads(lines[1])["hash"]
    [forged] = chain_lines([entry(99)], seq=2, prev=prev)
    return lines[:2] + [forged] + lines[2:]


@pytest.mark.parametrize(("tamper", "message"), [
    (_edit_cost, "3: the hash does not match the line: the entry was edited"),
    (lambda ls: ls[:2] + ls[3:], "3: seq 4 where 3 was expected: an entry before it was deleted, or lines were moved"),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]],
     "2: seq 3 where 2 was expected: an entry before it was deleted, or lines were moved"),
    (lambda ls: ls[:2] + [ls[1]] + ls[2:],
     "3: seq 2 where 3 was expected: an entry was inserted before it, or lines were moved"),
    (_forge, "4: seq 3 where 4 was expected: an entry was inserted before it, or lines were moved"),
    (lambda ls: ls[:4] + [ls[4][:300]], "5: incomplete last line (no newline at its end): the file was cut"),
    (lambda ls: ls[:4] + [ls[4][:-1]], "5: incomplete last line (no newline at its end): the file was cut"),
    (lambda ls: [ls[0].replace(b'"prev":"0', b'"prev":"1', 1), *ls[1:]],
     "1: prev is not 64 zeros for the first line: a line before it was replaced"),
])
def test_verify_finds_the_first_bad_line(chained: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str],
                                         tamper: Any, message: str) -> None:
    path, lines = chained
    path.write_bytes(b"".join(tamper(list(lines))))
    code, out, _ = run(capsys, "verify", str(path))
    assert (code, out) == (1, f"{path}:{message}\n")


def test_verify_sees_a_cut_at_a_line_boundary_with_run_json(chained: tuple[Path, list[bytes]]) -> None:
    path, lines = chained
    record = {"file": "ledger.jsonl", "entries": 5, "head": head_of(lines), "cost_usd": 0.005}
    (path.parent / "run.json").write_text(json.dumps({"ledger": record}))
    path.write_bytes(b"".join(lines[:3]))
    r = command(path.parent, "verify", "ledger.jsonl")
    assert (r.returncode, r.stderr) == (1, "")
    assert r.stdout == (f"ledger.jsonl: 3 entries where run.json records 5 (head {head_of(lines)}): "
                        "the last 2 entries were cut\n")


def test_verify_sees_a_rewritten_ledger_with_head_and_entries(chained: tuple[Path, list[bytes]],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, lines = chained
    other = write_chain(path, [entry(n, cost=0.5) for n in range(1, 6)])
    code, out, _ = run(capsys, "verify", str(path), "--head", head_of(lines), "--entries", "5")
    assert (code, out) == (1, (f"{path}: line 5 has hash {head_of(other)} where --head/--entries records head "
                               f"{head_of(lines)}: the ledger was rewritten\n"))


def test_verify_with_entries_added_after_run_json(chained: tuple[Path, list[bytes]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, lines = chained
    run_json = path.parent / "elsewhere.json"
    run_json.write_text(json.dumps({"ledger": {"file": "ledger.jsonl", "entries": 4,
                                               "head": orjson.loads(lines[3])["hash"]}}))
    code, out, _ = run(capsys, "verify", str(path), "--run-json", str(run_json))
    head = orjson.loads(lines[3])["hash"]
    assert (code, out.splitlines()[1]) == (0, f"matches run.json at line 4 (head {head}); 1 entry was added after it")


def test_verify_of_a_file_that_is_no_chain(tmp_path: Path) -> None:
    (tmp_path / "entries.jsonl").write_bytes(orjson.dumps(entry(1)) + b"\n")
    r = command(tmp_path, "verify", "entries.jsonl")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("cmbagent-batch: error: entries.jsonl:1: not a chained ledger line "
                        "(it does not start with seq and prev)\n")
    (tmp_path / "rank-0000.jsonl").write_bytes(orjson.dumps(entry(1)) + b"\n")  # a rank journal, named so
    r = command(tmp_path, "verify", "rank-0000.jsonl")
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: rank-0000.jsonl: a rank journal has no chain to "
                                           "verify\n")


def test_verify_flags_go_together(chained: tuple[Path, list[bytes]]) -> None:
    path, _ = chained
    r = command(path.parent, "verify", "ledger.jsonl", "--head", "ab" * 32)
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: --head and --entries go together\n")


# --- export ---


def test_export_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = [entry(1), entry(2, task=None, status="error")]
    write_chain(tmp_path / "ledger.jsonl", entries)
    code, out, _ = run(capsys, "export", str(tmp_path / "ledger.jsonl"), "--format", "json")
    assert (code, json.loads(out)) == (0, entries)
    code, _, _ = run(capsys, "export", str(tmp_path), "-o", str(tmp_path / "out.csv"))
    rows = list(csv.reader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[0][20:23] == ["price_prompt_per_1m", "price_cached_prompt_per_1m", "price_completion_per_1m"]
    assert rows[1][20:23] == ["0.15", "0.075", "0.6"]
    assert dict(zip(rows[0], rows[2]))["task"] == ""  # null
    assert dict(zip(rows[0], rows[2]))["error"] == "HTTP 500: boom"
    assert len(rows) == 3


def test_export_json_of_no_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ledger.jsonl").write_bytes(b"")
    assert run(capsys, "export", str(tmp_path), "--format", "json")[1] == "[]\n"


# --- reprice ---


def prices(tmp_path: Path, models: dict[str, dict[str, float]]) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"id": "negotiated-2026", "date": "2026-11-01", "source": "contract",
                                "models": models}))
    return path


def test_reprice_compares_old_and_new_cost_by_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1, cost=0.5), entry(2, model="gpt-4.1", cost=1.0), entry(3)])
    table = prices(tmp_path, {"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                              "gpt-4.1": {"prompt_per_1m": 10.0, "cached_prompt_per_1m": 0.0, "completion_per_1m": 0}})
    code, out, _ = run(capsys, "reprice", str(tmp_path), "--prices", str(table), "--format", "json")
    mini = (1001 + 1003 + 2 * (201 + 203)) / 1e6  # cached tokens at the prompt price
    big = (1002 - 100) * 10.0 / 1e6
    assert (code, json.loads(out)) == (0, {
        "verified": True, "unverified_reason": None,
        "prices": "negotiated-2026",
        "total": {"calls": 3, "old_cost_usd": 1.501, "new_cost_usd": pytest.approx(mini + big)},
        "groups": [  # most expensive at the new prices first
            {"model": "gpt-4.1", "priced_as": "gpt-4.1", "calls": 1, "old_cost_usd": 1.0,
             "new_cost_usd": pytest.approx(big)},
            {"model": "gpt-4o-mini", "priced_as": "gpt-4o-mini", "calls": 2, "old_cost_usd": 0.501,
             "new_cost_usd": pytest.approx(mini)},
        ]})
    code, out, _ = run(capsys, "reprice", str(tmp_path), "--prices", str(table))
    assert out.splitlines()[:2] == [f"prices: negotiated-2026 ({table})",
                                    "model        priced_as    calls  old_cost_usd  new_cost_usd  change_usd"]


def test_reprice_writes_a_new_chained_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2)])
    table = prices(tmp_path, {"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}})
    code, _, err = run(capsys, "reprice", str(tmp_path / "ledger.jsonl"), "--prices", str(table),
                       "-o", str(tmp_path / "new.jsonl"))
    assert (code, err) == (0, f"wrote {tmp_path / 'new.jsonl'}: 2 entries, repriced with negotiated-2026\n")
    assert run(capsys, "verify", str(tmp_path / "new.jsonl"))[0] == 0
    new = [orjson.loads(line) for line in (tmp_path / "new.jsonl").read_bytes().splitlines()]
    assert [e["price_table"] for e in new] == ["negotiated-2026"] * 2
    assert new[0]["price"] == {"prompt_per_1m": 1.0, "cached_prompt_per_1m": None, "completion_per_1m": 2.0}
    assert new[0]["cost_usd"] == (1001 + 2 * 201) / 1e6
    assert run(capsys, "summarize", str(tmp_path / "new.jsonl"), "--format", "json")[0] == 0


def test_reprice_lists_the_models_it_has_no_price_for(tmp_path: Path) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2, model="o4-mini"), entry(3, model="gpt-4.1")])
    prices(tmp_path, {"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}})
    r = command(tmp_path, "reprice", "ledger.jsonl", "--prices", "prices.json", "-o", "new.jsonl")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "cmbagent-batch: error: prices.json: no price for 2 models of the ledger: gpt-4.1, o4-mini\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "prices.json"]


def test_reprice_refuses_a_bad_table_and_overwriting_its_input(tmp_path: Path) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1)])
    (tmp_path / "bad.json").write_text('{"id": "x", "models": {"m": {"prompt_per_1m": -1, "completion_per_1m": 1}}}')
    r = command(tmp_path, "reprice", "ledger.jsonl", "--prices", "bad.json")
    assert r.stderr == ("cmbagent-batch: error: bad.json: models.m.prompt_per_1m: expected a number >= 0, "
                        "got -1\n")
    prices(tmp_path, {"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}})
    r = command(tmp_path, "reprice", ".", "--prices", "prices.json", "-o", "ledger.jsonl")
    assert (r.returncode, r.stderr) == (2, ("cmbagent-batch: error: -o ledger.jsonl: that is the ledger being "
                                            "repriced; write the new one elsewhere\n"))


# --- diff ---


def test_diff_of_the_same_calls_in_another_chain_is_identical(tmp_path: Path) -> None:
    entries = [entry(n) for n in range(1, 4)]
    write_chain(tmp_path / "a.jsonl", entries)
    write_chain(tmp_path / "b.jsonl", entries[::-1])
    r = command(tmp_path, "diff", "a.jsonl", "b.jsonl")
    assert (r.returncode, r.stdout, r.stderr) == (0, "identical: 3 calls, $0.003\n", "")


def test_diff_lists_what_differs(tmp_path: Path) -> None:
    write_chain(tmp_path / "a.jsonl", [entry(1), entry(2), entry(3)])
    write_chain(tmp_path / "b.jsonl", [entry(1), entry(3, cost=0.5), entry(4, model="gpt-4.1")])
    r = command(tmp_path, "diff", "a.jsonl", "b.jsonl")
    ts = [entry(n)["timestamp"] for n in (2, 3, 4)]
    assert (r.returncode, r.stderr) == (1, "")
    assert r.stdout == textwrap.dedent(f"""\
        A: a.jsonl (3 calls)
        B: b.jsonl (3 calls)

        model        calls_a  calls_b  cost_a_usd  cost_b_usd  change_usd
        -----------  -------  -------  ----------  ----------  ----------
        gpt-4.1            0        1       $0.00      $0.001      $0.001
        gpt-4o-mini        3        2      $0.003      $0.501      $0.498
        TOTAL              3        3      $0.003      $0.502      $0.499

        only in A: 1 call
          run-1/0/4242/2 @ {ts[0]}

        only in B: 1 call
          run-1/0/4242/4 @ {ts[2]}

        different content: 1 call
          run-1/0/4242/3 @ {ts[1]}: cost_usd 0.001 -> 0.5
        """)


# --- report ---


def test_report_writes_the_page_with_the_budget_of_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cmbagent_batch.ledger.report")
    from cmbagent_batch.ledger import report

    seen: dict[str, Any] = {}

    def render(entries: list[dict[str, Any]], *, title: str, budget_usd: float | None, unresolved: Any,
               chains: Any, table_dates: Any) -> str:
        seen.update(entries=entries, title=title, budget=budget_usd, unresolved=unresolved,
                    verified=[c.verified for c in chains])
        return "<!doctype html><title>t</title>"

    monkeypatch.setattr(report, "render_report", render)
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2)])
    (tmp_path / "run.json").write_text(json.dumps({"budget_usd": 12.5}))
    code, out, _ = run(capsys, "report", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert (code, out) == (0, f"wrote {tmp_path / 'r.html'}: 2 calls, $0.002\n")
    assert (tmp_path / "r.html").read_text() == "<!doctype html><title>t</title>"
    assert seen == {"entries": [entry(1), entry(2)], "title": "Cost ledger: demo", "budget": 12.5,
                    "unresolved": None, "verified": [True]}
    run(capsys, "report", str(tmp_path), "-o", str(tmp_path / "r.html"), "--budget", "3")
    assert seen["budget"] == 3.0


def test_report_with_the_real_renderer(tmp_path: Path) -> None:
    pytest.importorskip("cmbagent_batch.ledger.report")
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2, status="error")])
    r = command(tmp_path, "report", "ledger.jsonl", "-o", "report.html", "--budget", "1")
    assert (r.returncode, r.stderr) == (0, "")
    assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html>")


# --- the command itself ---


BLOCKER = """\
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ag2", "autogen", "openai"):
            raise ImportError(f"{name} imported by a ledger command")
sys.meta_path.insert(0, Block())
from cmbagent_batch.cli.main import main
codes = [main(args) for args in ARGS]
assert not [m for m in sys.modules if m.split(".")[0] in ("ag2", "autogen", "openai")]
print(codes)
"""


def test_ledger_commands_import_no_llm_client(tmp_path: Path) -> None:
    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2)])
    prices(tmp_path, {"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}})
    args = [["ledger", "summarize", "ledger.jsonl"], ["ledger", "verify", "."], ["ledger", "export", "."],
            ["ledger", "reprice", ".", "--prices", "prices.json"], ["ledger", "diff", ".", "ledger.jsonl"]]
    if (Path(cli.__file__).parent.parent / "ledger" / "report.py").exists():
        args.append(["ledger", "report", ".", "-o", "r.html"])
    r = subprocess.run([sys.executable, "-c", BLOCKER.replace("ARGS", repr(args))], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert (r.returncode, r.stdout.splitlines()[-1]) == (0, str([0] * len(args))), r.stderr


def test_ledger_help_and_schema(tmp_path: Path) -> None:
    r = command(tmp_path, "--help")
    assert r.returncode == 0
    for sub in ("summarize", "verify", "export", "reprice", "diff", "report"):
        assert sub in r.stdout
    r = run_cli(tmp_path, "schema", "ledger-entry")
    assert (r.returncode, json.loads(r.stdout)["$id"]) == (0, "urn:cmbagent-batch:schema:ledger-entry:1")
    assert list(json.loads(r.stdout)["required"]) == list(FIELDS)
