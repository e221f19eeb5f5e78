"""The ``ledger report`` page: its figures, escaping and caps, and the page as real headless Chromium renders it.

The browser tests need Debian's ``chromium`` on PATH (``apt-get install chromium``); without it they fail,
unless ``CMBAGENT_BATCH_NO_BROWSER=1`` is set, which skips them.
"""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cmbagent_batch.ledger.report import (
    MAX_CHART_POINTS,
    MAX_FAILED_ROWS,
    render_report,
)
from tests.helpers.browser import find_chromium, run_chromium

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"onmouseover=alert(2) x="'


def entry(**fields: Any) -> dict[str, Any]:
    """A ledger entry of an ok agent call; ``fields`` override."""
    e: dict[str, Any] = {
        "id": "e1", "job": "demo", "run_id": "run-1", "source": "agent", "task": "fit", "attempt": 1, "call": 1,
        "rank": 0, "host": "nid00001", "pid": 100, "agent": "engineer", "model": "gpt-4o",
        "requested_model": "gpt-4o", "reported_model": "gpt-4o-2024-08-06", "prompt_tokens": 0,
        "cached_prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.0,
        "price_table": "builtin", "price": {"prompt_per_1m": 2.5, "cached_prompt_per_1m": 1.25,
                                            "completion_per_1m": 10.0},
        "status": "ok", "error": None, "latency_s": 1.0, "timestamp": "2026-11-27T23:00:00.123+00:00",
    }
    e.update(fields)
    return e


# Four calls whose totals are worked out by hand below (costs exact in binary floating point).
HAND = [
    entry(task="fit-a", prompt_tokens=1000, cached_prompt_tokens=200, completion_tokens=300, cost_usd=0.5,
          timestamp="2026-11-27T23:00:00.500+00:00"),
    entry(task="fit-a", attempt=2, agent="reviewer", model="o3-mini", requested_model="o3-mini",
          prompt_tokens=2000, completion_tokens=500, reasoning_tokens=400, cost_usd=0.25,
          timestamp="2026-11-27T23:05:00.000+00:00"),
    entry(task=SCRIPT, agent=ATTRIBUTE, requested_model=ATTRIBUTE, prompt_tokens=10, status="error",
          error=f"APIError: {SCRIPT} {ATTRIBUTE}", job=SCRIPT, timestamp="2026-11-27T23:10:00.000+00:00"),
    entry(source="analysis", task=None, attempt=None, agent="dependency-analysis", model="gpt-4o-mini",
          requested_model="gpt-4o-mini", prompt_tokens=4000, cached_prompt_tokens=1000, completion_tokens=100,
          cost_usd=1.125, timestamp="2026-11-28T01:15:00.000+00:00"),
]
HAND_VALUES = {  # cost 0.5 + 0.25 + 0 + 1.125; tokens prompt + completion; budget 2.5
    "total-cost": "1.875", "total-calls": "4", "calls-ok": "3", "calls-error": "1", "total-tokens": "7910",
    "prompt-tokens": "7010", "cached-tokens": "1200", "completion-tokens": "900", "reasoning-tokens": "400",
    "budget-used": "75.0", "budget": "2.5", "time-span": "8099.5",
}
HAND_SHOWN = {"total-cost": "$1.88", "total-calls": "4", "total-tokens": "7,910", "budget-used": "75.0%",
              "time-first": "2026-11-27 23:00:00", "time-last": "2026-11-28 01:15:00"}


