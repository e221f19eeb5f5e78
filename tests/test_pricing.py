"""The shipped price table, name resolution and the cost of a call (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.pricing import Price, PriceTable, builtin_table, call_cost, candidates, load_table, lookup


def test_the_shipped_table_has_its_date_and_source() -> None:
    table = builtin_table()
    assert table.id == "builtin-2025-08"
    assert table.date == "2025-08-15"
    assert "openai.com" in table.source
    assert table.models["gpt-4o-mini"] == Price(0.15, 0.6, 0.075)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-4o-mini", ["gpt-4o-mini"]),
        ("gpt-4o-mini-2024-07-18", ["gpt-4o-mini-2024-07-18", "gpt-4o-mini"]),
        ("openai/gpt-4o", ["openai/gpt-4o", "gpt-4o"]),
        ("claude-sonnet-4-20250514", ["claude-sonnet-4-20250514", "claude-sonnet-4"]),
        ("gemini-2.5-pro@20250601", ["gemini-2.5-pro@20250601", "gemini-2.5-pro"]),
        ("gpt-4-0613", ["gpt-4-0613", "gpt-4"]),
        ("claude-3-5-haiku-latest", ["claude-3-5-haiku-latest", "claude-3-5-haiku"]),
    ],
)
def test_dated_variants_resolve_to_their_base_model(name: str, expected: list[str]) -> None:
    assert candidates(name) == expected


def test_a_different_model_never_matches() -> None:
    table = builtin_table()
    assert lookup(table, "gpt-4o-mini-2024-07-18") == ("gpt-4o-mini", table.models["gpt-4o-mini"])
    assert lookup(table, "gpt-4o-mini-tts") is None  # not a dated variant of gpt-4o-mini
    assert lookup(table, "gpt-4o-2") is None
    assert lookup(table, "my-finetune") is None


def test_call_cost_prices_cached_and_completion_tokens() -> None:
    price = Price(prompt_per_1m=2.5, completion_per_1m=10.0, cached_prompt_per_1m=1.25)
    # 1,000 prompt tokens of which 400 cached, 200 completion tokens
    assert call_cost(price, 1000, 400, 200) == pytest.approx((600 * 2.5 + 400 * 1.25 + 200 * 10.0) / 1e6)
    assert call_cost(Price(1.0, 2.0), 1000, 400, 0) == pytest.approx(1000 / 1e6)  # no cached price: prompt price
    assert call_cost(Price(0.0, 0.0), 10**6, 0, 10**6) == 0.0


def test_load_table_errors_name_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "prices.json"
    bad.write_text('{"id": "x", "models": {"m": {"prompt_per_1m": -1, "completion_per_1m": 1}}}')
    with pytest.raises(ValueError, match=r"prices.json: models.m.prompt_per_1m: expected a number >= 0, got -1"):
        load_table(str(bad))
    bad.write_text('{"id": "x", "models": {"m": {"prompt": 1}}}')
    with pytest.raises(ValueError, match="unknown key"):
        load_table(str(bad))
    good = tmp_path / "prices.yaml"
    good.write_text("id: mine\nmodels:\n  m: {prompt_per_1m: 1, completion_per_1m: 2}\n")
    assert load_table(str(good)) == PriceTable("mine", "", "", {"m": Price(1.0, 2.0)})


def test_spec_models_take_the_table_price_unless_the_spec_sets_one(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\njob: {name: p}\nllm:\n  models:\n"
        "    a: {model: gpt-4o-2024-08-06}\n"
        "    b: {model: gpt-4o, price: {prompt_per_1m: 1, completion_per_1m: 2}}\n"
        "tasks:\n  - {id: t, kind: shell, run: 'true'}\n"
    )
    models = load_spec(str(spec)).llm.models
    assert (models["a"].price, models["a"].price_table) == (builtin_table().models["gpt-4o"], "builtin-2025-08")
    assert (models["b"].price, models["b"].price_table) == (Price(1.0, 2.0), "spec")
