"""The package's layers, as the README's Architecture section lists them: a module imports only from its own
layer and the layers below it (function-level and type-checking imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cmbagent_batch"

# Bottom to top; one entry is one layer (a tuple: layers side by side, which may not import each other).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "watchdog"),
    ("states",),
    ("attempt",),
    ("spec",),
    ("rundir",),
    ("ledger", "slurm"),
    ("llm",),
    ("gateway",),
    ("plan",),
    ("provenance",),
    ("place",),
    ("tasks",),
    ("backends",),
    ("execute",),
    ("report",),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> str | None:
    """``cmbagent_batch.plan.dag`` -> ``plan``; the package itself (``__version__``) has none."""
    parts = module.split(".")
    if len(parts) < 2 or (parts[1].startswith("__") and parts[1] != "__main__"):
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in ``path``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmbagent_batch"):
            if node.module == "cmbagent_batch":
                found += [(node.lineno, f"cmbagent_batch.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cmbagent_batch")]
    return found


def _modules() -> list[tuple[str, Path]]:
    return sorted((".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    layers = {_layer(module) for module, _ in _modules()} - {None}
    assert layers <= set(RANK), f"packages without a layer: {sorted(layers - set(RANK))}"


def test_no_module_imports_from_a_layer_above_or_beside_its_own() -> None:
    wrong = []
    for module, path in _modules():
        mine = _layer(module)
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs != mine and RANK[theirs] >= RANK[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["cmbagent_batch.execute.scheduler", "cmbagent_batch.execute.admission",
                                    "cmbagent_batch.execute.outcomes", "cmbagent_batch.execute.stop"])
def test_the_scheduler_knows_neither_backends_nor_tasks(module: str) -> None:
    path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    used = {_layer(target) for _, target in _imports(path)}
    assert not used & {"backends", "tasks"}, used


def test_the_top_of_the_package_is_small_and_no_module_is_long() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    long = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450]
    assert not long, long
