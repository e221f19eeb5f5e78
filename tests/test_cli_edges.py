"""The command line's rough edges, run as users run it (``python -m cmbagent_batch`` in a subprocess):
``--only`` never takes the spec's path, a mistyped flag or command gets a did-you-mean and the valid list
in every (sub)command, a placeholder in a YAML flow list gets a hint to quote it, and a refused ``submit``
leaves no run directory behind (against a real local Slurm, and before sbatch is reached)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env, cli, write_spec
from tests.helpers.runs import published, work_dir

JOB = """\
version: 1
job: {name: edges}
tasks:
  - id: flaky
    kind: shell
    run: echo flaky > out.txt
    outputs: [out.txt]
  - id: other
    kind: shell
    run: "true"
  - id: sim-1
    kind: shell
    run: "true"
  - id: sim-2
    kind: shell
    run: "true"
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_spec(tmp_path, JOB)


def error_lines(result: subprocess.CompletedProcess[str], command: str) -> str:
    """stderr after the usage lines, once the usage is checked to be ``command``'s own."""
    assert result.stderr.startswith(f"usage: cmbagent-batch {command} [-h]"), result.stderr
    return result.stderr[result.stderr.index(f"cmbagent-batch {command}: error: "):]


# -- --only takes one value per flag ---------------------------------------------------------------------


def test_only_before_the_spec_runs_that_task(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "run", "--only", "flaky", "job.yaml", "--quiet")
    assert (result.returncode, result.stderr) == (0, "")
    assert (published(tmp_path / "runs" / "edges", "flaky") / "out.txt").read_text() == "flaky\n"
    assert not work_dir(tmp_path / "runs" / "edges", "other").exists()


@pytest.mark.parametrize("only", [["--only", "flaky,sim-*"], ["--only", "flaky", "--only", "sim-*"],
                                  ["--only=flaky,sim-[1,2]"]])
def test_several_tasks_by_commas_or_by_repeating_the_flag(tmp_path: Path, job: Path, only: list[str]) -> None:
    result = cli(tmp_path, "run", *only, "job.yaml", "--dry-run")
    assert (result.returncode, result.stdout) == (0, "flaky: run (never ran)\nsim-1: run (never ran)\n"
                                                     "sim-2: run (never ran)\n")


@pytest.mark.parametrize("args", [["--only", "flaky", "other", "job.yaml"], ["job.yaml", "--only", "flaky", "other"]])
def test_only_with_two_values_is_refused_saying_how_to_give_several(tmp_path: Path, job: Path,
                                                                   args: list[str]) -> None:
    result = cli(tmp_path, "run", *args)
    assert (result.returncode, result.stdout) == (2, "")
    extra = args[-1]
    assert error_lines(result, "run") == (
        f"cmbagent-batch run: error: unexpected argument: {extra}\n"
        "--only takes one value: give several tasks as --only a,b or as --only a --only b\n")


def test_an_empty_task_name_in_only_is_refused(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "run", "--only", "flaky,", "job.yaml")
    assert result.returncode == 2
    assert error_lines(result, "run") == (
        "cmbagent-batch run: error: argument --only: 'flaky,': an empty task name (write --only a,b)\n")


# -- unknown options, commands and choices -----------------------------------------------------------------

SUBMIT_OPTIONS = (
    "valid options: --help/-h, --dry-run, --nodes/-N, --ntasks-per-node, --cpus-per-task, --time/-t,\n"
    "  --partition/-p, --account/-A, --qos/-q, --constraint/-C, --mem, --dependency/-d, --sbatch-arg,\n"
    "  --requeue, --signal-grace, --run-dir, --cache-dir\n")

RUN_OPTIONS = (
    "valid options: --help/-h, --fresh, --prune-superseded, --only, --dry-run, --quiet, --walltime-grace,\n"
    "  --walltime-file, --backend, --mode, --workers, --task-timeout, --retries, --keep-going,\n"
    "  --fail-fast, --run-dir, --cache-dir\n")


