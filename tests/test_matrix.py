"""Matrix expansion: ``cmbagent_batch.spec.matrix`` on its own, and through ``load_spec``."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from cmbagent_batch.spec import JobSpec, load_spec
from cmbagent_batch.spec.matrix import (
    MAX_TASKS,
    Grid,
    MatrixProblem,
    combinations,
    describe_values,
    expand,
    format_value,
)

# --- combinations ------------------------------------------------------------------------------


def test_cross_product_in_the_order_written() -> None:
    combos, problems = combinations({"nside": [64, 128], "seed": [3, 1, 2]})
    assert problems == []
    assert combos == [
        {"nside": 64, "seed": 3},
        {"nside": 64, "seed": 1},
        {"nside": 64, "seed": 2},
        {"nside": 128, "seed": 3},
        {"nside": 128, "seed": 1},
        {"nside": 128, "seed": 2},
    ]
    assert [list(c) for c in combos] == [["nside", "seed"]] * 6


def test_parameter_order_is_the_order_written_not_sorted() -> None:
    combos, _ = combinations({"z": [1, 2], "a": ["x", "y"]})
    assert combos == [{"z": 1, "a": "x"}, {"z": 1, "a": "y"}, {"z": 2, "a": "x"}, {"z": 2, "a": "y"}]


def test_exclude_removes_every_combination_with_all_its_pairs() -> None:
    combos, problems = combinations(
        {"n": [1, 2, 3], "s": ["a", "b"], "exclude": [{"n": 2}, {"n": 3, "s": "b"}]}
    )
    assert problems == []
    assert combos == [{"n": 1, "s": "a"}, {"n": 1, "s": "b"}, {"n": 3, "s": "a"}]


def test_include_is_added_after_the_cross_product_in_order() -> None:
    combos, problems = combinations(
        {"n": [1, 2], "include": [{"n": 9}, {"n": 0}], "exclude": [{"n": 1}]}
    )
    assert problems == []
    assert combos == [{"n": 2}, {"n": 9}, {"n": 0}]


def test_include_may_repeat_an_excluded_combination() -> None:
    combos, _ = combinations({"n": [1, 2], "exclude": [{"n": 1}], "include": [{"n": 1}]})
    assert combos == [{"n": 2}, {"n": 1}]


def test_include_alone_makes_the_tasks() -> None:
    assert combinations({"include": [{"n": 1}, {"n": 2}]}) == ([{"n": 1}, {"n": 2}], [])


@pytest.mark.parametrize(
    ("values", "excluded", "left"),
    [
        ([1, True], 1, [True]),
        ([1, True], True, [1]),
        ([0, False], False, [0]),
        ([1, 1.0], 1.0, [1]),
        (["1", 1], 1, ["1"]),
    ],
    ids=["1-is-not-true", "true-is-not-1", "false-is-not-0", "1.0-is-not-1", "string-1-is-not-1"],
)
def test_exclude_matches_values_of_the_same_type_only(values: list[object], excluded: object, left: list[object]) -> None:
    combos, problems = combinations({"n": values, "exclude": [{"n": excluded}]})
    assert problems == []
    assert [c["n"] for c in combos] == left
    assert [type(c["n"]) for c in combos] == [type(v) for v in left]


def test_exclude_naming_an_unknown_parameter() -> None:
    assert combinations({"n": [1, 2], "exclude": [{"n": 1}, {"m": 1, "n": 2}]}) == (
        [],
        [MatrixProblem(("exclude", 1, "m"), "'m' is not a matrix parameter")],
    )


def test_include_lacking_a_parameter() -> None:
    assert combinations({"n": [1], "s": ["a"], "include": [{"n": 2, "s": "b"}, {"s": "c"}]}) == (
        [],
        [MatrixProblem(("include", 1), "include entry lacks parameter 'n'")],
    )


def test_a_matrix_that_expands_to_nothing() -> None:
    assert combinations({"n": [1, 2], "exclude": [{"n": 1}, {"n": 2}]}) == (
        [],
        [MatrixProblem((), "matrix expands to no tasks (every combination is excluded)")],
    )


def test_a_matrix_over_the_task_limit_is_refused_before_expanding() -> None:
    side = list(range(2000))  # 2000 * 2000 = 4,000,000 > MAX_TASKS
    assert MAX_TASKS == 2_000_000
    assert combinations({"a": side, "b": side}) == (
        [],
        [MatrixProblem((), "matrix expands to 4,000,000 tasks, over the limit of 2,000,000")],
    )


# --- values in strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(True, "true"), (False, "false"), (500, "500"), (0.5, "0.5"), (1e-9, "1e-09"), ("planck", "planck")],
)
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_describe_values() -> None:
    assert describe_values({"nside": 64, "fast": True, "name": "x"}) == "nside=64, fast=true, name=x"


def expanded(matrix: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    """The task bodies one entry with these fields and this matrix expands to."""
    tasks, problems = expand({**fields, "matrix": matrix})
    assert problems == []
    return [body for body, _ in tasks]


def test_only_parameter_placeholders_are_replaced() -> None:
    (body,) = expanded(
        {"n": [64], "seed": [True]},
        id="map-{n}-{seed}",
        run="echo ${HOME} {m} {N} { n } {n}{n} | awk '{print $1}' > map_{n}_{seed}.fits",
    )
    assert body == {"id": "map-64-true", "run": "echo ${HOME} {m} {N} { n } 6464 | awk '{print $1}' > map_64_true.fits"}


def test_placeholders_are_replaced_in_nested_values_but_not_in_keys() -> None:
    (body,) = expanded(
        {"n": [64], "seed": [True]},
        env={"SEED": "{seed}", "N_{n}": "{n}", "THREADS": 4},
        outputs=["{n}", "a/{n}/b"],
        resources={"cpus": 2},
    )
    assert body == {
        "env": {"SEED": "true", "N_{n}": "64", "THREADS": 4},
        "outputs": ["64", "a/64/b"],
        "resources": {"cpus": 2},
    }


def test_a_placeholder_inside_shell_braces_is_left_to_the_shell() -> None:
    # "${n}" is shell syntax: only a "{n}" not preceded by "$" is a placeholder.
    assert expanded({"n": [3]}, run="echo ${n} {n}") == [{"run": "echo ${n} 3"}]


def test_similar_parameter_names_do_not_clash() -> None:
    assert expanded({"n": [1], "nside": [64]}, id="{nside}-{n}-{ns}") == [{"id": "64-1-{ns}"}]


def test_args_keep_a_lone_placeholder_as_its_value() -> None:
    (body,) = expanded(
        {"lmax": [500], "fast": [False], "r": [0.5]},
        run="x {lmax}",
        args={"lmax": "{lmax}", "name": "l{lmax}", "fast": "{fast}", "both": "{lmax}{fast}", "r": ["{r}"]},
    )
    assert body == {
        "run": "x 500",
        "args": {"lmax": 500, "name": "l500", "fast": False, "both": "500false", "r": [0.5]},
    }
    assert type(body["args"]["lmax"]) is int


def test_a_lone_placeholder_outside_args_becomes_text() -> None:
    assert expanded({"lmax": [500]}, description="{lmax}") == [{"description": "500"}]


def test_expand_leaves_the_entry_unchanged() -> None:
    entry = {"id": "a{n}", "env": {"K": "v"}, "args": {"x": "{n}"}, "matrix": {"n": [1, 2]}}
    assert [body["id"] for body, _ in expand(entry)[0]] == ["a1", "a2"]
    assert entry == {"id": "a{n}", "env": {"K": "v"}, "args": {"x": "{n}"}, "matrix": {"n": [1, 2]}}


def test_expand_a_plain_entry_is_itself() -> None:
    entry = {"id": "a", "kind": "shell", "run": "echo {n}"}
    assert expand(entry) == ([(entry, {})], [])


def test_expand_substitutes_everywhere_but_keeps_args_types() -> None:
    entry = {
        "id": "cl-{lmax}",
        "kind": "python",
        "call": "cmbtoy:power_spectrum",
        "args": {"lmax": "{lmax}", "out": "cl_{lmax}.txt", "list": ["{lmax}", 1]},
        "outputs": ["cl_{lmax}.txt"],
        "matrix": {"lmax": [500, 1000]},
    }
    tasks, problems = expand(entry)
    assert problems == []
    assert tasks == [
        (
            {
                "id": "cl-500",
                "kind": "python",
                "call": "cmbtoy:power_spectrum",
                "outputs": ["cl_500.txt"],
                "args": {"lmax": 500, "out": "cl_500.txt", "list": [500, 1]},
            },
            {"lmax": 500},
        ),
        (
            {
                "id": "cl-1000",
                "kind": "python",
                "call": "cmbtoy:power_spectrum",
                "outputs": ["cl_1000.txt"],
                "args": {"lmax": 1000, "out": "cl_1000.txt", "list": [1000, 1]},
            },
            {"lmax": 1000},
        ),
    ]
    assert entry["args"] == {"lmax": "{lmax}", "out": "cl_{lmax}.txt", "list": ["{lmax}", 1]}  # not modified


def test_expand_reports_problems_relative_to_the_matrix() -> None:
    entry = {"id": "a{n}", "matrix": {"n": [1], "exclude": [{"x": 1}]}}
    assert expand(entry) == ([], [MatrixProblem(("exclude", 0, "x"), "'x' is not a matrix parameter")])


# --- through load_spec -------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> JobSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return load_spec(str(path))


SPEC = """\
version: 1
job:
  name: sweep
