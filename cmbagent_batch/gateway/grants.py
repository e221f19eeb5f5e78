"""What a rank's runner and its gateway say to each other: a ``Grant`` (one attempt's right to call the
models it declared, reached by a token), and what the attempt's calls came to (``Spent``), said when
its grant is closed. Plain data that crosses a pipe as JSON; imports neither aiohttp nor openai."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

TOKEN_PREFIX = "cbk-"  # a gateway token: never an API key of a provider


def new_token() -> str:
    """A token for one attempt: 192 random bits, which nothing can guess or derive from another."""
    return TOKEN_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class Route:
    """One model a grant may call: its ``llm.models`` key, the name sent, where it is and what it costs."""

    key: str
    model: str
    base_url: str  # the endpoint's base URL, ``.../v1``
    api_key_env: str | None  # the variable that held its key when the runner started; None: it needs none
    price: dict[str, Any]  # prompt_per_1m, cached_prompt_per_1m, completion_per_1m
    price_table: str
    timeout: float  # seconds the endpoint has to answer (a stream: between two of its pieces)
    provider: str = "openai"  # "local": a llama.cpp server of this rank (``usage.for_local``)

    def answers_to(self, name: Any) -> bool:
        """Whether a request's ``model`` names this route: its model name, or its key in llm.models."""
        return bool(name == self.model or name == self.key)


@dataclass(frozen=True, slots=True)
class Grant:
    """One attempt's right to call its declared models through the gateway, and whose calls they are."""

    task: str
    attempt: int
    rank: int
    host: str
    run_dir: str
    job: str
    run_id: str
    source: str  # "task": a shell or python task's own code; "agent": an agent task
    agent: str | None
    routes: tuple[Route, ...]
    job_usd: float | None = None  # job.budget_usd
    task_usd: float | None = None  # the task's budget_usd

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grant:
        routes = tuple(Route(**r) for r in data["routes"])
        return cls(**{**data, "routes": routes})

    def route(self, name: Any) -> Route | None:
        return next((r for r in self.routes if r.answers_to(name)), None)

    def declared(self) -> str:
        return ", ".join(r.key if r.key == r.model else f"{r.key} ({r.model})" for r in self.routes)

    def who(self) -> str:
        return f"task {self.task} attempt {self.attempt} on rank {self.rank}"


@dataclass(frozen=True, slots=True)
class Spent:
    """What an attempt's calls through the gateway came to, once its grant is closed."""

    calls: int = 0  # calls forwarded
    tokens: int = 0  # prompt + completion tokens of the answered ones
    cost_usd: float = 0.0
    budget: str | None = None  # why a call was refused for a budget, if one was
    refused: tuple[str, ...] = field(default_factory=tuple)  # other refusals (an undeclared model...), first few
    cut: int = 0  # calls whose answer was cut (client gone, timeout, end of the attempt): possibly billed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spent:
        return cls(**{**data, "refused": tuple(data.get("refused", ()))})
