"""Fixtures shared across test files (the code behind them is in tests/helpers/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.cli import Runner

pytest_plugins = ["tests.helpers.slurm_cluster"]  # slurm_conf: a local Slurm for the Slurm tests


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    """Background runs a test starts (append them); killed at its end if still running."""
    started: list[Runner] = []
    yield started
    for r in started:
        r.kill()