tasks:
  - id: prep-{nside}
    kind: shell
    run: echo prep
    matrix:
      nside: [64, 128, 512]
  - id: sim-n{nside}-s{seed}
    kind: shell
    description: Simulate nside={nside}, seed {seed}.
    run: |
      echo "${HOME}" {nside} {seed} | awk '{print $1}' > map_{nside}_{seed}.txt
    depends_on: ["prep-{nside}"]
    inputs: ["prep_{nside}.txt"]
    outputs: ["map_{nside}_{seed}.txt"]
    env:
      SEED: "{seed}"
      TAG: "n{nside}"
      THREADS: 4
      FAST: "{fast}"
    matrix:
      nside: [64, 128]
      seed: [1, 2]
      fast: [true]
      exclude:
        - {nside: 128, seed: 2}
      include:
        - {nside: 512, seed: 1, fast: false}
"""


def test_placeholders_are_substituted_and_other_braces_left_alone(tmp_path: Path) -> None:
    spec = load(tmp_path, SPEC)
    assert [t.id for t in spec.tasks] == [
        "prep-64", "prep-128", "prep-512",
        "sim-n64-s1", "sim-n64-s2", "sim-n128-s1", "sim-n512-s1",
    ]
    t = spec.task("sim-n128-s1")
    assert t.description == "Simulate nside=128, seed 1."
    assert t.run == "echo \"${HOME}\" 128 1 | awk '{print $1}' > map_128_1.txt\n"
    assert t.depends_on == ("prep-128",)
    assert t.inputs == ("prep_128.txt",)
    assert t.outputs == ("map_128_1.txt",)
    assert dict(t.env) == {"SEED": "1", "TAG": "n128", "THREADS": "4", "FAST": "true"}
    assert dict(spec.task("sim-n512-s1").env)["FAST"] == "false"


def test_task_matrix_and_origin(tmp_path: Path) -> None:
    spec = load(tmp_path, SPEC)
    t = spec.task("sim-n64-s2")
    assert isinstance(t.matrix, MappingProxyType)
    assert dict(t.matrix) == {"nside": 64, "seed": 2, "fast": True}
    assert t.origin == "$.tasks[1] (nside=64, seed=2, fast=true)"
    assert spec.task("sim-n512-s1").origin == "$.tasks[1] (nside=512, seed=1, fast=false)"
    assert spec.task("prep-64").origin == "$.tasks[0] (nside=64)"
    assert t.line == 10  # where the entry starts in the file


def test_a_plain_task_has_no_matrix_and_a_bare_origin(tmp_path: Path) -> None:
    spec = load(tmp_path, "version: 1\njob:\n  name: demo\ntasks:\n  - id: a\n    kind: shell\n    run: echo {n}\n")
    (t,) = spec.tasks
    assert dict(t.matrix) == {}
    assert t.origin == "$.tasks[0]"
    assert t.run == "echo {n}"


def test_args_keep_the_value_type_unless_inside_text(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        """\
version: 1
job:
  name: cl
