"""The PATH tasks start with (``execution.path``): the runner's interpreter directory first by default, so a
task's ``python`` is the runner's whether or not its virtual environment is activated, locally, on MPI worker
ranks and under ``submit``; ``inherit`` leaves PATH as the runner got it. And the Slurm job's one log."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.cli.slurm_status import slurm_lines
from cmbagent_batch.errors import UsageError
from cmbagent_batch.slurm import script
from cmbagent_batch.spec.model import TaskPath
from cmbagent_batch.tasks.path import interpreter_first, use_task_path
from tests.helpers.cli import clean_env, cli
from tests.helpers.mpi_run import MPIEXEC
from tests.helpers.runs import published
from tests.helpers.slurm_cluster import env_for, job_logs, wait_job_end

BIN = os.path.dirname(sys.executable)  # the runner's interpreter directory, as the CLI below is started
SYSTEM_PATH = "/usr/bin:/bin"  # a PATH without the virtual environment: it is not activated
PROBE = textwrap.dedent("""\
    command -v python || echo "no python"
    command -v python3
    python3 -c 'import sys; print(sys.prefix)'
    echo "$PATH"
""")
PROBE_MODULE = textwrap.dedent("""\
    import shutil
    import subprocess


    def where():
        run = subprocess.run(["python3", "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
        return {"python3": shutil.which("python3"), "prefix": run.stdout.strip()}
""")


def spec(tmp_path: Path, execution: str = "{}", extra: str = "") -> Path:
    """A shell task and a python task that say which python they find; ``execution``: the mapping."""
    (tmp_path / "probe.py").write_text(PROBE_MODULE)
    path = tmp_path / "job.yaml"
    path.write_text(f"""\
version: 1
job: {{name: where, run_dir: runs}}
execution: {execution}
tasks:
  - id: shell-{{i}}
    kind: shell
    matrix: {{i: [1, 2, 3, 4]}}
    run: ({'; '.join(PROBE.splitlines())}; echo "$CMBAGENT_RANK") > where.txt
    outputs: [where.txt]
  - id: py
    kind: python
    call: probe:where
{extra}""")
    return path


def system(name: str) -> str:
    """Where the system PATH finds ``name``, as ``command -v`` prints it (a test needs it there)."""
    found = shutil.which(name, path=SYSTEM_PATH)
    if name == "python3" and found is None:
        pytest.skip("no python3 on /usr/bin:/bin to tell from the runner's")
    return found or "no python"


def prefix_of(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def shell_saw(run_dir: Path, task: str = "shell-1") -> list[str]:
    return (published(run_dir, task) / "where.txt").read_text().splitlines()


def python_saw(run_dir: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((published(run_dir, "py") / "return.json").read_text())
    return found


def runner_python() -> list[str]:
    return [f"{BIN}/python", f"{BIN}/python3", sys.prefix, f"{BIN}:{SYSTEM_PATH}"]


def system_python() -> list[str]:
    return [system("python"), system("python3"), prefix_of(system("python3")), SYSTEM_PATH]


def run(tmp_path: Path, path: Path, launcher: tuple[str, ...] = (), **env: str) -> None:
    result = cli(tmp_path, "run", str(path), env=clean_env(tmp_path, **{"PATH": SYSTEM_PATH, **env}),
                 launcher=launcher, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


# -- locally -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_tasks_find_the_runners_python_first_though_the_venv_is_not_activated(tmp_path: Path,
                                                                              isolation: str) -> None:
    run(tmp_path, spec(tmp_path, f"{{isolation: {isolation}}}"))
    assert shell_saw(tmp_path / "runs") == [*runner_python(), "0"]
    assert python_saw(tmp_path / "runs") == {"python3": f"{BIN}/python3", "prefix": sys.prefix}


def test_path_inherit_leaves_the_runners_path_as_it_got_it(tmp_path: Path) -> None:
    run(tmp_path, spec(tmp_path, "{path: inherit}"))
    assert shell_saw(tmp_path / "runs") == [*system_python(), "0"]
    assert python_saw(tmp_path / "runs") == {"python3": system("python3"), "prefix": prefix_of(system("python3"))}


def test_cmbagent_path_overrides_the_spec_and_config_says_so(tmp_path: Path) -> None:
    path = spec(tmp_path, "{path: interpreter}")
    run(tmp_path, path, CMBAGENT_PATH="inherit")
    assert shell_saw(tmp_path / "runs") == [*system_python(), "0"]
    shown = cli(tmp_path, "config", str(path), env=clean_env(tmp_path, CMBAGENT_PATH="inherit")).stdout.splitlines()
    assert "execution.path                    inherit                   env CMBAGENT_PATH" in shown
    shown = cli(tmp_path, "config", str(path)).stdout.splitlines()
    assert "execution.path                    interpreter               spec line 3" in shown


def test_a_task_env_path_wins_and_a_command_can_prepend(tmp_path: Path) -> None:
    extra = """\
  - id: own
    kind: shell
    env: {PATH: /bin}
    run: echo "$PATH" > path.txt
    outputs: [path.txt]
  - id: prepend
    kind: shell
    run: PATH="/opt/tools/bin:$PATH"; echo "$PATH" > path.txt
    outputs: [path.txt]
"""
    run(tmp_path, spec(tmp_path, extra=extra))
    assert (published(tmp_path / "runs", "own") / "path.txt").read_text() == "/bin\n"
    assert (published(tmp_path / "runs", "prepend") / "path.txt").read_text() == f"/opt/tools/bin:{BIN}:{SYSTEM_PATH}\n"


def test_the_interpreter_directory_already_first_is_not_added_again(tmp_path: Path) -> None:
    run(tmp_path, spec(tmp_path), PATH=f"{BIN}/:{SYSTEM_PATH}")  # the same directory, spelt with a slash
    assert shell_saw(tmp_path / "runs")[-2] == f"{BIN}/:{SYSTEM_PATH}"


@pytest.mark.parametrize(("given", "expected"), [
    ("/usr/bin:/bin", "/venv/bin:/usr/bin:/bin"),
    ("/venv/bin:/usr/bin", "/venv/bin:/usr/bin"),
    ("/venv/bin/:/usr/bin", "/venv/bin/:/usr/bin"),
    ("/usr/bin:/venv/bin", "/venv/bin:/usr/bin:/venv/bin"),
    ("", "/venv/bin"),
    (None, f"/venv/bin:{os.defpath}"),
], ids=["prepended", "already-first", "already-first-slash", "later-kept", "empty", "unset"])
def test_interpreter_first(given: str | None, expected: str) -> None:
    assert interpreter_first(given, "/venv/bin") == expected


def test_use_task_path_does_not_resolve_symlinks(tmp_path: Path) -> None:
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    environ = {"PATH": SYSTEM_PATH}
    use_task_path(TaskPath.INTERPRETER, environ, str(venv / "python"))
    assert environ == {"PATH": f"{venv}:{SYSTEM_PATH}"}
    use_task_path(TaskPath.INHERIT, environ := {"PATH": SYSTEM_PATH}, str(venv / "python"))
    assert environ == {"PATH": SYSTEM_PATH}


def test_a_bad_path_setting_is_named(tmp_path: Path) -> None:
    path = spec(tmp_path, "{path: interpeter}")
    result = cli(tmp_path, "validate", str(path))
    assert result.returncode == 2
    assert (f"{path}:3:19: $.execution.path: the string 'interpeter' is not one of: interpreter, inherit "
            "(did you mean 'interpreter'?)") in result.stdout + result.stderr
    result = cli(tmp_path, "config", str(spec(tmp_path)), env=clean_env(tmp_path, CMBAGENT_PATH="venv"))
    assert (result.returncode, result.stderr) == (
        2, "cmbagent-batch: error: environment variable CMBAGENT_PATH='venv': expected one of interpreter, inherit\n")


@pytest.mark.slow  # an agent process per attempt
def test_code_an_agent_runs_finds_the_runners_python_first(tmp_path: Path) -> None:
    pytest.importorskip("ag2", reason="agent tasks need the 'agents' extra (ag2)")
    from cmbagent_batch.tasks.agent.sandbox import landlock_abi
    from tests.helpers.scripted_llm import Reply, ScriptedLLM

    if landlock_abi() == 0:
        pytest.skip("code execution needs Landlock")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "run_shell", "arguments": json.dumps({"command": PROBE})}}
    script = [Reply(None, tool_calls=[call], usage=usage()), Reply("done", usage=usage())]
    with ScriptedLLM(script) as srv:
        path = tmp_path / "job.yaml"
        path.write_text(f"""\
version: 1
job: {{name: agent}}
llm:
  models:
    m: {{model: test-model, base_url: "{srv.base_url}", api_key_env: TEST_LLM_KEY, max_retries: 0,
        price: {{prompt_per_1m: 1.0, completion_per_1m: 1.0}}}}
tasks:
  - id: coder
    kind: agent
    model: m
    instructions: "run the probe"
    code_execution: true
""")
        run(tmp_path, path, TEST_LLM_KEY="sk-test")
        [sent_back] = [str(m["content"]) for b in srv.completions for m in b["messages"] if m["role"] == "tool"]
    assert sent_back.splitlines() == ["exit code 0", *runner_python()]


def usage() -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}


# -- on MPI worker ranks -------------------------------------------------------------------------------


@pytest.mark.slow  # under mpiexec
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
@pytest.mark.parametrize("rule", ["interpreter", "inherit"])
def test_worker_ranks_give_their_tasks_the_same_path(tmp_path: Path, rule: str) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
    assert MPIEXEC is not None
    run(tmp_path, spec(tmp_path, f"{{backend: mpi, path: {rule}}}"), launcher=(MPIEXEC, "-n", "3"))
    expected = runner_python() if rule == "interpreter" else system_python()
    seen = [shell_saw(tmp_path / "runs", f"shell-{i}") for i in range(1, 5)]
    assert {tuple(s[:-1]) for s in seen} == {tuple(expected)}
    assert {s[-1] for s in seen} <= {"1", "2"}  # ran on the worker ranks
    assert python_saw(tmp_path / "runs") == {"python3": expected[1], "prefix": expected[2]}


# -- under submit --------------------------------------------------------------------------------------


def test_the_job_script_runs_the_submitting_python_and_leaves_path_alone(tmp_path: Path) -> None:
    path = spec(tmp_path)
    result = cli(tmp_path, "submit", str(path), "--dry-run", "--ntasks-per-node", "3",
                 env=clean_env(tmp_path, PATH=SYSTEM_PATH))
    assert result.returncode == 0, result.stderr
    script = result.stdout.splitlines()
    run_dir = tmp_path / "runs"
    assert f"#SBATCH --output={run_dir}/slurm/slurm-%j.log" in script
    assert not [line for line in script if line.startswith("#SBATCH --error") or "PATH=" in line]
    srun = next(line for line in script if line.startswith("srun "))
    assert srun.startswith(f"srun --overlap --mem=0 --cpu-bind=none --mpi=pmi2 {shlex.quote(sys.executable)} -m cmbagent_batch run {path} ")


@pytest.mark.parametrize("arg", ["--error=x.err", "--err=x.err", "-ex.err", "-e"])
def test_an_sbatch_arg_for_stderr_is_refused(arg: str) -> None:
    with pytest.raises(UsageError) as err:
        script.options({}, {"sbatch_args": (arg,)})
    assert str(err.value) == (f"sbatch option {arg!r}: cmbagent-batch writes stderr to the --output log "
                              "itself (see `cmbagent-batch submit --help`)")


@pytest.mark.parametrize("arg", ["--export=ALL", "--exclusive", "-N2", "--mail-type=END"])
def test_other_sbatch_args_pass(arg: str) -> None:
    script.options({}, {"sbatch_args": (arg,)})


def test_status_shows_the_two_logs_of_a_job_an_earlier_version_submitted(tmp_path: Path) -> None:
    assert script.job_logs(str(tmp_path), "7") == [f"{tmp_path}/slurm-7.log"]
    (tmp_path / "slurm-7.err").write_text("")
    assert script.job_logs(str(tmp_path), "7") == [f"{tmp_path}/slurm-7.out", f"{tmp_path}/slurm-7.err"]


def test_status_names_the_one_log() -> None:
    s = {"job_id": "7", "state": "RUNNING", "requeues": 0, "requeue_max": 0, "jobs": ["7"],
         "logs": ["/r/slurm/slurm-7.log"]}
    assert slurm_lines(s)[-1] == "  log: /r/slurm/slurm-7.log"
    assert slurm_lines({**s, "logs": ["/r/a.out", "/r/a.err"]})[-1] == "  logs: /r/a.out /r/a.err"


@pytest.mark.slow  # a Slurm job on MPI ranks
def test_a_submitted_job_finds_the_same_python_and_logs_to_one_file(tmp_path: Path, slurm_conf: str) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra (mpi4py, mpich)")
    path = spec(tmp_path)
    env = env_for(clean_env(tmp_path, PATH=SYSTEM_PATH), slurm_conf)  # sbatch and srun are in /usr/bin
    submitted = cli(tmp_path, "submit", str(path), "--ntasks-per-node", "3", "--time", "5", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    run_dir = tmp_path / "runs"
    log = run_dir / "slurm" / f"slurm-{job_id}.log"
    assert (f"cmbagent-batch: submitted job {job_id}; script {run_dir}/slurm/job-001.sbatch; log {log}; "
            f"`cmbagent-batch status {run_dir}` follows it\n") in submitted.stderr
    assert wait_job_end(job_id, env, 180, run_dir)["JobState"] == "COMPLETED", job_logs(run_dir)
    assert sorted(p.name for p in (run_dir / "slurm").glob("slurm-*")) == [log.name]
    text = log.read_text()
    assert "5/5 done" in text and f"run directory {run_dir}" in text  # the progress and the summary
    seen = [shell_saw(run_dir, f"shell-{i}") for i in range(1, 5)]
    assert {tuple(s[:-1]) for s in seen} == {tuple(runner_python())}  # as locally
    status = cli(tmp_path, "status", str(run_dir), env=env)
    assert f"  log: {log}" in status.stdout.splitlines(), status.stdout
