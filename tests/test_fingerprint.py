"""Fingerprints computed on demand: same values in any order, no recursion on long chains."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_batch.plan.analysis.deps import analyse
from cmbagent_batch.plan.analysis.files import input_sources
from cmbagent_batch.plan.build import build_dag
from cmbagent_batch.plan.dag import Dag
from cmbagent_batch.plan.fingerprint import CodeFiles, fingerprints
from cmbagent_batch.plan.specdigest import spec_digest
from cmbagent_batch.spec.loader import load_spec_bytes
from cmbagent_batch.spec.model import JobSpec


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


GOLDEN_SPEC = """\
version: 1
job: {name: golden}
tasks:
  - id: prep
    kind: shell
    run: bash prep.sh > data.txt
    inputs: [prep.sh]
    outputs: [data.txt]
  - id: sim-{n}-{flag}-{x}
    kind: python
    call: noop:run
    depends_on: [prep]
    args: {n: "{n}", flag: "{flag}", x: "{x}", text: "n={n} ünï", nested: [1, {k: "{x}"}]}
    env: {N: "{n}"}
    inputs: [data.txt]
    outputs: ["out_{n}_{flag}_{x}.json"]
    matrix:
      n: [1, 30]
      flag: [true, false]
      x: [0.5, "s"]
      exclude: [{n: 30, flag: true}]
      include: [{n: 99, flag: false, x: inc}]
  - id: plain-{a}
    kind: python
    call: noop:run
    timeout: 30
    matrix: {a: [1, 2.5, "z"]}
  - id: sum
    kind: shell
    run: cat out_*.json
    depends_on: ["sim-*"]
    inputs: ["out_*.json"]
  - id: ask-{lmax}
    kind: agent
    model: mini
    description: explains {lmax}
    instructions: say {lmax}
    matrix: {lmax: [10, 20]}
llm:
  models:
    mini: {model: gpt-4o-mini}
"""
# As journaled by every earlier version: a changed value reruns every finished task of every run directory.
GOLDEN = {
    "ask-10": "42f58cc9b0672fa36abbe5baa9e48c45f88cebd7a6dbc8b654e253512eeaf68d",
    "ask-20": "61f84df3f3a963f5209d47b9b9f37f0e301bb0501d4357c16998c272d962f3da",
    "plain-1": "2880967cb0c496341282bbda1c0a17cfcb927a5a4a428dc72167c57d46de3253",
    "plain-2.5": "05bbaaf75bbcfb45947ee8e2f9872610f054db9634e8eed3f20d48aa17eddc33",
    "plain-z": "aedcfefe6f85f36eb643d5c3d39e3a666bd27ed0856087a5f72a2f6077153453",
    "prep": "e91e743fb32fab4d44f31e602622b5f5e65721dfbe8c8ccc80c0bf491f590127",
    "sim-1-false-0.5": "c0a9372d59aac133b970f9e61eeb90d1a4b97e7eda2fcedd7f45f151da33d13b",
    "sim-1-false-s": "b457680862b42394e60f7086993292ab7885d0b2d4714311908671828715d3dd",
    "sim-1-true-0.5": "755646c88f76cad079f431a0d08598ff676aa891ffeca4be283ca16868658a19",
    "sim-1-true-s": "e7a7ba63e32d0b02a2540f6f89dfbb965f857282f14c16a6063b587b964a4e9a",
    "sim-30-false-0.5": "5925d9a84b55d814aa5e6f868cfca6301b945a3eca26db02ae92e5779d56612d",
    "sim-30-false-s": "14d11ff821c4c6f0e0fb9f3f9b3d7c52d671d72ce4fbc11827bab0a6c2cbe474",
    "sim-99-false-inc": "c0cbba3f0ccf140939904d95b1a09b25b297a467c9946ce4e74bc198f88fcfc4",
    "sum": "d74dec3a0a05b6f74354dd9b34cc69130980b5e506b843f480fd53db49c9fa72",
}


def golden_job(tmp_path: Path) -> tuple[JobSpec, Dag, dict[str, list[str]]]:
    (tmp_path / "job.yaml").write_text(GOLDEN_SPEC)
    (tmp_path / "noop.py").write_text("def run(**kw):\n    return None\n")
    spec = load_spec_bytes(GOLDEN_SPEC.encode(), str(tmp_path / "job.yaml"))
    dag = build_dag(spec, analyse(spec, None, refresh=False, warn=print))
    external = {tid: [p for p, matches in entries if not matches] for tid, entries in input_sources(spec.tasks).items()}
    return spec, dag, external


def test_fingerprints_are_the_values_earlier_versions_journaled(tmp_path: Path) -> None:
    spec, dag, external = golden_job(tmp_path)
    by_id = fingerprints({t.id: t for t in spec.tasks}, {t: dag.dependencies(t) for t in dag.nodes}, external,
                         str(tmp_path))
    compact = fingerprints(spec.tasks, dag, external, str(tmp_path))
    assert {tid: by_id[tid].value for tid in dag.nodes} == GOLDEN
    assert {tid: compact[tid].value for tid in reversed(dag.nodes)} == GOLDEN  # dependents first
    assert [compact[t].to_dict() for t in dag.nodes] == [by_id[t].to_dict() for t in dag.nodes]
    assert [compact[t].spec for t in dag.nodes] == [spec_digest(spec.task(t)) for t in dag.nodes]
    # what a success record journals, made without a Fingerprint for the tasks that stand alone
    assert [compact.record(t) for t in dag.nodes] == [by_id[t].to_dict() for t in dag.nodes]


def test_a_fingerprint_asked_for_again_is_the_same(tmp_path: Path) -> None:
    spec, dag, external = golden_job(tmp_path)
    fps = fingerprints(spec.tasks, dag, external, str(tmp_path))
    first = {tid: fps[tid] for tid in dag.nodes}
    assert all(fps[tid] == first[tid] for tid in dag.nodes)
    assert list(fps) == [t.id for t in spec.tasks] and len(fps) == 14
    assert fps["sim-1-true-s"].hashes == {"noop.py": first["plain-1"].hashes["noop.py"]}
    with pytest.raises(KeyError):
        fps["nope"]


def test_the_digests_of_a_whole_job_are_its_fingerprints_values(tmp_path: Path) -> None:
    spec, dag, external = golden_job(tmp_path)
    fps = fingerprints(spec.tasks, dag, external, str(tmp_path))
    assert dict(fps.digests()) == {tid: bytes.fromhex(value) for tid, value in GOLDEN.items()}
    assert [tid for tid, _ in fps.digests()] == [t.id for t in spec.tasks]


SWEEPS = """\
version: 1
job: {name: sweeps}
tasks:
  - id: sim-{n}-{flag}-{x}
    kind: python
    call: noop:run
    args: {text: "ünï"}
    matrix:
      n: [1, 30, 2.5]
      flag: [true, false]
      x: [0.5, "s", 7]
      exclude: [{n: 30, flag: true}, {x: 7, n: 1}]
      include: [{x: inc, n: 99, flag: false}]
  - id: bare-{a}
    kind: python
    call: noop:run
    matrix: {a: [true, 3, "z"]}
  - id: alone
    kind: shell
    run: bash go.sh
    inputs: [go.sh]
  - id: sh-{b}
    kind: shell
    run: echo {b}
    inputs: [data.txt]
    matrix: {b: [1, 2]}
  - id: env-{b}-{c}
    kind: shell
    run: echo $N > o_{c}.txt
    env: {N: "{b}", M: 3, F: true}
    inputs: ["in_{b}.txt"]
    late_inputs: ["late_{c}.txt"]
    outputs: ["o_{c}.txt"]
    matrix: {c: [x, y], b: [true, 2]}