tasks:
  - id: cl-{lmax}
    kind: python
    call: cmbtoy:power_spectrum
    args: {lmax: "{lmax}", name: "l{lmax}", flag: "{fast}", ratio: "{r}"}
    matrix:
      lmax: [500]
      fast: [false]
      r: [0.5]
""",
    )
    args = spec.tasks[0].args
    assert dict(args) == {"lmax": 500, "name": "l500", "flag": False, "ratio": 0.5}
    assert type(args["lmax"]) is int and type(args["flag"]) is bool and type(args["ratio"]) is float


def test_a_dependency_glob_expands_to_every_matching_task_sorted(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        """\
version: 1
job:
  name: sweep
tasks:
  - id: sweep-{n}
    kind: shell
    run: echo {n}
    matrix:
      n: [3, 10, 1, 2]
  - id: setup
    kind: shell
    run: echo setup
  - id: sum
    kind: shell
    run: echo sum
    depends_on: [setup, "sweep-*", sweep-3]
""",
    )
    assert [t.id for t in spec.tasks] == ["sweep-3", "sweep-10", "sweep-1", "sweep-2", "setup", "sum"]
    assert spec.task("sum").depends_on == ("setup", "sweep-1", "sweep-10", "sweep-2", "sweep-3")


def test_a_glob_does_not_make_a_task_depend_on_itself(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "version: 1\njob:\n  name: d\ntasks:\n"
        "  - id: s-{n}\n    kind: shell\n    run: echo\n    matrix:\n      n: [1, 2]\n"
        "  - id: s-all\n    kind: shell\n    run: echo\n    depends_on: ['s-*']\n",
    )
    assert spec.task("s-all").depends_on == ("s-1", "s-2")


@pytest.mark.slow
def test_a_100000_task_matrix_expands(tmp_path: Path) -> None:
    a_values = ", ".join(map(str, range(1000)))
    b_values = ", ".join(map(str, range(100)))
    spec = load(
        tmp_path,
        f"""\
