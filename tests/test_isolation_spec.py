"""``execution.isolation``, the setting: where python tasks run (``process`` by default, or ``thread``), its older
spelling ``use_process_pool``, its variables, and the refusal of a timeout that a thread cannot honour.

Through the command line users run (``config``, ``validate``, ``run``, ``plan``, ``submit``), and through
``load_spec`` / ``effective_config`` for the objects the backends read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.errors import SpecError, UsageError
from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.config import effective_config
from cmbagent_batch.spec.model import Isolation
from tests.helpers.cli import clean_env, write_spec
from tests.helpers.cli import cli as run_cli

# Lines 1-3; a case's execution mapping starts at line 4, its key lines at 5.
HEAD = """\
version: 1
job:
  name: iso
"""
SHELL = """\
  - id: a
    kind: shell
    run: "true"
"""
PYTHON = """\
  - id: calc
    kind: python
    call: work:calc
"""

FIX = "Fix: use execution.isolation: process (the default), or"


def spec(tmp_path: Path, execution: str = "", tasks: str = SHELL) -> Path:
    """A spec of HEAD, then ``execution:`` with the given lines (if any), then ``tasks:``."""
    text = HEAD + (f"execution:\n{execution}" if execution else "") + "tasks:\n" + tasks
    path = write_spec(tmp_path, text)
    (tmp_path / "work.py").write_text("def calc():\n    return 1\n")
    return path


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command line in ``tmp_path`` (``HOME`` there too), with no CMBAGENT_ variables but ``env``."""
    return run_cli(tmp_path, *args, env=clean_env(tmp_path, home=tmp_path, **env))


