"""The sbatch script renderer: golden files, quoting, option merging and the errors a user sees.

Pure functions: no Slurm needed. ``UPDATE_GOLDEN=1 pytest tests/test_slurm_script.py`` rewrites the
golden files after a deliberate change (review the diff)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from cmbagent_batch.errors import UsageError
from cmbagent_batch.slurm.script import (
    OPTION_NAMES,
    JobScript,
    SbatchOptions,
    options,
    render,
    template_text,
    walltime_grace,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

JOB = JobScript(job_name="cmb-lensing", spec="/home/ada/jobs/lensing.yaml", run_dir="/scratch/ada/lensing",
                work_dir="/home/ada/jobs", python="/opt/venvs/cmb/bin/python", run_args=("--run-dir", "/scratch/ada/lensing"),
                kill_grace=5.0)


def check_golden(name: str, text: str) -> None:
    path = os.path.join(GOLDEN, name)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    with open(path, encoding="utf-8") as fh:
        assert text == fh.read(), f"{name} changed; UPDATE_GOLDEN=1 rewrites it"


def test_minimal_script_matches_golden() -> None:
    opts = options({"ntasks_per_node": 3, "time": "10:00"}, {})
    check_golden("minimal.sbatch", render(template_text(), opts, JOB))


def test_full_script_matches_golden_flags_win() -> None:
    spec = {"partition": "regular", "account": "cmb", "qos": "normal", "nodes": 2, "ntasks_per_node": 4,
            "cpus_per_task": 8, "time": "06:00:00", "mem": "64G", "constraint": "cpu", "signal_grace": 300,
            "requeue": 2, "mpi": "pmix", "extra_directives": ("--mail-type=END",)}
    flags = {"partition": "debug", "time": "1-00:00:00", "requeue": 3, "dependency": "afterok:1234", "nodes": None,
             "sbatch_args": ("--exclusive", "--comment=two words")}
    opts = options(spec, flags)
    assert (opts.partition, opts.time, opts.requeue, opts.nodes) == ("debug", "1-00:00:00", 3, 2)
    check_golden("full.sbatch", render(template_text(), opts, JOB))


def test_every_value_is_shell_quoted() -> None:
    hostile = "x'; touch /tmp/pwned; echo '"
    job = JobScript(job_name=f"name {hostile}", spec=f"/a b/{hostile}.yaml", run_dir="/r $HOME/`id`",
                    work_dir="/w $(id)", python="/v e/bin/python", run_args=("--run-dir", "/r $HOME/`id`"),
                    kill_grace=5.0)
    text = render(template_text(), options({"partition": hostile, "account": "a b"}, {}), job)
    assert f"#SBATCH --partition={shlex.quote(hostile)}" in text
    assert f"#SBATCH --job-name={shlex.quote('name ' + hostile)}" in text
    assert "#SBATCH --account='a b'" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    # bash parses the body without running it (-n): quoting holds, and no hostile word stands unquoted
    proc = subprocess.run(["bash", "-n"], input="\n".join(body), text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    run_line = next(line for line in body if line.startswith("srun"))
    words = shlex.split(run_line.rstrip(" &"))
    assert words[words.index("run") + 1] == job.spec
    assert words[words.index("--run-dir") + 1] == job.run_dir
    assert "cd " + shlex.quote(job.work_dir) in text


def test_walltime_grace_keeps_a_reserve() -> None:
    assert walltime_grace(SbatchOptions(signal_grace=120), kill_grace=5) == 95
    assert walltime_grace(SbatchOptions(signal_grace=30), kill_grace=5) == 15
    assert walltime_grace(SbatchOptions(signal_grace=10), kill_grace=10) == 0
    text = render(template_text(), SbatchOptions(signal_grace=60), JOB)
    assert "--signal=B:USR1@60" in text and "--walltime-grace 35 " in text


def test_requeue_zero_asks_for_no_requeue_directive() -> None:
    text = render(template_text(), SbatchOptions(), JOB)
    assert "--requeue" not in text.split("#\n", 1)[0]
    assert "--requeue-max 0" in text


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError) as err:
        options({"partiton": "x"}, {"walltime": "1"})
    assert str(err.value) == ("unknown Slurm options 'partiton', 'walltime'; valid: " + ", ".join(OPTION_NAMES))


@pytest.mark.parametrize(("flags", "message"), [
    ({"time": "abc"}, "--time 'abc': malformed Slurm time; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    ({"time": "2", "signal_grace": 120},
     "slurm.signal_grace 120 s is not shorter than the walltime 2 (120 s): the job would be told to stop as it starts"),
    ({"sbatch_args": ("--output=x.log",)},
     "sbatch option '--output=x.log': cmbagent-batch sets --output itself (see `cmbagent-batch submit --help`)"),
    ({"sbatch_args": ("--signal=USR2@60",)},
     "sbatch option '--signal=USR2@60': cmbagent-batch sets --signal itself (see `cmbagent-batch submit --help`)"),
    ({"sbatch_args": ("exclusive",)}, "sbatch option 'exclusive': expected one option such as --mail-type=END"),
    ({"requeue": -1}, "--requeue -1: expected a whole number of at least 0"),
    ({"mpi": "openmpi"}, "slurm.mpi 'openmpi': expected pmi2, pmix or none"),
], ids=["time", "grace", "output", "signal", "not-an-option", "requeue", "mpi"])
def test_bad_options_are_named(flags: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        options({}, flags)
    assert str(err.value) == message


def test_unknown_template_field_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['nope'\]"):
        render("#!/bin/bash\n{{ nope }}\n", SbatchOptions(), JOB)
