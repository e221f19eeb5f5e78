"""How cmbagent-batch treats an LLM endpoint's errors: what is retried, how long to wait, what to say.

Pure functions, shared by dependency analysis and agent tasks; neither imports openai here. Retried:
408, 409, 429, 5xx, timeouts and connection errors. Not retried: other 4xx (a bad key or request does not
get better), reported with a message naming the endpoint, the model and what to check.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cmbagent_batch.spec.variables import DEFAULT_KEY_ENV as DEFAULT_KEY_ENV

DEFAULT_URL = "https://api.openai.com/v1"  # a model without base_url
# Variables whose names say they hold a secret: kept from code an agent runs and from a local model's server
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
LOCAL_KEY = "no-key-local-model"  # sent to a provider 'local' server, which checks none
BACKOFF_BASE = 1.0  # seconds before the first retry; doubles each time
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0  # a server asking for longer is not waited for longer than this


def retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def backoff_delay(failures: int, retry_after: float | None, jitter: float) -> float:
    """Seconds to wait after the ``failures``-th failed attempt; ``jitter`` is uniform in [0, 1)."""
    if retry_after is not None and math.isfinite(retry_after):
        return min(max(retry_after, 0.0), RETRY_AFTER_CAP)
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (failures - 1)) * (1.0 + 0.25 * jitter)


def retry_after(headers: Any) -> float | None:
    """Seconds asked for by Retry-After (or OpenAI's retry-after-ms), if given and sensible."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        return seconds if math.isfinite(seconds) else None
    return None


def redactor(key: str) -> Callable[[str], str]:
    """A function that masks ``key`` in a text (keys shorter than 4 characters are not worth masking)."""
    if len(key) < 4:
        return lambda text: text
    return lambda text: text.replace(key, "***")


def server_message(exc: Any, redact: Callable[[str], str]) -> str:
    """The server's own message from an ``openai.APIStatusError``, on one line, at most 300 characters."""
    body = exc.body
    text = body.get("message") if isinstance(body, dict) else body
    text = " ".join(str(text if text else exc.message).split())
    return redact(text if len(text) <= 300 else text[:300] + "...")


def refusal(url: str, model: str, key_env: str, status: int, text: str) -> str:
    """What to tell the user about a status that no retry will change."""
    where = f"LLM endpoint {url}"
    name = f"model '{model}'"
    if status == 401:
        return f"{where} rejected the API key (401) for {name}; check ${key_env}"
    if status == 403:
        return f"{where} refused access (403) for {name}: {text}"
    if status == 404:
        return f"{where} answered 404 for {name}: {text}; check the model name and base_url"
    if status == 400:
        return f"{where} rejected the request (400) for {name}: {text}"
    return f"{where} answered {status} for {name}: {text}"


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds: the timestamp of a call's start."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
