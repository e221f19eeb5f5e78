"""The cyclic garbage collector around big acyclic builds (``spec/gcpause.py``): paused while a spec is read,
and what the reading built frozen as it ends, so that no collection scans it all afterwards."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmbagent_batch.errors import SpecError
from cmbagent_batch.spec.loader import load_spec
from tests.helpers.cli import write_spec


@pytest.fixture
def nothing_frozen() -> Iterator[None]:
    gc.unfreeze()  # what earlier tests froze goes back to the oldest generation
    yield
    gc.unfreeze()


def test_what_reading_a_spec_built_is_frozen_as_the_reading_ends(tmp_path: Path, nothing_frozen: None) -> None:
    tasks = "".join(f"  - {{id: t{i}, kind: shell, run: 'true'}}\n" for i in range(500))
    write_spec(tmp_path, "version: 1\njob: {name: many}\ntasks:\n" + tasks)
    gc.collect()
    spec = load_spec(str(tmp_path / "job.yaml"))
    young = gc.get_count()[0]
    assert gc.isenabled() and young < 100  # the next collection of the young generation has nothing of it
    assert gc.get_freeze_count() > 500
    assert len(spec.tasks) == 500


def test_a_spec_that_fails_to_load_leaves_nothing_frozen(tmp_path: Path, nothing_frozen: None) -> None:
    write_spec(tmp_path, "version: 1\njob: {name: bad}\ntasks:\n  - {id: a, kind: shel, run: 'true'}\n")
    with pytest.raises(SpecError):
        load_spec(str(tmp_path / "job.yaml"))
    assert gc.isenabled() and gc.get_freeze_count() == 0