def realistic(n_tasks: int = 60, calls_per_task: int = 40) -> list[dict[str, Any]]:
    """A day of several agents and models on ``n_tasks`` tasks, with a failed call now and then."""
    models = [("gpt-4o", 2.5, 10.0), ("gpt-4o-mini", 0.15, 0.6), ("o3-mini", 1.1, 4.4), ("claude-sonnet-4", 3.0, 15.0)]
    agents = ["engineer", "researcher", "planner", "reviewer"]
    out = []
    for i in range(n_tasks * calls_per_task):
        task, call = divmod(i, calls_per_task)
        model, p_in, p_out = models[(task + call) % len(models)]
        failed = i % 47 == 13
        prompt, completion = (0, 0) if failed else (800 + (i * 7919) % 9000, 50 + (i * 104729) % 1500)
        seconds = i * 86400 // (n_tasks * calls_per_task)
        out.append(entry(
            id=f"e{i}", task=f"power-spectrum-{task:03d}", attempt=1 + (call >= 35), call=call,
            agent=agents[call % len(agents)], model=model, requested_model=model, prompt_tokens=prompt,
            completion_tokens=completion, cost_usd=(prompt * p_in + completion * p_out) / 1e6,
            status="error" if failed else "ok", error="RateLimitError: Error code: 429" if failed else None,
            timestamp=f"2026-11-27T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.000+00:00"))
    return out


class Dom(HTMLParser):
    """Tags, attributes and, for each element with an ``id``, its ``data-value`` and text."""

    VOID: ClassVar[set[str]] = {"meta", "br", "link", "img", "input", "hr", "source", "wbr"}

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attribute_names: set[str] = set()
        self.data_value: dict[str, str | None] = {}
        self.text: dict[str, str] = {}
        self.all_text: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        self.attribute_names.update(a)
        ident = a.get("id")
        if ident is not None:
            self.data_value[ident] = a.get("data-value")
            self.text[ident] = ""
        if tag not in self.VOID:
            self._open.append((tag, ident))

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.all_text.append(data)
        for _, ident in self._open:
            if ident is not None:
                self.text[ident] += data


def check_hand_totals(dom: Dom) -> None:
    assert {k: dom.data_value.get(k) for k in HAND_VALUES} == HAND_VALUES
    assert {k: dom.text.get(k) for k in HAND_SHOWN} == HAND_SHOWN
    assert "script" not in dom.tags and "img" not in dom.tags
    assert not [name for name in dom.attribute_names if name.startswith("on")]
    text = "".join(dom.all_text)
    assert SCRIPT in text and ATTRIBUTE in text  # shown as text, run as nothing
    assert "(analysis)" in dom.text["by-task"] and "dependency-analysis" in dom.text["by-agent"]


def test_figures_are_the_sums_of_the_entries() -> None:
    check_hand_totals(Dom(render_report(HAND, title="demo", budget_usd=2.5)))


def test_every_ledger_string_is_escaped() -> None:
    page = render_report(HAND, title=SCRIPT + ATTRIBUTE, budget_usd=None)
    assert "<script" not in page.lower()
    assert ATTRIBUTE not in page and '"onmouseover=' not in page
    escaped_script, escaped_attribute = "&lt;script&gt;alert(1)&lt;/script&gt;", "&quot;onmouseover=alert(2) x=&quot;"
    # title (twice), job, by-task, failed task, failed error
    assert page.count(escaped_script) == 6
    # by-model, by-agent, price tables' model, failed agent and model, failed error, title (twice)
    assert page.count(escaped_attribute) == 8


def test_empty_ledger() -> None:
    dom = Dom(render_report([], title="nothing yet", budget_usd=None))
    assert dom.data_value["total-cost"] == "0.0" and dom.text["total-cost"] == "$0.00"
    assert dom.data_value["total-calls"] == "0" and dom.data_value["total-tokens"] == "0"
    assert dom.text["budget-used"] == "no budget set" and dom.data_value["budget-used"] == ""
    assert "cost-chart" not in dom.data_value
    assert "no calls recorded" in dom.text["by-model"] and "no failed calls" in dom.text["failed"]


def test_budget_exceeded_is_over_100_percent() -> None:
    page = render_report(HAND, title="demo", budget_usd=1.5)
    dom = Dom(page)
    assert dom.data_value["budget-used"] == "125.0" and dom.text["budget-used"] == "125.0%"
    assert 'class="value over" id="budget-used"' in page


