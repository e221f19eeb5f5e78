"""``plan`` shows the inventory a job that books its tasks' shapes is placed on, as ``run`` and ``status``
say it, with the tasks skipped as they can never fit there; a task that can never fit is refused as ``run``
refuses it; a job of default shapes shows none."""

from __future__ import annotations

from pathlib import Path

from cmbagent_batch.place.inventory import discover
from tests.helpers.cli import clean_env, cli

SHAPES = """\
version: 1
job: {name: shapes}
execution:
  inventory: {cpus: 4, gpus: ["0", "1"]}
tasks:
  - id: pair
    kind: shell
    run: $CMBAGENT_LAUNCH true
    resources: {ranks: 2}
  - id: emu-{i}
    kind: shell
    matrix: {i: [1, 2, 3, 4, 5]}
    run: "true"
    resources: {gpus_per_rank: 4}
    when_unplaceable: skip
"""


def plan(tmp_path: Path, text: str) -> tuple[int, list[str], str]:
    (tmp_path / "job.yaml").write_text(text)
    res = cli(tmp_path, "plan", "job.yaml")
    return res.returncode, res.stdout.splitlines(), res.stderr


def test_plan_shows_a_declared_inventory_and_the_tasks_skipped_as_they_never_fit(tmp_path: Path) -> None:
    for _ in ("made", "cached"):
        code, lines, err = plan(tmp_path, SHAPES)
        assert (code, err) == (0, "")
        host = lines[4].split("(", 1)[1].split(")", 1)[0]
        assert lines[3:7] == [
            "Analysis: sources explicit, files",
            f"Inventory: 1 node ({host}): 4 CPUs, GPUs 0,1, memory not counted (declared)",
            "Skipped (when_unplaceable: skip), with what depends on it: 'emu-1', 'emu-2', 'emu-3' and 2 more: "
            "asks for 4 GPUs on one node; the largest node has 2 GPUs (declared inventory)",
            ""]


def test_plan_refuses_a_task_that_can_never_fit_as_run_does(tmp_path: Path) -> None:
    code, lines, err = plan(tmp_path, SHAPES.replace("    when_unplaceable: skip\n", ""))
    assert (code, lines) == (2, [])
    assert err == ("job.yaml:14:16: $.tasks[1].resources (task 'emu-1'): asks for 4 GPUs on one node; the largest "
                   "node has 2 GPUs (declared inventory): it can never run here (when_unplaceable: skip would "
                   "skip it)\n")
    dry = cli(tmp_path, "run", "job.yaml", "--dry-run")
    assert (dry.returncode, dry.stderr) == (2, err)


def test_plan_shows_the_inventory_discovered_for_shapes_and_none_for_default_ones(tmp_path: Path) -> None:
    shapes = SHAPES.replace('  inventory: {cpus: 4, gpus: ["0", "1"]}\n', "  max_workers: 2\n").split("  - id: emu")[0]
    code, lines, _ = plan(tmp_path, shapes)
    assert code == 0 and f"Inventory: {discover(clean_env(tmp_path)).describe()}" in lines
    plain = shapes.replace("    resources: {ranks: 2}\n", "")
    for _ in ("made", "cached"):
        code, lines, _ = plan(tmp_path, plain)
        assert code == 0 and not [line for line in lines if line.startswith("Inventory")], lines
