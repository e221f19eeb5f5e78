"""Render the ``ledger report`` page for 100,000 ledger entries and load it in headless Chromium.

Run as ``python bench/bench_report.py [--entries N] [--keep DIR]`` with the interpreter of a venv where
cmbagent-batch is installed, on a machine with Debian's ``chromium`` (``apt-get install chromium``).
It generates N realistic entries (five models, six agents, ~200 tasks and the dependency analysis, ~2%
failed calls, spread over three days), then, in the same invocation:

* render: ``render_report`` in this process; baseline ``json.dumps`` of the same entries (one pass
  over every field of every entry);
* load: ``chromium --headless --dump-dom`` of the page; baseline the same command on an empty page
  (browser start-up), then a screenshot (1280x2000) that must be a real image;
* the result: PASS when the DOM Chromium built shows the totals of the entries (cost to the exact
  ``data-value``, calls, errors, tokens, budget percent) and the cost chart has at most 2,000 points.

``--keep DIR`` keeps ``report.html`` and ``report.png`` there. Exit status 0 whatever the timings; 1 when
Chromium is missing or the page does not render with the right totals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from specgen import Row, TempDir, load_note, print_table, secs, verdict

from cmbagent_batch.ledger.report import MAX_CHART_POINTS, render_report

# model -> (prompt, cached prompt, completion) USD per 1M tokens, weight in the mix
MODELS = {
    "gpt-4o": ((2.5, 1.25, 10.0), 3),
    "gpt-4o-mini": ((0.15, 0.075, 0.6), 6),
    "o3-mini": ((1.1, 0.55, 4.4), 2),
    "claude-sonnet-4": ((3.0, 0.3, 15.0), 2),
    "gemini-2.5-pro": ((1.25, 0.31, 10.0), 1),
}
AGENTS = ["engineer", "researcher", "planner", "reviewer", "executor", "summarizer"]
ERRORS = [
    "RateLimitError: Error code: 429 - Rate limit reached for requests",
    "APITimeoutError: Request timed out.",
    "APIConnectionError: Connection error.",
    "InternalServerError: Error code: 500 - The server had an error while processing your request.",
    "BadRequestError: Error code: 400 - maximum context length is 128000 tokens, requested 131072",
]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_entries(n: int, seed: int = 7) -> list[dict]:
    """``n`` ledger entries as a three-day batch of ~200 tasks would write them, in time order."""
    rng = random.Random(seed)
    names, weights = list(MODELS), [w for _, w in MODELS.values()]
    start = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)
    step = 3 * 86400 / max(n, 1)
    out = []
    for i in range(n):
        analysis = rng.random() < 0.01
        model = rng.choices(names, weights)[0]
        (p_in, p_cached, p_out), _ = MODELS[model]
        failed = rng.random() < 0.02
        prompt = 0 if failed else int(rng.lognormvariate(8.5, 0.8))
        cached = int(prompt * rng.choice((0, 0, 0.5, 0.8)))
        completion = 0 if failed else int(rng.lognormvariate(6.3, 0.9))
        reasoning = int(completion * 0.6) if model == "o3-mini" else 0
        cost = ((prompt - cached) * p_in + cached * p_cached + completion * p_out) / 1_000_000
        when = start + timedelta(seconds=i * step + rng.random() * step)
        out.append({
            "id": f"e{i:07d}", "job": "cmb-pipeline", "run_id": f"run-{1 + i * 3 // n}", "seq": i,
            "source": "analysis" if analysis else "agent",
            "task": None if analysis else f"fit-cl-{rng.randrange(200):03d}",
            "attempt": None if analysis else 1 + (rng.random() < 0.05), "call": rng.randrange(1, 40),
            "rank": rng.randrange(8), "host": f"nid{rng.randrange(1, 17):05d}", "pid": 4000 + rng.randrange(64),
            "agent": "dependency-analysis" if analysis else rng.choice(AGENTS),
            "model": model, "requested_model": model, "reported_model": None if failed else f"{model}-2025-01-31",
            "prompt_tokens": prompt, "cached_prompt_tokens": cached, "completion_tokens": completion,
            "reasoning_tokens": reasoning, "cost_usd": cost, "price_table": "builtin-2026-11",
            "price": {"prompt_per_1m": p_in, "cached_prompt_per_1m": p_cached, "completion_per_1m": p_out},
            "status": "error" if failed else "ok", "error": rng.choice(ERRORS) if failed else None,
            "latency_s": round(rng.uniform(0.4, 30.0), 3),
            "timestamp": when.isoformat(timespec="milliseconds"),
        })
    return out


def chromium(exe: str, profile: str, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          check=False, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    return time.perf_counter() - t, proc


def dom_value(dom: str, ident: str) -> str | None:
    m = re.search(rf'id="{ident}"[^>]*?data-value="([^"]*)"', dom)
    return m and m.group(1)


def check_dom(dom: str, entries: list[dict], budget: float) -> list[str]:
    """What the rendered page gets wrong about ``entries``; empty when it shows the right totals."""
    cost = math.fsum(e["cost_usd"] for e in entries)
    want = {
        "total-cost": repr(cost),
        "total-calls": str(len(entries)),
        "calls-error": str(sum(e["status"] == "error" for e in entries)),
        "total-tokens": str(sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries)),
        "budget-used": repr(100 * cost / budget),
    }
    wrong = [f"{k}: page shows {dom_value(dom, k)!r}, entries give {v!r}" for k, v in want.items()
             if dom_value(dom, k) != v]
    m = re.search(r'id="cost-line"[^>]*data-points="(\d+)"', dom)
    if not m or int(m.group(1)) > MAX_CHART_POINTS:
        wrong.append(f"cost chart: {m and m.group(1)!r} points, expected at most {MAX_CHART_POINTS}")
    if f">${cost:,.2f}<" not in dom:
        wrong.append(f"total cost card does not show ${cost:,.2f}")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000, metavar="N", help="ledger entries (default 100000)")
    parser.add_argument("--keep", metavar="DIR", help="write report.html and report.png there")
    args = parser.parse_args()
    exe = shutil.which("chromium")
    if exe is None:
        print("ERROR: chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    entries = make_entries(args.entries)
    budget = round(1.2 * math.fsum(e["cost_usd"] for e in entries) + 1, 0)
    rows: list[Row] = []
    t = time.perf_counter()
    json.dumps(entries)
    floor = time.perf_counter() - t
    t = time.perf_counter()
    page = render_report(entries, title=f"cmb-pipeline: {args.entries:,} calls", budget_usd=budget)
    rendered = time.perf_counter() - t
    rows.append(Row(f"json.dumps of {args.entries:,} entries (baseline)", secs(floor)))
    rows.append(Row(f"render_report, {args.entries:,} entries", secs(rendered), secs(floor),
                    f"{rendered / floor:.2f}x", "(report)"))
    rows.append(Row("  HTML size", f"{len(page.encode()) / 1e6:.2f} MB"))
    with TempDir() as tmp:
        out = args.keep or tmp
        os.makedirs(out, exist_ok=True)
        report, png, empty = (os.path.join(out, "report.html"), os.path.join(out, "report.png"),
                              os.path.join(tmp, "empty.html"))
        with open(report, "w", encoding="utf-8") as fh:
            fh.write(page)
        with open(empty, "w", encoding="utf-8") as fh:
            fh.write("<!DOCTYPE html><title>empty</title>")
        chromium(exe, os.path.join(tmp, "warm"), "--dump-dom", f"file://{empty}")  # page cache, not counted
        start, _ = chromium(exe, os.path.join(tmp, "p0"), "--dump-dom", f"file://{empty}")
        load, proc = chromium(exe, os.path.join(tmp, "p1"), "--dump-dom", f"file://{report}")
        shot, shot_proc = chromium(exe, os.path.join(tmp, "p2"), f"--screenshot={png}", "--window-size=1280,2000",
                                   f"file://{report}")
        rows.append(Row("chromium --dump-dom of an empty page (baseline)", secs(start)))
        rows.append(Row("chromium --dump-dom of the report", secs(load), secs(start), f"{load / start:.2f}x",
                        "(report)"))
        png_size = os.path.getsize(png) if os.path.exists(png) else 0
        rows.append(Row("chromium --screenshot 1280x2000", secs(shot), "-", "-", "(report)"))
        rows.append(Row("  PNG size", f"{png_size / 1e3:.0f} kB"))
        problems = check_dom(proc.stdout, entries, budget) if proc.returncode == 0 else [
            f"chromium exited {proc.returncode}: {proc.stderr[-1000:]}"]
        if shot_proc.returncode != 0 or png_size < 20_000:
            problems.append(f"screenshot: chromium exited {shot_proc.returncode}, {png_size} bytes")
        rows.append(Row(f"a report of {args.entries:,} entries renders in Chromium", "totals match" if not problems
                        else "wrong", target="renders, right totals", verdict=verdict(not problems)))
    version = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    notes = [load_note(), f"{exe}: {version.strip()}"]
    if args.keep:
        notes.append(f"kept {report} and {png}")
    print_table(f"cmbagent-batch ledger report ({sys.executable})", rows, notes)
    for message in problems:
        print(f"\nFAIL: {message}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