def test_timestamps_with_any_fraction_of_a_second() -> None:
    entries = [entry(timestamp="2026-11-27T23:00:00.1Z"), entry(timestamp="2026-11-27T23:00:30.123456789+00:00")]
    dom = Dom(render_report(entries, title="t", budget_usd=None))
    assert dom.text["time-first"] == "2026-11-27 23:00:00" and dom.text["time-last"] == "2026-11-27 23:00:30"


def test_failed_calls_are_capped_to_the_latest() -> None:
    n = MAX_FAILED_ROWS + 200
    failed = [entry(task=f"t{i:04d}", status="error", error=f"error {i}",
                    timestamp=f"2026-11-27T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000+00:00")
              for i in range(n)]
    page = render_report(failed, title="errors", budget_usd=None)
    section = page[page.index('<section id="failed">'):]
    assert section.count('<td class="err">') == MAX_FAILED_ROWS
    assert "Failed calls (700)" in section and "and 200 more" in section
    assert section.index("error 699<") < section.index("error 200<")  # latest first
    assert "error 199<" not in section


def test_page_fetches_nothing() -> None:
    page = render_report(realistic(), title="demo", budget_usd=100.0)
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert not re.search(r"""\b(?:src|href|xlink:href)\s*=""", page)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page


@pytest.mark.slow
def test_large_ledger_stays_light() -> None:
    base = realistic()
    entries = [dict(base[i % len(base)], timestamp=f"2026-11-{20 + i // 20000}T00:00:00.000+00:00")
               for i in range(100_000)]
    page = render_report(entries, title="big", budget_usd=None)
    dom = Dom(page)
    assert dom.data_value["total-calls"] == "100000"
    assert int(re.search(r'data-points="(\d+)"', page).group(1)) <= MAX_CHART_POINTS
    assert len(page.encode()) < 1_000_000


def test_module_imports_only_the_standard_library() -> None:
    code = ("import sys; before = set(sys.modules); import cmbagent_batch.ledger.report; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'cmbagent_batch'}; "
            "print(sorted(new - set(sys.stdlib_module_names)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr


# --- in a real browser ---


def write_page(tmp_path: Path, entries: list[dict[str, Any]], budget: float | None) -> Path:
    path = tmp_path / "report.html"
    path.write_text(render_report(entries, title="cmb-pipeline ledger", budget_usd=budget), encoding="utf-8")
    return path


@pytest.mark.slow
def test_chromium_shows_the_hand_computed_totals(tmp_path: Path) -> None:
    chromium = find_chromium()
    page = write_page(tmp_path, HAND, 2.5)
    dom = Dom(run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout)
    check_hand_totals(dom)
    assert "cost-line" in dom.data_value


@pytest.mark.slow
def test_chromium_shows_the_totals_of_a_realistic_ledger(tmp_path: Path) -> None:
    chromium = find_chromium()
    entries = realistic()
    cost = math.fsum(e["cost_usd"] for e in entries)
    dom = Dom(run_chromium(chromium, tmp_path, "--dump-dom", write_page(tmp_path, entries, 50.0).as_uri()).stdout)
    assert dom.data_value["total-cost"] == repr(cost) and dom.text["total-cost"] == f"${cost:,.2f}"
    assert dom.data_value["total-calls"] == str(len(entries))
    assert dom.data_value["calls-error"] == str(sum(e["status"] == "error" for e in entries))
    assert dom.data_value["total-tokens"] == str(sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries))
    assert dom.data_value["budget-used"] == repr(100 * cost / 50.0)
    assert dom.text["budget-used"] == f"{100 * cost / 50.0:.1f}%"


@pytest.mark.slow
def test_chromium_screenshot_of_a_realistic_ledger(tmp_path: Path) -> None:
    chromium = find_chromium()
    page = write_page(tmp_path, realistic() + HAND, 50.0)
    png = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, f"--screenshot={png}", "--window-size=1280,2000", page.as_uri())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 2000)
    assert len(data) > 50_000  # a blank or error page is a few KB
