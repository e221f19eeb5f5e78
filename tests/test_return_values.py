"""A python task's return value: converted to JSON by the documented rules, published as
``RUN_DIR/outputs/S/TASK/return.json``, and never a reason for a task to fail after its work is done."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import math
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from cmbagent_batch.tasks.returns import ARRAYS_DIR, MAX_LIST_ELEMENTS, encode
from tests.helpers import runs
from tests.helpers.cli import cli, write_spec


@pytest.fixture
def np() -> Any:
    """numpy (the ``test`` extra brings it); the tests that use it are skipped without it."""
    return pytest.importorskip("numpy")


SCIENCE = '''
import math

import numpy as np

from cmbagent_batch.tasks.returns import MAX_LIST_ELEMENTS as LIMIT


class Odd:
    def __repr__(self):
        return "Odd()"


def spectra(n=3):
    return {"n": np.int64(n), "a": np.arange(3)}


def big():
    return {"n": np.float32(0.5), "cl": {"tt": np.arange(LIMIT + 1, dtype=np.float64)}}


def not_finite():
    return {"x": math.nan, "arr": np.array([1.0, np.nan, -np.inf]), "s": np.float64("inf")}


def odd():
    return {"fit": Odd(), "ok": np.bool_(True)}


def summary(ctx):
    import json, os
    with open(os.path.join(ctx.work_dir, "return.json")) as fh:
        return {"upstream": json.load(fh)}
'''


def run_job(tmp_path: Path, tasks: str, isolation: str = "isolation: process") -> Path:
    (tmp_path / "science.py").write_text(SCIENCE)
    head = f"version: 1\njob: {{name: ret}}\nexecution: {{max_workers: 2, {isolation}}}\ntasks:\n"
    write_spec(tmp_path, head + textwrap.indent(textwrap.dedent(tasks).lstrip(), "  "))
    res = cli(tmp_path, "run", "job.yaml", "--quiet")
    assert res.returncode == 0, res.stderr
    return tmp_path / "runs" / "ret"


def published(run_dir: Path, task: str) -> Any:
    return json.loads((runs.published(run_dir, task) / "return.json").read_text())


def log_lines(run_dir: Path, task: str) -> list[str]:
    return (runs.work_dir(run_dir, task) / "logs" / "stderr.log").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["isolation: process", "isolation: thread"])
def test_numpy_values_are_published_as_json_at_the_top_of_the_task_outputs(tmp_path: Path, isolation: str,
                                                                            np: Any) -> None:
    run_dir = run_job(tmp_path, """
        - id: spectra
          kind: python
          call: science:spectra
    """, isolation)
    assert published(run_dir, "spectra") == {"n": 3, "a": [0, 1, 2]}
    assert sorted(p.name for p in runs.published(run_dir, "spectra").iterdir()) == ["return.json"]


@pytest.mark.slow
def test_an_array_over_the_limit_is_saved_as_npy_beside_return_json(tmp_path: Path, np: Any) -> None:
    run_dir = run_job(tmp_path, """
        - id: big
          kind: python
          call: science:big
    """)
    rel = f"{ARRAYS_DIR}/cl.tt.npy"
    assert published(run_dir, "big") == {
        "n": 0.5, "cl": {"tt": {"$npy": rel, "dtype": "float64", "shape": [MAX_LIST_ELEMENTS + 1]}},
    }
    saved = np.load(runs.published(run_dir, "big") / rel)
    assert saved.shape == (MAX_LIST_ELEMENTS + 1,) and saved[-1] == MAX_LIST_ELEMENTS
    assert log_lines(run_dir, "big")[-1] == (
        f"cmbagent-batch: attempt 1: return value: cl.tt: an array of {MAX_LIST_ELEMENTS + 1} elements "
        f"(over {MAX_LIST_ELEMENTS}) saved as {rel}"
    )


@pytest.mark.slow
def test_non_finite_floats_become_null_and_odd_values_their_repr_and_the_log_says_so(tmp_path: Path,
                                                                                      np: Any) -> None:
    run_dir = run_job(tmp_path, """
        - id: nan
          kind: python
          call: science:not_finite
        - id: odd
          kind: python
          call: science:odd
    """)
    assert published(run_dir, "nan") == {"x": None, "arr": [1.0, None, None], "s": None}
    assert log_lines(run_dir, "nan")[-1] == (
        "cmbagent-batch: attempt 1: return value: 4 non-finite float(s) written as null (at x, arr.1, arr.2 and 1 more)"
    )
    assert published(run_dir, "odd") == {"fit": "Odd()", "ok": True}
    assert log_lines(run_dir, "odd")[-1] == (
        "cmbagent-batch: attempt 1: return value: a value of type 'Odd' written as its repr (at fit)"
    )


@pytest.mark.slow
def test_a_dependent_reads_a_return_value_declared_as_an_output(tmp_path: Path, np: Any) -> None:
    run_dir = run_job(tmp_path, """
        - id: spectra
          kind: python
          call: science:spectra
          outputs: [return.json]
        - id: summary
          kind: python
          call: science:summary
          inputs: [return.json]
    """)
    assert published(run_dir, "spectra") == {"n": 3, "a": [0, 1, 2]}
    assert published(run_dir, "summary") == {"upstream": {"n": 3, "a": [0, 1, 2]}}
    # the dependent's own return value replaced its staged link; the producer's file is untouched
    assert published(run_dir, "spectra") == {"n": 3, "a": [0, 1, 2]}
    run_job(tmp_path, """
        - id: spectra
          kind: python
          call: science:spectra
          args: {n: 4}
          outputs: [return.json]
        - id: summary
          kind: python
          call: science:summary
          inputs: [return.json]
    """)  # a rerun: the dependent's own return.json of the first run is not in the way of its input
    assert published(run_dir, "spectra") == {"n": 4, "a": [0, 1, 2]}
    assert published(run_dir, "summary") == {"upstream": {"n": 4, "a": [0, 1, 2]}}


# --- the rules, one by one (no process) ----------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Fit:
    h0: float
    when: datetime.date


def rules(value: Any, tmp_path: Path) -> tuple[Any, list[str]]:
    text, notes = encode(value, str(tmp_path))
    return json.loads(text), notes


@pytest.mark.parametrize(("value", "expected"), [
    ((1, "a", None), [1, "a", None]),
    ({3, 1, 2}, [1, 2, 3]),
    (frozenset({"b", "a"}), ["a", "b"]),
    (PurePosixPath("/data/cl.txt"), "/data/cl.txt"),
    (datetime.datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05"),
    (datetime.date(2026, 1, 2), "2026-01-02"),
    (datetime.timedelta(minutes=1, microseconds=500_000), 60.5),
    (decimal.Decimal("0.25"), 0.25),
    (fractions.Fraction(1, 4), 0.25),
    (1 + 2j, {"real": 1.0, "imag": 2.0}),
    (b"\x00\xff", {"$base64": "AP8="}),
    (Colour.RED, "red"),
    (Fit(67.4, datetime.date(2026, 1, 2)), {"h0": 67.4, "when": "2026-01-02"}),
    ({1: "a", 2.5: "b", None: "d"}, {"1": "a", "2.5": "b", "null": "d"}),
    ({True: "c"}, {"true": "c"}),
])
def test_common_types_follow_the_documented_rule_without_a_note(value: Any, expected: Any, tmp_path: Path) -> None:
    assert rules(value, tmp_path) == (expected, [])


def test_numpy_scalars_and_small_arrays(tmp_path: Path, np: Any) -> None:
    value = {np.int32(1): np.float32(0.5), "b": np.bool_(False), "m": np.eye(2, dtype=np.int8),
             "c": np.array([1 + 1j]), "s": np.str_("x")}
    assert rules(value, tmp_path) == ({"1": 0.5, "b": False, "m": [[1, 0], [0, 1]],
                                       "c": [{"real": 1.0, "imag": 1.0}], "s": "x"}, [])
    assert not (tmp_path / ARRAYS_DIR).exists()


def test_a_circular_reference_and_an_unknown_key_are_written_as_their_repr(tmp_path: Path) -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    got, notes = rules({"loop": loop, (1, 2): "pair"}, tmp_path)
    assert got == {"loop": [1, "[1, [...]]"], "(1, 2)": "pair"}
    assert notes == ["a circular reference written as its repr (at loop.1)",
                     "a key of type 'tuple' written as its repr (at value)"]


def test_nan_in_a_plain_list_and_a_stale_arrays_directory(tmp_path: Path) -> None:
    (tmp_path / ARRAYS_DIR).mkdir()
    (tmp_path / ARRAYS_DIR / "old.npy").write_bytes(b"")
    assert rules([math.inf, 1.0], tmp_path) == ([None, 1.0], ["1 non-finite float(s) written as null (at 0)"])
    assert not (tmp_path / ARRAYS_DIR).exists()  # an earlier attempt's arrays are never published again


class Broken(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("no items today")

    def __repr__(self) -> str:
        return "Broken()"


def test_a_value_that_cannot_be_converted_at_all_is_written_as_its_repr(tmp_path: Path) -> None:
    assert rules([Broken(a=1)], tmp_path) == (
        "[Broken()]", ["a value that could not be converted (RuntimeError: no items today) written as its repr (at value)"],
    )