def isolation(tmp_path: Path, path: Path, **env: str) -> dict[str, Any]:
    result = cli(tmp_path, "config", path.name, "--format", "json", **env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    setting: dict[str, Any] = json.loads(result.stdout)["execution.isolation"]
    return setting


def refused(result: subprocess.CompletedProcess[str], *lines: str) -> None:
    """Exit 2, the spec problems word for word (``F`` is the spec file), no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("job.yaml:")] == [
        line.replace("F:", "job.yaml:", 1) for line in lines]


# -- the setting and its older spelling ----------------------------------------------------------------


def test_python_tasks_run_in_processes_by_default(tmp_path: Path) -> None:
    path = spec(tmp_path, tasks=PYTHON)
    assert isolation(tmp_path, path) == {"value": "process", "source": "default"}
    assert load_spec(str(path)).execution.isolation is Isolation.PROCESS


def test_isolation_thread(tmp_path: Path) -> None:
    path = spec(tmp_path, "  isolation: thread\n", PYTHON)
    assert isolation(tmp_path, path) == {"value": "thread", "source": "spec line 5"}
    assert load_spec(str(path)).execution.isolation is Isolation.THREAD
    result = cli(tmp_path, "config", path.name)
    assert "execution.isolation               thread                    spec line 5" in result.stdout.splitlines()
    assert "use_process_pool" not in result.stdout


@pytest.mark.parametrize(("pool", "value"), [("true", Isolation.PROCESS), ("false", Isolation.THREAD)])
def test_use_process_pool_is_read_as_isolation(tmp_path: Path, pool: str, value: Isolation) -> None:
    path = spec(tmp_path, f"  max_workers: 2\n  use_process_pool: {pool}\n", PYTHON)
    assert isolation(tmp_path, path) == {"value": value.value, "source": "spec line 6"}
    assert load_spec(str(path)).execution.isolation is value
    assert cli(tmp_path, "validate", path.name).returncode == 0


@pytest.mark.parametrize(("pool", "value"), [("true", "process"), ("false", "thread")])
def test_both_spellings_may_agree(tmp_path: Path, pool: str, value: str) -> None:
    path = spec(tmp_path, f"  use_process_pool: {pool}\n  isolation: {value}\n", PYTHON)
    assert isolation(tmp_path, path) == {"value": value, "source": "spec line 6"}  # isolation's own line


@pytest.mark.parametrize(("pool", "value"), [("true", "thread"), ("false", "process")])
def test_both_spellings_contradicting_each_other(tmp_path: Path, pool: str, value: str) -> None:
    path = spec(tmp_path, f"  isolation: {value}\n  use_process_pool: {pool}\n", PYTHON)
    message = (f"F:6:21: $.execution.use_process_pool: execution.use_process_pool: {pool} contradicts "
               f"execution.isolation: {value}; keep only isolation")
    for command in ("validate", "config", "run"):
        refused(cli(tmp_path, command, path.name), message)
    with pytest.raises(SpecError) as err:
        load_spec(str(path))
    assert str(err.value) == message.replace("F:", f"{path}:", 1)


def test_an_unknown_isolation_is_a_schema_problem(tmp_path: Path) -> None:
    path = spec(tmp_path, "  isolation: threads\n")
    refused(cli(tmp_path, "validate", path.name),
            "F:5:14: $.execution.isolation: the string 'threads' is not one of: process, thread "
            "(did you mean 'thread'?)")


# -- the variables -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "value"), [
    ({"CMBAGENT_ISOLATION": "thread"}, "thread"),
    ({"CMBAGENT_ISOLATION": " process "}, "process"),
    ({"CMBAGENT_USE_PROCESS_POOL": "no"}, "thread"),
    ({"CMBAGENT_USE_PROCESS_POOL": "1"}, "process"),
], ids=["isolation-thread", "isolation-process", "pool-no", "pool-yes"])
def test_a_variable_beats_the_spec(tmp_path: Path, env: dict[str, str], value: str) -> None:
    written = "process" if value == "thread" else "thread"
    path = spec(tmp_path, f"  isolation: {written}\n", PYTHON)
    (var,) = env
    assert isolation(tmp_path, path, **env) == {"value": value, "source": f"env {var}"}
    assert effective_config(load_spec(str(path)), env).spec.execution.isolation is Isolation(value)


def test_a_malformed_isolation_variable(tmp_path: Path) -> None:
    path = spec(tmp_path)
    message = "environment variable CMBAGENT_ISOLATION='threads': expected one of process, thread"
    for command in ("config", "validate", "run"):
        result = cli(tmp_path, command, path.name, CMBAGENT_ISOLATION="threads")
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")
    with pytest.raises(UsageError) as err:
        effective_config(load_spec(str(path)), {"CMBAGENT_ISOLATION": "threads"})
    assert str(err.value) == message


def test_the_two_variables_contradicting_each_other(tmp_path: Path) -> None:
    path = spec(tmp_path)
    result = cli(tmp_path, "config", path.name, CMBAGENT_ISOLATION="process", CMBAGENT_USE_PROCESS_POOL="no")
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "cmbagent-batch: error: CMBAGENT_USE_PROCESS_POOL='no' contradicts CMBAGENT_ISOLATION='process'; "
               "unset one of them\n")
    agreeing = {"CMBAGENT_ISOLATION": "thread", "CMBAGENT_USE_PROCESS_POOL": "off"}
    assert isolation(tmp_path, path, **agreeing)["value"] == "thread"


# -- a timeout on a python task that runs in a thread --------------------------------------------------

SLOW = PYTHON + """\
  - id: slow
    kind: python
    call: work:calc
    timeout: 2
"""  # its timeout on line 14 when the execution mapping has two lines
THREADS = "python tasks run in threads (execution.isolation: thread, spec line 5) and a thread cannot be stopped"
OWN = f"F:14:14: $.tasks[1].timeout: timeout: 2 cannot be enforced on python task 'slow': {THREADS}. {FIX} remove the timeout"
DEFAULT = (f"F:6:17: $.execution.task_timeout: execution.task_timeout: 60 cannot be enforced on python task 'calc': "
           f"{THREADS}. {FIX} remove execution.task_timeout")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_python_task_with_its_own_timeout_in_a_thread_is_refused(tmp_path: Path, command: str) -> None:
    path = spec(tmp_path, "  isolation: thread\n  max_workers: 1\n", SLOW)
    refused(cli(tmp_path, command, path.name), OWN)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_python_task_under_task_timeout_in_a_thread_is_refused(tmp_path: Path, command: str) -> None:
    path = spec(tmp_path, "  isolation: thread\n  task_timeout: 60\n", SLOW)
    refused(cli(tmp_path, command, path.name), DEFAULT, OWN)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["plan", "submit", "config"])
def test_every_command_refuses_it(tmp_path: Path, command: str) -> None:
    path = spec(tmp_path, "  isolation: thread\n  task_timeout: 60\n", SLOW)
    args = ["--dry-run"] if command == "submit" else []
    refused(cli(tmp_path, command, path.name, *args), DEFAULT, OWN)


def test_a_matrix_entry_is_one_problem_naming_its_first_task(tmp_path: Path) -> None:
    sweep = PYTHON.replace("id: calc", "id: calc-{z}") + "    timeout: 5\n    matrix: {z: [1, 2, 3]}\n"
    path = spec(tmp_path, "  isolation: thread\n", sweep)
    refused(cli(tmp_path, "validate", path.name),
            "F:10:14: $.tasks[0].timeout: timeout: 5 cannot be enforced on python task 'calc-1' (and 2 more): "
            f"{THREADS}. {FIX} remove the timeout")


def test_the_older_spelling_is_named_when_it_asked_for_threads(tmp_path: Path) -> None:
    path = spec(tmp_path, "  use_process_pool: false\n  max_workers: 1\n", SLOW)
    refused(cli(tmp_path, "validate", path.name),
            OWN.replace("execution.isolation: thread, spec line 5", "execution.use_process_pool: false, spec line 5"))


def test_threads_from_a_variable(tmp_path: Path) -> None:
    path = spec(tmp_path, "  max_workers: 1\n  retries: 0\n", SLOW)
    assert cli(tmp_path, "validate", path.name).returncode == 0  # process by default: the timeout is enforced
    for var, fix in (("CMBAGENT_ISOLATION", "set CMBAGENT_ISOLATION=process"),
                     ("CMBAGENT_USE_PROCESS_POOL", "set CMBAGENT_USE_PROCESS_POOL=yes")):
        text = "thread" if var == "CMBAGENT_ISOLATION" else "no"
        refused(cli(tmp_path, "run", path.name, **{var: text}),
                "F:14:14: $.tasks[1].timeout: timeout: 2 cannot be enforced on python task 'slow': python tasks run "
                f"in threads (execution.isolation: thread, env {var}) and a thread cannot be stopped. Fix: {fix}, or "
                "remove the timeout")


@pytest.mark.parametrize(("args", "env", "source", "fix"), [
    ([], {"CMBAGENT_TASK_TIMEOUT": "60"}, "env CMBAGENT_TASK_TIMEOUT", "unset CMBAGENT_TASK_TIMEOUT"),
    (["--task-timeout", "60"], {}, "flag --task-timeout", "drop --task-timeout"),
], ids=["variable", "flag"])
def test_a_task_timeout_from_a_variable_or_a_flag_points_at_the_first_python_task(
        tmp_path: Path, args: list[str], env: dict[str, str], source: str, fix: str) -> None:
    path = spec(tmp_path, "  isolation: thread\n", SHELL + PYTHON + PYTHON.replace("calc", "more", 1))
    refused(cli(tmp_path, "run", path.name, *args, **env),
            f"F:10:5: $.tasks[1]: execution.task_timeout: 60 ({source}) cannot be enforced on python task 'calc' "
            "(and 1 more): python tasks run in threads (execution.isolation: thread, spec line 5) and a thread "
            f"cannot be stopped. Fix: use execution.isolation: process (the default), or {fix}")


def test_the_final_settings_decide(tmp_path: Path) -> None:
    path = spec(tmp_path, "  isolation: thread\n  task_timeout: 60\n", SLOW)
    result = cli(tmp_path, "validate", path.name, CMBAGENT_ISOLATION="process")
    assert (result.returncode, result.stdout, result.stderr) == (0, "job.yaml: valid (2 tasks)\n", "")
    assert isolation(tmp_path, path, CMBAGENT_ISOLATION="process") == {
        "value": "process", "source": "env CMBAGENT_ISOLATION"}
    with pytest.raises(SpecError) as err:
        effective_config(load_spec(str(path)), {})
    assert [p.path for p in err.value.problems] == ["$.execution.task_timeout", "$.tasks[1].timeout"]


def test_threads_without_a_timeout_and_shell_timeouts_are_fine(tmp_path: Path) -> None:
    tasks = SHELL + "    timeout: 2\n" + PYTHON
    path = spec(tmp_path, "  isolation: thread\n", tasks)
    result = cli(tmp_path, "validate", path.name)
    assert (result.returncode, result.stdout, result.stderr) == (0, "job.yaml: valid (2 tasks)\n", "")
    result = cli(tmp_path, "run", path.name, "--dry-run")
    assert (result.returncode, result.stdout) == (0, "a: run (never ran)\ncalc: run (never ran)\n"), result.stderr
    # execution.task_timeout then applies to the shell task alone
    path = spec(tmp_path, "  isolation: thread\n  task_timeout: 60\n", SHELL)
    assert cli(tmp_path, "validate", path.name).returncode == 0


def test_a_python_task_that_calls_models_in_a_thread_is_refused(tmp_path: Path) -> None:
    calling = PYTHON + "    models: [mini]\n"  # line 10 when the execution mapping has one line
    models = "llm:\n  models:\n    mini: {model: gpt-4o-mini, base_url: 'http://127.0.0.1:9/v1'}\n"
    path = spec(tmp_path, "  isolation: thread\n", calling)
    path.write_text(path.read_text().replace("tasks:\n", models + "tasks:\n"))
    refused(cli(tmp_path, "validate", path.name),
            "F:13:13: $.tasks[0].models: models cannot be given to python task 'calc': python tasks run in threads "
            "(execution.isolation: thread, spec line 5), which share the runner's environment, so a call cannot get "
            f"a gateway token of its own. {FIX} call the model from a shell task")
