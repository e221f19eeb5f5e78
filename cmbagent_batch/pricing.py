"""What a model call cost: a pure function of its token counts and the unit prices."""

from __future__ import annotations

from cmbagent_batch.spec.model import Price


def call_cost(price: Price, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one call. ``prompt_tokens`` includes the cached ones, as OpenAI-style usage reports it."""
    cached_price = price.prompt_per_1m if price.cached_prompt_per_1m is None else price.cached_prompt_per_1m
    fresh = max(prompt_tokens - cached_prompt_tokens, 0)
    return (
        fresh * price.prompt_per_1m + cached_prompt_tokens * cached_price + completion_tokens * price.completion_per_1m
    ) / 1_000_000
