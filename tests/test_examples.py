"""The example specs in configs/ and the README stay valid, and the README documents every key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.pricing import Price
from tests.helpers.cli import cli
from tests.helpers.runs import published

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))
SCHEMA = json.loads((ROOT / "schemas" / "job.schema.json").read_text())


def test_the_examples_exist() -> None:
    assert [p.name for p in EXAMPLES] == ["cmb-agents.yaml", "cmbagent-oneshot.yaml", "llm-shell.yaml", "mixed.yaml",
                                          "quickstart-llm.yaml", "quickstart.yaml", "slurm-mpi.yaml", "sweep.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    spec = load_spec(str(path))
    assert spec.tasks
    # The schema alone (as an editor sees it) accepts the file too.
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(path.read_text()))
    assert path.read_text().startswith("# yaml-language-server: $schema=../schemas/job.schema.json\n")


def test_quickstart_is_shell_and_python_only() -> None:
    spec = load_spec(str(ROOT / "configs" / "quickstart.yaml"))
    assert {t.kind for t in spec.tasks} == {"shell", "python"}
    assert [t.id for t in spec.tasks] == [
        "params", "spectrum-lmax500", "spectrum-lmax1000", "spectrum-lmax2000", "summary",
    ]
    assert spec.task("spectrum-lmax1000").args["lmax"] == 1000  # "{lmax}" alone keeps the number


def test_sweep_matrix_include_exclude() -> None:
    spec = load_spec(str(ROOT / "configs" / "sweep.yaml"))
    sims = sorted(t.id for t in spec.tasks if t.id.startswith("sim-"))
    assert len(sims) == 3 * 4 - 1 + 1
    assert "sim-n256-s4" not in sims and "sim-n512-s1" in sims
    assert spec.task("combine").depends_on == tuple(sims)
    assert spec.task("sim-n64-s2").env == {"OMP_NUM_THREADS": "1", "SIM_SEED": "2"}


def test_agent_example_uses_priced_models_and_llm_analysis() -> None:
    spec = load_spec(str(ROOT / "configs" / "cmb-agents.yaml"))
    assert {t.agent for t in spec.tasks} == {"planner", "engineer", "researcher"}
    assert spec.analysis.sources == ("explicit", "files", "llm")
    assert all(m.price is not None for m in spec.llm.models.values())
    assert spec.task("camb-spectra").model == "mini"  # llm.default_model


def test_llm_quickstart_uses_the_local_model_at_an_explicit_price_of_zero() -> None:
    spec = load_spec(str(ROOT / "configs" / "quickstart-llm.yaml"))
    smol = spec.llm.models["smol"]
    assert (smol.provider, smol.model, smol.model_path, smol.base_url) == ("local", "smollm2-135m-instruct", None, None)
    assert (smol.price_table, smol.price) == ("spec", Price(0.0, 0.0))
    assert "llm" in spec.analysis.sources and spec.analysis.model == "smol"
    assert [t.id for t in spec.tasks if t.kind == "agent"] == ["explain"]
    assert spec.task("explain").model == "smol" and spec.task("explain").max_turns <= 2


@pytest.mark.slow
def test_the_mixed_example_runs_its_grid_and_4_rank_chain_and_skips_the_gpu_task_saying_why(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the chain needs the 'mpi' extra (mpi4py, mpich)")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    done = cli(tmp_path, "run", "configs/mixed.yaml", check=True, timeout=300)
    assert ("cmbagent-batch: skipped (when_unplaceable: skip), with what depends on it: 'emulator': asks for 1 GPU "
            "on one node; no node has a GPU (declared inventory)\n") in done.stderr
    assert "cmbagent-batch: 5 succeeded, 1 skipped; run directory" in done.stderr
    chain = json.loads((published(tmp_path / "configs" / "runs" / "mixed", "chain") / "chain.json").read_text())
    assert chain["ranks"] == 4 and abs(chain["mean_A"] - 2.1) < 0.05, chain


def test_slurm_example() -> None:
    spec = load_spec(str(ROOT / "configs" / "slurm-mpi.yaml"))
    assert spec.execution.backend == "mpi"
    assert (spec.slurm.nodes, spec.slurm.ntasks_per_node, spec.slurm.time) == (2, 4, "06:00:00")


def test_readme_spec_example_is_valid(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"A small spec:\n\n```yaml\n(.*?)```", readme, re.S)
    assert block
    path = tmp_path / "small.yaml"
    path.write_text(block.group(1))
    assert len(load_spec(str(path)).tasks) == 4


def _keys(schema: dict, out: set[str]) -> set[str]:
    for name, sub in schema.get("properties", {}).items():
        out.add(name)
        _keys(sub, out)
    for sub in (schema.get("items"), schema.get("additionalProperties")):
        if isinstance(sub, dict):
            _keys(sub, out)
    return out


def test_readme_documents_every_schema_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(k for k in _keys(SCHEMA, set()) if not re.search(rf"`[^`]*\b{k}\b[^`]*`", readme))
    assert missing == []


def test_every_schema_property_has_a_description() -> None:
    def walk(schema: dict, path: str) -> list[str]:
        bad = []
        for name, sub in schema.get("properties", {}).items():
            if "description" not in sub:
                bad.append(f"{path}.{name}")
            bad += walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                bad += walk(schema[key], f"{path}[{key}]")
        return bad

    assert walk(SCHEMA, "$") == []
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema" and SCHEMA["$id"]