version: 1
job:
  name: big
tasks:
  - id: t-{{a}}-{{b}}
    kind: shell
    run: echo {{a}} {{b}}
    matrix:
      a: [{a_values}]
      b: [{b_values}]
""",
    )
    assert len(spec.tasks) == 100_000
    assert len({t.id for t in spec.tasks}) == 100_000


# --- the tasks held compactly ------------------------------------------------------------------

SWEEP = """\
version: 1
job:
  name: sweep
tasks:
  - id: prep
    kind: shell
    run: echo prep
  - id: sim-{n}-{fast}
    kind: shell
    run: echo {n}
    depends_on: [prep]
    outputs: [out.txt]
    matrix:
      n: [1, 2, 3]
      fast: [true, false]
      exclude: [{n: 2, fast: false}]
      include: [{n: 9, fast: true}]
  - id: calc-{n}
    kind: python
    call: json:dumps
    args: {n: "{n}"}
    estimate: 2
    matrix:
      n: [5, 6]
"""


def test_the_tasks_of_a_spec_are_a_sequence_made_on_demand(tmp_path: Path) -> None:
    spec = load(tmp_path, SWEEP)
    ids = ["prep", "sim-1-true", "sim-1-false", "sim-2-true", "sim-3-true", "sim-3-false", "sim-9-true",
           "calc-5", "calc-6"]
    assert len(spec.tasks) == 9
    assert [t.id for t in spec.tasks] == ids == [spec.tasks[i].id for i in range(9)] == list(spec.tasks.ids)
    assert spec.tasks[-1].id == "calc-6" and [t.id for t in spec.tasks[1:3]] == ids[1:3]
    with pytest.raises(IndexError):
        spec.tasks[9]
    assert [spec.position(i) for i in ids] == list(range(9))
    with pytest.raises(KeyError):
        spec.task("sim-2-false")  # excluded
    t = spec.task("sim-3-false")
    assert t == spec.tasks[5] and t is not spec.tasks[5]  # made again, equal
    assert (t.run, t.depends_on, t.outputs, dict(t.matrix), t.origin) == (
        "echo 3", ("prep",), ("out.txt",), {"n": 3, "fast": False}, "$.tasks[1] (n=3, fast=false)")
    assert spec.task("sim-9-true").matrix == {"n": 9, "fast": True}
    assert spec.task("calc-6").args == {"n": 6} and spec.task("calc-6").estimate == 2
    assert spec.task("prep").matrix == {} and spec.task("prep").depends_on == ()


def test_an_entry_says_what_varies_between_its_tasks(tmp_path: Path) -> None:
    spec = load(tmp_path, SWEEP)
    prep, sims, calcs = spec.tasks.entries
    assert [len(e) for e in (prep, sims, calcs)] == [1, 6, 2]
    assert [e.start for e in (prep, sims, calcs)] == [0, 1, 7]
    assert [name for name in ("id", "run", "outputs", "matrix", "kind") if sims.varies(name)] == ["id", "run", "matrix"]
    assert [name for name in ("id", "args", "call", "matrix") if calcs.varies(name)] == ["id", "args", "matrix"]
    assert not prep.varies("id") and not prep.varies("matrix")
    assert sims.template is not None and sims.template.outputs == ("out.txt",) and sims.template.kind == "shell"
    assert [t.id for t in spec.tasks.of_kind("python")] == ["calc-5", "calc-6"]
    assert [spec.tasks.field(i, name) for i, name in ((2, "outputs"), (2, "run"), (8, "args"), (0, "matrix"))] == [
        ("out.txt",), "echo 1", {"n": 6}, {}]


def test_a_grid_holds_the_combinations_by_index() -> None:
    grid, problems = Grid.of({"n": [1, 2, 3], "s": ["a", True], "exclude": [{"n": 2}], "include": [{"n": 7, "s": "z"}]})
    assert problems == [] and grid is not None
    assert len(grid) == 5 and grid.product_size == 4
    assert [grid.values(k) for k in range(5)] == [
        {"n": 1, "s": "a"}, {"n": 1, "s": True}, {"n": 3, "s": "a"}, {"n": 3, "s": True}, {"n": 7, "s": "z"}]
    assert list(grid.all_values()) == [grid.values(k) for k in range(5)]
    assert list(grid.rows(texts=True)) == [("1", "a"), ("1", "true"), ("3", "a"), ("3", "true")]
    assert grid.texts("x{n}-{s}-${n}-{{n}}-{o}") == ["x1-a-${n}-{n}-{o}", "x1-true-${n}-{n}-{o}", "x3-a-${n}-{n}-{o}",
                                                    "x3-true-${n}-{n}-{o}", "x7-z-${n}-{n}-{o}"]
    three, _ = Grid.of({"a": [1, 2], "b": [3], "c": [4, 5]})
    assert three is not None and [three.values(k) for k in range(4)] == combinations({"a": [1, 2], "b": [3], "c": [4, 5]})[0]
