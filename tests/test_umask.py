"""Files are written with the user's umask: the run directory (``run.json``, journals, logs, published
outputs, the lock), the ledger and its journals, the cost report, an export and the sbatch script are
0644 under ``umask 022`` and 0640 under ``umask 027`` (directories 0755 and 0750, the script 0755 and
0750), so a group can read them; in a directory with a default ACL, the ACL decides, as it does for any
program. The CLI runs in a shell that sets the umask first, as a login would."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env, cli, write_spec
from tests.helpers.ledger_entries import entry, write_chain
from tests.helpers.runs import published

JOB = """\
version: 1
job: {name: modes}
tasks:
  - id: sh
    kind: shell
    run: mkdir -p maps && echo map > maps/m.txt
    outputs: [maps/m.txt]
  - id: py
    kind: python
    call: json:dumps
    args: [[1, 2]]
    depends_on: [sh]
"""


def umasked(mask: int) -> tuple[str, ...]:
    """A launcher that runs the command under ``mask``."""
    return ("sh", "-c", f'umask {mask:03o} && exec "$@"', "sh")


def modes(root: Path) -> dict[str, set[str]]:
    """{"files": modes of the regular files under ``root``, "dirs": of the directories} (octal strings)."""
    found: dict[str, set[str]] = {"files": set(), "dirs": set()}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            found["files"].add(oct(stat.S_IMODE(info.st_mode)))
        elif stat.S_ISDIR(info.st_mode):
            found["dirs"].add(oct(stat.S_IMODE(info.st_mode)))
    return found


@pytest.mark.parametrize(("mask", "file", "directory"), [(0o022, "0o644", "0o755"), (0o027, "0o640", "0o750")])
def test_a_run_and_its_reports_follow_the_umask(tmp_path: Path, mask: int, file: str, directory: str) -> None:
    write_spec(tmp_path, JOB)
    run = cli(tmp_path, "run", "job.yaml", "--quiet", launcher=umasked(mask))
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "runs" / "modes"
    assert json.loads((published(run_dir, "py") / "return.json").read_text()) == "[1, 2]"
    for name in ("run.json", "layout.json", ".lock", "journal/rank-0000.jsonl", published(run_dir, "sh") / "maps/m.txt"):
        assert oct(stat.S_IMODE((run_dir / name).stat().st_mode)) == file, name
    assert modes(run_dir) == {"files": {file}, "dirs": {directory}}

    write_chain(tmp_path / "ledger.jsonl", [entry(1), entry(2)])
    for args in (["report", "ledger.jsonl", "-o", "report.html"], ["export", "ledger.jsonl", "-o", "calls.csv"]):
        result = cli(tmp_path, "ledger", *args, launcher=umasked(mask))
        assert result.returncode == 0, result.stderr
        assert oct(stat.S_IMODE((tmp_path / args[-1]).stat().st_mode)) == file, args


AGENT_JOB = """\
version: 1
job: {{name: modes}}
llm:
  default_model: m
  models:
    m:
      model: test-model
      base_url: {url}
      api_key_env: TEST_LLM_KEY
      max_retries: 0
      price: {{prompt_per_1m: 2.0, completion_per_1m: 8.0}}
tasks:
  - id: write
    kind: agent
    instructions: "write the summary"
    outputs: [summary.md]
"""


@pytest.mark.slow  # an agent process against a scripted endpoint
def test_the_ledger_and_an_agent_s_files_follow_the_umask(tmp_path: Path) -> None:
    from tests.helpers.scripted_llm import Reply, ScriptedLLM

    with ScriptedLLM([Reply("the summary")]) as srv:
        write_spec(tmp_path, AGENT_JOB.format(url=srv.base_url))
        env = clean_env(tmp_path, TEST_LLM_KEY="sk-test-key")
        run = cli(tmp_path, "run", "job.yaml", "--quiet", env=env, launcher=umasked(0o027))
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "runs" / "modes"
    assert oct(stat.S_IMODE((run_dir / "ledger.jsonl").stat().st_mode)) == "0o640"
    assert modes(run_dir) == {"files": {"0o640"}, "dirs": {"0o750"}}


@pytest.mark.slow  # the local Slurm cluster
def test_the_sbatch_script_follows_the_umask(tmp_path: Path, slurm_conf: str) -> None:
    from tests.helpers.slurm_cluster import env_for

    write_spec(tmp_path, JOB)
    env = env_for(clean_env(tmp_path), slurm_conf)
    result = cli(tmp_path, "submit", "job.yaml", "--sbatch-arg=--hold", env=env, launcher=umasked(0o027))
    assert result.returncode == 0, result.stderr
    try:
        slurm = tmp_path / "runs" / "modes" / "slurm"
        assert oct(stat.S_IMODE((slurm / "job-001.sbatch").stat().st_mode)) == "0o750"
        assert oct(stat.S_IMODE((slurm / "jobs.json").stat().st_mode)) == "0o640"
    finally:
        assert cli(tmp_path, "cancel", "runs/modes", env=env).returncode == 0


SETFACL = shutil.which("setfacl")


@pytest.mark.skipif(SETFACL is None, reason="setfacl (Debian package acl) is not installed")
def test_a_directory_s_default_acl_decides_over_the_umask(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    acl = subprocess.run([str(SETFACL), "-d", "-m", "u::rwx,g::rwx,o::---", str(project)], capture_output=True,
                         text=True)
    if acl.returncode != 0:
        pytest.skip(f"no default ACLs here: {acl.stderr.strip()}")
    write_spec(project, JOB)
    run = cli(project, "run", "job.yaml", "--quiet", launcher=umasked(0o022))
    assert run.returncode == 0, run.stderr
    run_dir = project / "runs" / "modes"
    assert oct(stat.S_IMODE((run_dir / "run.json").stat().st_mode)) == "0o660"  # not 0644: others may not read
    assert modes(run_dir) == {"files": {"0o660"}, "dirs": {"0o770"}}

    bin_dir = tmp_path / "bin"  # an sbatch that only answers a job id
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = clean_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = cli(project, "submit", "job.yaml", env=env, launcher=umasked(0o022))
    assert (result.returncode, result.stdout) == (0, "4242\n"), result.stderr
    assert oct(stat.S_IMODE((run_dir / "slurm" / "job-001.sbatch").stat().st_mode)) == "0o770"
    assert oct(stat.S_IMODE((run_dir / "slurm" / "jobs.json").stat().st_mode)) == "0o660"
