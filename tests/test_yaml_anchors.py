"""Whether a spec may hold YAML anchors (``spec/yamlio.py``): the alias-bomb check runs only then, and the
bytes are looked at only around each '&'."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_batch.spec.yamlio import MAY_HAVE_ANCHORS, may_have_anchors
from tests.helpers.cli import cli, write_spec


@pytest.mark.parametrize("raw", [
    b"", b"&", b"&a", b"a&b", b" &a", b"x: &a 1", b"[&a 1]", b"{&a x: 1}", b",&a", b"&&", b"a && b", b"a &&b",
    b"\n&a", b"x\n&a", b"x\r&a", b"\t&a", b"\x0b&a", b"\x0c&a", b"&\n", b"& a", b"run: a & b", b"run: 'a &b'",
    b"x" * 5000 + b" &anchor", b"x: 1 &&& y",
])
def test_an_anchor_is_looked_for_around_each_ampersand_as_the_pattern_finds_it(raw: bytes) -> None:
    assert may_have_anchors(raw) == bool(MAY_HAVE_ANCHORS.search(raw))


def test_a_spec_with_shell_ampersands_and_an_anchor_loads(tmp_path: Path) -> None:
    write_spec(tmp_path, """\
        version: 1
        job: {name: amp}
        x-defaults: &shell {kind: shell}
        tasks:
          - {<<: *shell, id: a, run: "true && echo a"}
          - {<<: *shell, id: b, run: "echo b &"}
    """)
    res = cli(tmp_path, "validate", "job.yaml")
    assert (res.returncode, res.stderr) == (0, "")
