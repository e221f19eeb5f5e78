"""``cmbagent-batch ledger ...``: offline commands on cost ledgers (summarize, verify, export, reprice,
diff, report). They need only the core install and import no LLM client; each imports its module
when it runs, so the CLI starts fast. ``summarize``, ``report`` and ``reprice`` verify each chain as they
read it and say ``UNVERIFIED: <why>`` first when one does not verify; ``reprice -o`` refuses to write a
freshly chained copy of a ledger that does not verify.
"""

from __future__ import annotations

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
from cmbagent_batch.errors import ExitCode

if TYPE_CHECKING:
    from cmbagent_batch.ledger.verdict import ChainStatus


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

    from cmbagent_batch.ledger.check import verification_json
    from cmbagent_batch.ledger.intents import Intents
    from cmbagent_batch.ledger.reader import consume
    from cmbagent_batch.ledger.summary import Summary, unresolved_json, unresolved_text

    summary = Summary(args.by)
    intents = Intents()
    chains = consume(args.ledgers, summary.add_all, intents, verify=True)
    if args.format == "json":
        data = {**verification_json(chains), **summary.to_json()}
        if intents.files:  # ledgers from before intents print as they did
            data.update(unresolved_json(intents))
        _warn_unverified(chains, on_stdout=False)
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    elif args.format == "csv":  # stdout stays CSV
        _warn_unverified(chains, on_stdout=False)
        sys.stdout.write(summary.csv())
    else:
        _warn_unverified(chains, on_stdout=True)
        sys.stdout.write(summary.table() + (unresolved_text(intents) if intents.files else ""))
    return ExitCode.OK


def _warn_unverified(chains: list[ChainStatus], on_stdout: bool) -> None:
    """``UNVERIFIED: <why>`` for each chain that did not verify: on stderr, and (``on_stdout``) first on stdout
    too, unless both are the same terminal, where it would show twice."""
    from cmbagent_batch.ledger.check import unverified_lines

    text = "".join(f"{line}\n" for line in unverified_lines(chains))
    if not text:
        return
    if on_stdout and not _same_terminal(sys.stdout, sys.stderr):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stderr.write(text)
    sys.stderr.flush()


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    """Whether ``a`` and ``b`` write to one terminal (the same device and inode)."""
    try:
        fa, fb = a.fileno(), b.fileno()
        if not (os.isatty(fa) and os.isatty(fb)):
            return False
        sa, sb = os.fstat(fa), os.fstat(fb)
    except (OSError, ValueError):  # io.UnsupportedOperation (no file descriptor) is a ValueError and OSError
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def verify(args: LedgerVerifyOptions) -> int:
    from cmbagent_batch.errors import LedgerError
    from cmbagent_batch.ledger.chain import NOT_CHAINED
    from cmbagent_batch.ledger.check import JOURNAL, anchor_note, first_problem
    from cmbagent_batch.ledger.files import is_journal, resolve
    from cmbagent_batch.ledger.intents import Intents
    from cmbagent_batch.ledger.summary import unresolved_text
    from cmbagent_batch.ledger.verify import read_chain, recorded_anchor

    path = resolve(args.ledger)
    if is_journal(path):
        raise LedgerError(f"{path}: {JOURNAL}")
    anchor, why_none = recorded_anchor(path, args.run_json, args.head, args.entries)
    intents = Intents()
    intents.open(path)  # the intents file beside, scanned and its chain checked in one read
    verdict = read_chain(path, anchor.entries if anchor else 0, intents)  # pairs them as it goes
    intents.close()
    if verdict.bad_line == 1 and (verdict.problem or "").startswith(NOT_CHAINED):
        raise LedgerError(f"{path}:1: {verdict.problem}")
    problem = first_problem(path, verdict, anchor, None)
    if problem:
        print(problem)
        return ExitCode.FAILED
    print(f"intact: {verdict.entries} entries, head {verdict.head}")
    print(anchor_note(verdict, anchor, why_none))
    checked = intents.chains.get(path)
    if checked is not None:
        intents_file, chain = checked
        if not chain.intact:
            print(first_problem(path, verdict, None, checked))
            return ExitCode.FAILED
        print(f"intents intact: {chain.entries} intents, head {chain.head} ({os.path.basename(intents_file)})")
        sys.stdout.write(unresolved_text(intents, after_table=False))
    return ExitCode.OK


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
    from cmbagent_batch.ledger.check import verification_json
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
        chains = consume([source], repricer.add_all, verify=True)
        refused = bool(args.output) and not chains[0].verified
        _warn_unverified(chains, on_stdout=args.format == "table" and not refused)
        if refused:  # raised inside the block: the new file is not written
            raise UsageError(f"-o {args.output}: {source} does not verify, and a repriced copy, chained afresh, "
                             "would hide that: nothing written")
        if repricer.missing:
            names = sorted(repricer.missing)
            raise LedgerError(f"{args.prices}: no price for {len(names)} model{'s' if len(names) != 1 else ''} "
                              f"of the ledger: {', '.join(names)}")
    if args.format == "json":
        data = {**verification_json(chains), **repricer.to_json()}
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
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
    from cmbagent_batch.ledger.money import usd
    from cmbagent_batch.ledger.reader import consume

    a, b = Side(), Side()
    consume([args.a], a.add_all)
    consume([args.b], b.add_all)
    found = compare(a, b)
    if found.identical:
        print(f"identical: {len(a.digests)} calls, {usd(a.cost_usd)}")
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
    import math

    from cmbagent_batch.ledger.entry import entry_fields
    from cmbagent_batch.ledger.intents import UNKNOWN, Intents
    from cmbagent_batch.ledger.money import usd
    from cmbagent_batch.ledger.reader import consume
    from cmbagent_batch.ledger.report import render_report
    from cmbagent_batch.rundir.atomic import writable_output, write_atomic
    from cmbagent_batch.spec.pricing import builtin_table

    writable_output(args.output)
    entries: list[dict[str, Any]] = []
    intents = Intents()
    chains = consume(args.ledgers, lambda reader: entries.extend(entry_fields(e) for e in reader), intents,
                     verify=True)
    budget = args.budget
    if budget is None and len(chains) == 1 and chains[0].run_json is not None:  # as read to verify the chain
        value = chains[0].run_json.get("budget_usd")
        budget = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    jobs = sorted({e["job"] for e in entries})
    title = f"Cost ledger: {', '.join(jobs) if jobs else ', '.join(args.ledgers)}"
    unresolved = intents.unresolved
    shipped = builtin_table()
    page = render_report(entries, title=title, budget_usd=budget,
                         unresolved=unresolved if intents.files else None,  # None: a ledger from before intents
                         chains=chains, table_dates={shipped.id: shipped.date} if shipped.date else {})
    write_atomic(args.output, page.encode("utf-8"))
    cost = math.fsum(e["cost_usd"] for e in entries)
    unknown = f", {len(unresolved)} more sent with no result ({UNKNOWN})" if unresolved else ""
    _warn_unverified(chains, on_stdout=True)
    print(f"wrote {args.output}: {len(entries)} calls, {usd(cost)}{unknown}")
    return ExitCode.OK
