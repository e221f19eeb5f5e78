"""Finding a task by its position in a job that mixes listed tasks and matrix entries (``spec/tasks.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_batch.spec.loader import load_spec
from cmbagent_batch.spec.tasks import Tasks
from tests.helpers.cli import write_spec


def test_each_position_is_the_task_of_the_entry_that_made_it(tmp_path: Path) -> None:
    write_spec(tmp_path, """\
        version: 1
        job: {name: mixed}
        tasks:
          - {id: a, kind: shell, run: "true"}
          - {id: "m-{i}", kind: shell, run: "echo {i}", matrix: {i: [1, 2, 3]}}
          - {id: b, kind: shell, run: "true"}
          - {id: c, kind: shell, run: "true", depends_on: [b]}
          - {id: "n-{j}", kind: shell, run: "echo {j}", matrix: {j: [1, 2]}}
          - {id: d, kind: shell, run: "true"}
    """)
    tasks = load_spec(str(tmp_path / "job.yaml")).tasks
    assert isinstance(tasks, Tasks)
    owners = [e for e in tasks.entries for _ in range(len(e))]  # the entry of each position, walked in order
    ids = ["a", "m-1", "m-2", "m-3", "b", "c", "n-1", "n-2", "d"]
    assert len(tasks) == len(owners) == len(ids)
    assert [tasks.entry_at(p) for p in range(len(ids))] == owners
    assert [tasks[p].id for p in range(len(ids))] == ids
    assert (tasks[-1].id, tasks[-9].id, tasks[5].depends_on) == ("d", "a", ("b",))
    for outside in (9, -10):
        with pytest.raises(IndexError, match="task position out of range"):
            tasks[outside]