def test_an_unknown_submit_option_gets_a_did_you_mean_and_the_valid_list(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "submit", "job.yaml", "--ntask-per-node", "2")
    assert (result.returncode, result.stdout) == (2, "")
    assert error_lines(result, "submit") == (
        "cmbagent-batch submit: error: unknown option --ntask-per-node (did you mean --ntasks-per-node?)\n"
        + SUBMIT_OPTIONS)
    assert not (tmp_path / "runs").exists()


def test_every_unknown_option_is_named_with_its_own_hint(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "submit", "job.yaml", "--ntask-per-node=2", "--tme", "5", "--zzz")
    assert error_lines(result, "submit") == (
        "cmbagent-batch submit: error: unknown option --ntask-per-node (did you mean --ntasks-per-node?)\n"
        "unknown option --tme (did you mean --time?)\n"
        "unknown option --zzz (pass sbatch options as --sbatch-arg=--zzz)\n" + SUBMIT_OPTIONS)


@pytest.mark.parametrize(("args", "command", "message"), [
    (["run", "job.yaml", "--wokers", "2"], "run",
     "unknown option --wokers (did you mean --workers?)\n" + RUN_OPTIONS),
    (["run", "job.yaml", "-q"], "run",
     "unknown option -q (did you mean --quiet?)\n" + RUN_OPTIONS),
    (["plan", "job.yaml", "--estimates"], "plan",
     "unknown option --estimates (did you mean --estimate?)\n"
     "valid options: --help/-h, --format, --refresh-analysis, --estimate, --backend, --mode, --workers,\n"
     "  --task-timeout, --retries, --keep-going, --fail-fast, --run-dir, --cache-dir\n"),
    (["validate", "job.yaml", "--formats", "json"], "validate",
     "unknown option --formats (did you mean --format?)\nvalid options: --help/-h, --format\n"),
    (["status", "runs/edges", "--explian"], "status",
     "unknown option --explian (did you mean --explain?)\nvalid options: --help/-h, --format, --explain, --all\n"),
    (["ledger", "summarize", "ledger.jsonl", "--bi", "task"], "ledger summarize",
     "unknown option --bi (did you mean --by?)\nvalid options: --help/-h, --by, --format\n"),
    (["ledger", "report", "ledger.jsonl", "-o", "r.html", "--budjet", "1"], "ledger report",
     "unknown option --budjet (did you mean --budget?)\nvalid options: --help/-h, --output/-o, --budget\n"),
])
def test_every_subcommand_names_its_unknown_options(tmp_path: Path, job: Path, args: list[str], command: str,
                                                    message: str) -> None:
    result = cli(tmp_path, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert error_lines(result, command) == f"cmbagent-batch {command}: error: {message}"


@pytest.mark.parametrize(("args", "command", "message"), [
    (["run", "--p", "job.yaml"], "run", "unknown option --p (did you mean --prune-superseded?)\n" + RUN_OPTIONS),
    (["run", "job.yaml", "--prune"], "run", "unknown option --prune (did you mean --prune-superseded?)\n" + RUN_OPTIONS),
    (["run", "job.yaml", "--dry"], "run", "unknown option --dry (did you mean --dry-run?)\n" + RUN_OPTIONS),
    (["submit", "job.yaml", "--ntasks", "2"], "submit",
     "unknown option --ntasks (did you mean --ntasks-per-node?)\n" + SUBMIT_OPTIONS),
])
def test_no_option_is_abbreviated_a_prefix_gets_the_full_name(tmp_path: Path, job: Path, args: list[str],
                                                              command: str, message: str) -> None:
    (tmp_path / "runs" / "edges" / "superseded" / "flaky-20260102T030405000000Z-0a1b2c3d").mkdir(parents=True)
    result = cli(tmp_path, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert error_lines(result, command) == f"cmbagent-batch {command}: error: {message}"
    assert [p.name for p in (tmp_path / "runs" / "edges").iterdir()] == ["superseded"]  # nothing pruned, nothing made
    assert len(list((tmp_path / "runs" / "edges" / "superseded").iterdir())) == 1


@pytest.mark.parametrize("given", [["--gres", "gpu:1"], ["--gres=gpu:1"]])
def test_an_unknown_submit_option_close_to_none_is_shown_passed_to_sbatch(tmp_path: Path, job: Path,
                                                                         given: list[str]) -> None:
    result = cli(tmp_path, "submit", "job.yaml", *given, "--exclusive")
    assert (result.returncode, result.stdout) == (2, "")
    assert error_lines(result, "submit") == (
        "cmbagent-batch submit: error: unknown option --gres (pass sbatch options as --sbatch-arg=--gres=gpu:1)\n"
        "unknown option --exclusive (pass sbatch options as --sbatch-arg=--exclusive)\n" + SUBMIT_OPTIONS)


def test_what_follows_a_double_dash_is_an_argument_not_an_option(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "run", "--only", "flaky", "--", "job.yaml", "--dry-run")
    assert (result.returncode, result.stdout) == (2, "")
    assert error_lines(result, "run") == "cmbagent-batch run: error: unexpected argument: --dry-run\n"
    result = cli(tmp_path, "run", "--only", "flaky", "--quiet", "--", "job.yaml")
    assert (result.returncode, result.stderr) == (0, "")
    assert (published(tmp_path / "runs" / "edges", "flaky") / "out.txt").read_text() == "flaky\n"


TOP_USAGE = "usage: cmbagent-batch [-h] [--version] COMMAND ...\n"


@pytest.mark.parametrize(("args", "stderr"), [
    (["valdate", "job.yaml"], TOP_USAGE + (
        "cmbagent-batch: error: unknown command 'valdate' (did you mean 'validate'?); the commands are: validate, "
        "config, plan, run, status, export, report, ledger, submit, cancel, schema\n")),
    (["ledger", "sumarize", "x"], "usage: cmbagent-batch ledger [-h] SUBCOMMAND ...\n" + (
        "cmbagent-batch ledger: error: unknown command 'sumarize' (did you mean 'summarize'?); the commands are: "
        "summarize, verify, export, reprice, diff, report\n")),
    (["--verison", "validate", "job.yaml"], TOP_USAGE + (
        "cmbagent-batch: error: unknown option --verison (did you mean --version?)\n"
        "valid options: --help/-h, --version\n")),
])
def test_an_unknown_command_or_top_level_option_gets_a_did_you_mean(tmp_path: Path, args: list[str],
                                                                    stderr: str) -> None:
    result = cli(tmp_path, *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", stderr)


def test_a_choice_that_is_not_one_gets_a_did_you_mean(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "validate", "job.yaml", "--format", "jsn")
    assert error_lines(result, "validate") == (
        "cmbagent-batch validate: error: argument --format: invalid choice: 'jsn' (did you mean 'json'?); choose "
        "from text, json\n")


def test_a_good_command_line_is_unchanged(tmp_path: Path) -> None:
    result = cli(tmp_path, "schema", "run")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("{")


# -- a placeholder in a YAML flow collection -----------------------------------------------------------------

FLOW = """\
version: 1
job: {name: flow}
tasks:
  - id: cls-{lmax}
    kind: shell
    run: "true"
    matrix: {lmax: [1, 2]}
    outputs: [cls_{lmax}.txt]
"""


@pytest.mark.parametrize(("line", "where", "hint"), [
    ("    outputs: [cls_{lmax}.txt]", "8:19",
     "while parsing a flow sequence started at line 8, column 14: did not find expected ',' or ']' ({lmax} inside "
     "[...] is YAML flow syntax, not a placeholder: quote the value, as \"cls_{lmax}.txt\")"),
    ("    outputs: [a.txt, {lmax}_cl.txt]", "8:28",
     "while parsing a flow sequence started at line 8, column 14: did not find expected ',' or ']' ({lmax} inside "
     "[...] is YAML flow syntax, not a placeholder: quote the value, as \"{lmax}_cl.txt\")"),
    ("    env: {OUT: cls_{lmax}}", "8:20",
     "while parsing a flow mapping started at line 8, column 10: did not find expected ',' or '}' ({lmax} inside "
     "{...} is YAML flow syntax, not a placeholder: quote the value, as \"cls_{lmax}\")"),
])
def test_a_placeholder_in_a_flow_collection_gets_the_hint_to_quote_it(tmp_path: Path, line: str, where: str,
                                                                      hint: str) -> None:
    write_spec(tmp_path, FLOW.replace("    outputs: [cls_{lmax}.txt]", line))
    result = cli(tmp_path, "plan", "job.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"job.yaml:{where}: $: invalid YAML: {hint}\n")


def test_other_flow_errors_get_no_placeholder_hint(tmp_path: Path) -> None:
    write_spec(tmp_path, FLOW.replace("    outputs: [cls_{lmax}.txt]", "    env: {A: 1 B: 2}"))
    result = cli(tmp_path, "plan", "job.yaml")
    assert (result.returncode, result.stderr) == (2, "job.yaml:8:17: $: invalid YAML: while parsing a flow mapping "
                                                     "started at line 8, column 10: did not find expected ',' or '}'\n")


def test_a_quoted_placeholder_in_a_flow_list_is_valid(tmp_path: Path) -> None:
    write_spec(tmp_path, FLOW.replace("[cls_{lmax}.txt]", '["cls_{lmax}.txt"]'))
    assert cli(tmp_path, "validate", "job.yaml").returncode == 0


# -- a refused submit leaves no run directory --------------------------------------------------------------


def no_sbatch_env(tmp_path: Path) -> dict[str, str]:
    env = clean_env(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable)  # the venv's bin, without sbatch
    return env


def test_a_submit_refused_before_sbatch_runs_leaves_no_run_directory(tmp_path: Path, job: Path) -> None:
    result = cli(tmp_path, "submit", "job.yaml", "--time", "1:2:3:4")
    assert (result.returncode, result.stderr) == (2, (
        "cmbagent-batch: error: --time '1:2:3:4': malformed Slurm time; use minutes, MM:SS, HH:MM:SS, D-HH, "
        "D-HH:MM or D-HH:MM:SS\n"))
    assert not (tmp_path / "runs").exists()

    result = cli(tmp_path, "submit", "job.yaml", env=no_sbatch_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"cmbagent-batch: not submitted; removed {tmp_path}/runs, which this submit had made\n"
        "cmbagent-batch: error: sbatch not found on PATH: submitting the job needs a Slurm client (a login node of "
        "the cluster, or `slurm/local-cluster.sh up` for a local one)\n")
    assert not (tmp_path / "runs").exists()


def test_a_refused_submit_keeps_what_was_in_the_run_directory(tmp_path: Path, job: Path) -> None:
    run_dir = tmp_path / "runs" / "edges"
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine\n")
    result = cli(tmp_path, "submit", "job.yaml", env=no_sbatch_env(tmp_path))
    assert result.returncode == 2
    assert f"cmbagent-batch: not submitted; removed {run_dir}/slurm/job-001.sbatch, which this submit had made\n" \
        in result.stderr
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == ["notes.txt", "slurm"]


@pytest.mark.slow  # the local Slurm cluster
def test_a_submit_that_slurm_refuses_leaves_no_run_directory(tmp_path: Path, job: Path, slurm_conf: str) -> None:
    from tests.helpers.slurm_cluster import env_for

    result = cli(tmp_path, "submit", "job.yaml", "--partition", "nosuch", env=env_for(clean_env(tmp_path), slurm_conf))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-2] == f"cmbagent-batch: not submitted; removed {tmp_path}/runs, which this submit had made"
    assert lines[-1].startswith(f"cmbagent-batch: error: submitting the job: `sbatch --parsable {tmp_path}/runs/"
                                "edges/slurm/job-001.sbatch` failed (exit 1): ")
    assert "invalid partition specified: nosuch" in lines[-1].lower()
    assert not (tmp_path / "runs").exists()


def test_a_script_left_by_an_earlier_submit_is_never_taken_over(tmp_path: Path, job: Path) -> None:
    slurm = tmp_path / "runs" / "edges" / "slurm"
    slurm.mkdir(parents=True)
    (slurm / "job-001.sbatch").write_text("#!/bin/sh\n# mine\n")
    result = cli(tmp_path, "submit", "job.yaml", env=no_sbatch_env(tmp_path))
    assert result.returncode == 2
    assert f"cmbagent-batch: not submitted; removed {slurm}/job-002.sbatch, which this submit had made\n" \
        in result.stderr
    assert [p.name for p in slurm.iterdir()] == ["job-001.sbatch"]
    assert (slurm / "job-001.sbatch").read_text() == "#!/bin/sh\n# mine\n"
