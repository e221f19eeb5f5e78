"""Fingerprints computed on demand: same values in any order, no recursion on long chains."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_batch.plan.fingerprint import CodeFiles, fingerprints
from cmbagent_batch.spec.loader import load_spec_bytes


def chain(n: int) -> tuple[dict, dict]:
    parts = ["version: 1\njob: {name: chain}\ntasks:\n"]
    for i in range(n):
        deps = f", depends_on: [t{i - 1:05d}]" if i else ""
        parts.append(f"  - {{id: t{i:05d}, kind: shell, run: 'echo {i}'{deps}}}\n")
    spec = load_spec_bytes("".join(parts).encode(), "chain.yaml")
    tasks = {t.id: t for t in spec.tasks}
    deps = {t.id: tuple(t.depends_on) for t in spec.tasks}
    return tasks, deps


def test_the_last_of_a_long_chain_first_gives_what_the_chain_in_order_gives() -> None:
    tasks, deps = chain(5000)  # deeper than the interpreter's recursion limit
    backwards = fingerprints(tasks, deps, {}, ".")
    last = backwards["t04999"].value
    forwards = fingerprints(tasks, deps, {}, ".")
    values = [forwards[tid].value for tid in sorted(tasks)]
    assert values[-1] == last
    assert len(set(values)) == 5000  # each depends on its whole upstream
    assert backwards["t00000"] == forwards["t00000"] and len(backwards) == 5000


def code_tree(root: Path) -> None:
    files = {
        "pipe/__init__.py": "from .tools import *\n",
        "pipe/stages.py": "import os\nfrom . import maths\n\n\ndef run():\n    from helpers import lazy\n    return lazy()\n",
        "pipe/maths.py": "import numpy\nfrom ..outside import x\n",
        "pipe/tools.py": "",
        "helpers.py": "def lazy():\n    import deeper\n",
        "deeper.py": "open('imported', 'w').write('x')\nraise SystemExit(3)\n",
        "unrelated.py": "x = 1\n",
        "broken.py": "def (:\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_python_task_covers_its_module_its_packages_and_what_they_import_beside_the_spec(tmp_path: Path) -> None:
    code_tree(tmp_path)
    files = CodeFiles(str(tmp_path), search_path=[])
    names = [f.name for f in files.python("pipe.stages:run")]
    assert names == ["deeper.py", "helpers.py", "pipe/__init__.py", "pipe/maths.py", "pipe/stages.py",
                     "pipe/tools.py"]
    assert not (tmp_path / "imported").exists()  # read, never imported
    assert [f.name for f in files.python("broken:f")] == ["broken.py"]  # unparsable: still hashed
    assert files.python("nowhere:f") == ()


def test_tasks_sharing_a_module_read_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code_tree(tmp_path)
    files = CodeFiles(str(tmp_path), search_path=[])
    reads: list[str] = []
    real = CodeFiles._file

    def counted(self: CodeFiles, path: str, parse: bool) -> object:
        reads.append(path)
        return real(self, path, parse)

    monkeypatch.setattr(CodeFiles, "_file", counted)
    axis = list(range(100))
    text = f"version: 1\njob: {{name: many}}\ntasks:\n  - {{id: 't{{i}}-{{j}}', kind: python, call: 'pipe.stages:run', " \
           f"matrix: {{i: {axis}, j: {axis + [100, 101]}}}}}\n"
    spec = load_spec_bytes(text.encode(), str(tmp_path / "many.yaml"))
    tasks = {t.id: t for t in spec.tasks}
    fps = fingerprints(tasks, {}, {}, str(tmp_path), files)
    assert len(reads) == 6
    assert len({fps[tid].code for tid in tasks}) == 1 and len(tasks) == 10200


def test_the_code_part_changes_with_the_bytes_and_reaches_dependents(tmp_path: Path) -> None:
    code_tree(tmp_path)
    spec = load_spec_bytes(b"version: 1\njob: {name: two}\ntasks:\n"
                           b"  - {id: a, kind: python, call: 'helpers:lazy'}\n"
                           b"  - {id: b, kind: shell, run: 'echo', depends_on: [a]}\n", str(tmp_path / "two.yaml"))
    tasks = {t.id: t for t in spec.tasks}
    deps = {"a": (), "b": ("a",)}
    before = fingerprints(tasks, deps, {}, str(tmp_path))
    (tmp_path / "deeper.py").write_text("# edited\n")
    after = fingerprints(tasks, deps, {}, str(tmp_path))
    assert before["a"].code != after["a"].code and before["b"].code != after["b"].code
    assert [before["a"].spec, before["a"].deps, before["b"].deps] == [after["a"].spec, after["a"].deps,
                                                                       after["b"].deps]
    assert before["a"].hashes.keys() == {"helpers.py", "deeper.py"}
