"""``cmbagent-batch ledger ...``: offline commands on cost ledgers (summarize, verify, export, reprice,
diff, report). They need only the core install and import no LLM client; each imports its module
when it runs, so the CLI starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, TYPE_CHECKING, Any

from cmbagent_batch.cli.options import (
    LedgerDiffOptions,
    LedgerExportOptions,
    LedgerOptions,
    LedgerReportOptions,
    LedgerRepriceOptions,
    LedgerSummarizeOptions,
    LedgerVerifyOptions,
)
from cmbagent_batch.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from cmbagent_batch.ledger.verify import Anchor


def ledger(opts: LedgerOptions) -> int:
    """Run one ``ledger`` subcommand."""
    match opts:
        case LedgerSummarizeOptions():
            return summarize(opts)
        case LedgerVerifyOptions():
            return verify(opts)
        case LedgerExportOptions():
            return export(opts)
        case LedgerRepriceOptions():
            return reprice(opts)
        case LedgerDiffOptions():
            return diff(opts)
        case LedgerReportOptions():
            return report(opts)


def summarize(args: LedgerSummarizeOptions) -> int:
    import orjson

    from cmbagent_batch.ledger.intents import Intents
    from cmbagent_batch.ledger.reader import consume
    from cmbagent_batch.ledger.summary import Summary, unresolved_json, unresolved_text

    summary = Summary(args.by)
    intents = Intents()
    consume(args.ledgers, summary.add_all, intents)
    if args.format == "json":
        data = summary.to_json()
        if intents.files:  # ledgers from before intents print as they did
            data.update(unresolved_json(intents))
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    elif args.format == "csv":
        sys.stdout.write(summary.csv())
    else:
        sys.stdout.write(summary.table() + (unresolved_text(intents) if intents.files else ""))
    return ExitCode.OK


def verify(args: LedgerVerifyOptions) -> int:
    from cmbagent_batch.errors import LedgerError
    from cmbagent_batch.ledger.files import resolve
    from cmbagent_batch.ledger.summary import unresolved_text
    from cmbagent_batch.ledger.verify import anchor_problem, check_chain, check_intents

    path = resolve(args.ledger)
    anchor, why_none = _anchor(args, path)
    verdict = check_chain(path, anchor.entries if anchor else 0)
    if verdict.bad_line == 1 and (verdict.problem or "").startswith("not a chained ledger line"):
        raise LedgerError(f"{path}:1: {verdict.problem}")
    if not verdict.intact:
        print(f"{path}:{verdict.bad_line}: {verdict.problem}")
        return ExitCode.FAILED
    problem = anchor_problem(verdict, anchor) if anchor else None
    if problem:
        print(f"{path}: {problem}")
        return ExitCode.FAILED
    print(f"intact: {verdict.entries} entries, head {verdict.head}")
    if anchor is None:
        print(f"no head hash to compare with{why_none}: a cut at a line boundary would not show")
    elif verdict.entries == anchor.entries:
        print(f"matches {anchor.source}: {anchor.entries} entries, head {anchor.head}")
    else:
        added = verdict.entries - anchor.entries
        print(f"matches {anchor.source} at line {anchor.entries} (head {anchor.head}); "
              f"{added} {'entry was' if added == 1 else 'entries were'} added after it")
    checked = check_intents(path)
    if checked is not None:
        intents_file, chain, intents = checked
        if not chain.intact:
            print(f"{intents_file}:{chain.bad_line}: {chain.problem}")
            return ExitCode.FAILED
        print(f"intents intact: {chain.entries} intents, head {chain.head} ({os.path.basename(intents_file)})")
        sys.stdout.write(unresolved_text(intents, after_table=False))
    return ExitCode.OK


def _anchor(args: LedgerVerifyOptions, path: str) -> tuple[Anchor | None, str]:
    """The recorded end to compare with, or None and why there is none (worded for the output)."""
    from cmbagent_batch.ledger.reader import run_json_beside
    from cmbagent_batch.ledger.verify import Anchor

    if (args.head is None) != (args.entries is None):
        raise UsageError("--head and --entries go together")
    if args.head is not None and args.entries is not None:
        if len(args.head) != 64 or set(args.head) - set("0123456789abcdef"):
            raise UsageError(f"--head: expected 64 lowercase hex digits, got {args.head!r}")
        return Anchor(args.entries, args.head, "--head/--entries"), ""
    given = args.run_json is not None
    run_json = args.run_json if args.run_json is not None else run_json_beside(path)
    if not given and not os.path.isfile(run_json):
        return None, " (no run.json beside the ledger; give --run-json FILE or --head HASH --entries N)"
    record = _read_json(run_json).get("ledger")
    name = os.path.basename(path)
    if not isinstance(record, dict) or not isinstance(record.get("entries"), int) \
            or not isinstance(record.get("head"), str):
        if given:
            raise UsageError(f"{run_json}: no ledger record (entries and head) to compare with")
        return None, " (run.json beside it records no ledger)"
    if not given and record.get("file", name) != name:
        return None, f" (run.json beside it records {record.get('file')}, not {name})"
    return Anchor(record["entries"], record["head"], "run.json"), ""


def _read_json(path: str) -> Any:

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def export(args: LedgerExportOptions) -> int:
    from cmbagent_batch.ledger.export import Exporter
    from cmbagent_batch.ledger.reader import consume
    from cmbagent_batch.rundir.atomic import atomic_output, writable_output

    if args.output:
        writable_output(args.output)

    def write(out: IO[bytes]) -> None:
        exporter = Exporter(out, args.format)
        consume([args.ledger], exporter.add_all)
        exporter.close()

    if args.output:
        with atomic_output(args.output) as out:
            write(out)
    else:
        write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return ExitCode.OK


def reprice(args: LedgerRepriceOptions) -> int:
    import contextlib

    import orjson

    from cmbagent_batch.errors import LedgerError, UsageError
    from cmbagent_batch.ledger.files import resolve
    from cmbagent_batch.ledger.reader import consume
    from cmbagent_batch.ledger.reprice import Repricer
    from cmbagent_batch.rundir.atomic import atomic_output, writable_output
    from cmbagent_batch.spec.pricing import load_table

    if args.output:
        writable_output(args.output)
    try:
        table = load_table(args.prices)
    except OSError as exc:
        raise UsageError(f"{args.prices}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    source = resolve(args.ledger)
    if args.output and os.path.abspath(args.output) == os.path.abspath(source):
        raise UsageError(f"-o {args.output}: that is the ledger being repriced; write the new one elsewhere")
    with atomic_output(args.output) if args.output else contextlib.nullcontext() as out:
        repricer = Repricer(table, out)
        consume([source], repricer.add_all)
        if repricer.missing:
            names = sorted(repricer.missing)
            raise LedgerError(f"{args.prices}: no price for {len(names)} model{'s' if len(names) != 1 else ''} "
                              f"of the ledger: {', '.join(names)}")
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(repricer.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
    elif args.format == "csv":
        sys.stdout.write(repricer.csv())
    else:
        sys.stdout.write(f"prices: {table.id} ({args.prices})\n{repricer.table_text()}")
    if args.output:
        print(f"wrote {args.output}: {repricer.entries_written} entries, repriced with {table.id}", file=sys.stderr)
    return ExitCode.OK


def diff(args: LedgerDiffOptions) -> int:
    from cmbagent_batch.ledger.diff import (
        SHOWN,
        Picker,
        Side,
        changed_fields,
        compare,
        listing,
        model_table,
    )
    from cmbagent_batch.ledger.reader import consume

    a, b = Side(), Side()
    consume([args.a], a.add_all)
    consume([args.b], b.add_all)
    found = compare(a, b)
    if found.identical:
        cost = sum(m[1] for m in a.models.values())
        print(f"identical: {len(a.digests)} calls, {cost:.6f} USD")
        return ExitCode.OK
    shown = found.changed[:SHOWN]
    in_a, in_b = Picker(shown), Picker(shown)
    consume([args.a], in_a.add_all)
    consume([args.b], in_b.add_all)
    how = {k: changed_fields(in_a.found[k], in_b.found[k]) for k in shown}
    sys.stdout.write(f"A: {args.a} ({len(a.digests)} calls)\nB: {args.b} ({len(b.digests)} calls)\n\n"
                     + model_table(a, b)
                     + "".join("\n" + text for text in (listing("only in A", found.only_a),
                                                        listing("only in B", found.only_b),
                                                        listing("different content", found.changed, how)) if text))
    return ExitCode.FAILED


def report(args: LedgerReportOptions) -> int:
    from cmbagent_batch.ledger.entry import FIELDS
    from cmbagent_batch.ledger.reader import consume, run_json_beside
    from cmbagent_batch.ledger.report import render_report
    from cmbagent_batch.rundir.atomic import writable_output, write_atomic

    writable_output(args.output)
    from cmbagent_batch.ledger.intents import UNKNOWN, Intents

    entries: list[dict[str, Any]] = []
    intents = Intents()
    consume(args.ledgers, lambda reader: entries.extend({k: e[k] for k in FIELDS} for e in reader), intents)
    budget = args.budget
    if budget is None and len(args.ledgers) == 1 and os.path.isfile(run_json_beside(args.ledgers[0])):
        value = _read_json(run_json_beside(args.ledgers[0])).get("budget_usd")
        budget = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    jobs = sorted({e["job"] for e in entries})
    title = f"Cost ledger: {', '.join(jobs) if jobs else ', '.join(args.ledgers)}"
    unresolved = intents.unresolved
    if intents.files:
        page = render_report(entries, title=title, budget_usd=budget, unresolved=unresolved)
    else:  # a ledger from before intents
        page = render_report(entries, title=title, budget_usd=budget)
    write_atomic(args.output, page.encode("utf-8"))
    cost = sum(e["cost_usd"] for e in entries)
    unknown = f", {len(unresolved)} more sent with no result ({UNKNOWN})" if unresolved else ""
    print(f"wrote {args.output}: {len(entries)} calls, {cost:.6f} USD{unknown}")
    return ExitCode.OK