"""


def test_tasks_without_dependencies_are_digested_per_entry_as_they_are_one_by_one(tmp_path: Path) -> None:
    (tmp_path / "noop.py").write_text("def run(**kw):\n    return None\n")
    (tmp_path / "go.sh").write_text("echo go\n")
    (tmp_path / "data.txt").write_text("data\n")
    spec = load_spec_bytes(SWEEPS.encode(), str(tmp_path / "job.yaml"))
    external = {tid: [p for p, matches in entries if not matches] for tid, entries in input_sources(spec.tasks).items()}
    compact = fingerprints(spec.tasks, {}, external, str(tmp_path))
    by_id = fingerprints({t.id: t for t in spec.tasks}, {}, external, str(tmp_path))
    assert dict(compact.digests()) == {t.id: bytes.fromhex(by_id[t.id].value) for t in spec.tasks}
    assert len(spec.tasks) == 24 and compact["alone"].hashes.keys() == {"go.sh"}
    assert compact.code_sets() == {by_id[t].own: by_id[t].hashes for t in ("bare-z", "alone", "sh-1")}
    assert compact.code_sets() == by_id.code_sets()


def test_a_success_record_keeps_each_part_short_and_names_the_own_files_when_they_are_not_the_code(tmp_path: Path) -> None:
    spec, dag, external = golden_job(tmp_path)
    fps = fingerprints(spec.tasks, dag, external, str(tmp_path))
    plain, sim = fps["plain-1"], fps["sim-1-true-s"]
    assert plain.to_dict() == {"fp": plain.value, "parts": f"{plain.spec[:12]}.{plain.deps[:12]}..{plain.code[:12]}"}
    assert plain.own == plain.code and sim.own == plain.own != sim.code  # its code part covers prep's
    assert sim.to_dict() == {"fp": sim.value, "parts": f"{sim.spec[:12]}.{sim.deps[:12]}.{sim.inputs[:12]}."
                                                       f"{sim.code[:12]}.{sim.own[:12]}"}
