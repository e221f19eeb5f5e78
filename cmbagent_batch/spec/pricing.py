"""What a model call costs: the shipped price table, name resolution, and the cost of one call.

Everything here is pure except ``builtin_table`` and ``load_table``, which read a file. A model with no
price is never priced at $0: the spec loader refuses it, and ``lookup`` says "not found" with ``None``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cmbagent_batch.errors import PriceTableError

SPEC_TABLE = "spec"  # the price_table of a price written in the spec itself
# How alike a name and a table entry must be to suggest the entry (difflib's ratio): high enough that
# gpt-3.5-turbo is not taken for gpt-5-nano. A new model one digit away from a priced one (gpt-4.5, gpt-4.1)
# still gets the suggestion, so the message also says how to price a model the table lacks.
CLOSE = 0.8

# Suffixes an endpoint adds to a model name: dated snapshots and aliases.
_VARIANT = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})|-latest)$")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million tokens."""

    prompt_per_1m: float
    completion_per_1m: float
    cached_prompt_per_1m: float | None = None  # None: cached prompt tokens cost the prompt price


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Unit prices by model name, with where they come from."""

    id: str
    date: str
    source: str
    models: Mapping[str, Price]


def call_cost(price: Price, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one call. ``prompt_tokens`` includes the cached ones, as OpenAI-style usage reports it;
    ``completion_tokens`` includes reasoning tokens."""
    cached_price = price.prompt_per_1m if price.cached_prompt_per_1m is None else price.cached_prompt_per_1m
    cached = min(max(cached_prompt_tokens, 0), max(prompt_tokens, 0))
    fresh = max(prompt_tokens - cached, 0)
    return (fresh * price.prompt_per_1m + cached * cached_price + completion_tokens * price.completion_per_1m) / 1_000_000


def candidates(name: str) -> list[str]:
    """The names ``name`` may be priced under, most specific first.

    ``openai/gpt-4o-mini-2024-07-18`` -> itself, ``gpt-4o-mini-2024-07-18``, ``gpt-4o-mini``. Only the
    provider prefix and date or ``-latest`` suffixes are dropped, so a different model never matches.
    """
    out = [name]
    base = name.rsplit("/", 1)[-1]
    if base != name:
        out.append(base)
    while (stripped := _VARIANT.sub("", base)) != base and stripped:
        base = stripped
        out.append(base)
    return out


def lookup(table: PriceTable, name: str) -> tuple[str, Price] | None:
    """The table entry that prices ``name`` (a dated variant resolves to its base model), or None."""
    for candidate in candidates(name):
        price = table.models.get(candidate)
        if price is not None:
            return candidate, price
    return None


def closest(table: PriceTable, name: str) -> str | None:
    """The table's model name that ``name`` is most likely a misspelling of, or None: compared without its
    provider prefix and date suffix, ignoring case, and only when nearly the same (``gpt-4o-mni`` ->
    ``gpt-4o-mini``)."""
    by_lower = {model.lower(): model for model in table.models}
    found = difflib.get_close_matches(candidates(name)[-1].lower(), list(by_lower), n=1, cutoff=CLOSE)
    return by_lower[found[0]] if found else None


def parse_table(data: Any, where: str) -> PriceTable:
    """A price table from parsed JSON/YAML; ``PriceTableError`` naming ``where`` and the bad entry otherwise."""
    if not isinstance(data, dict):
        raise PriceTableError(f"{where}: a price table is a mapping with id, date, source and models")
    missing = [k for k in ("id", "models") if k not in data]
    if missing:
        raise PriceTableError(f"{where}: the price table lacks {', '.join(missing)}")
    if not isinstance(data["id"], str) or not data["id"]:
        raise PriceTableError(f"{where}: id must be a non-empty string")
    if not isinstance(data["models"], dict) or not data["models"]:
        raise PriceTableError(f"{where}: models must be a non-empty mapping of model name to prices")
    models = {}
    for name, entry in data["models"].items():
        models[str(name)] = parse_price(entry, f"{where}: models.{name}")
    return PriceTable(
        id=data["id"], date=str(data.get("date", "")), source=str(data.get("source", "")),
        models=MappingProxyType(models),
    )


def parse_price(entry: Any, where: str) -> Price:
    """One model's unit prices; ``PriceTableError`` naming ``where`` otherwise."""
    keys = ("prompt_per_1m", "completion_per_1m", "cached_prompt_per_1m")
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where}: expected a mapping with prompt_per_1m and completion_per_1m")
    if unknown := sorted(set(entry) - set(keys)):
        raise PriceTableError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(keys)}")
    values: dict[str, float] = {}
    for key in keys:
        if key not in entry:
            if key != "cached_prompt_per_1m":
                raise PriceTableError(f"{where}: {key} is missing")
            continue
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise PriceTableError(f"{where}.{key}: expected a number >= 0, got {value!r}")
        values[key] = float(value)
    return Price(**values)


@functools.cache
def builtin_table() -> PriceTable:
    """The price table shipped in the package (``cmbagent_batch/spec/prices/table.json``)."""
    text = resources.files("cmbagent_batch.spec.prices").joinpath("table.json").read_text(encoding="utf-8")
    return parse_table(json.loads(text), "the shipped price table")


def load_table(path: str) -> PriceTable:
    """A price table file (JSON or YAML, the shipped table's format). OSError, or PriceTableError on a bad table."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PriceTableError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    return parse_table(data, path)
