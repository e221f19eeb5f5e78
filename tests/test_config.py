"""The effective configuration: schema defaults < YAML < CMBAGENT_* variables < flags, each value with its source.

Checked twice: through ``cmbagent-batch config SPEC`` in a subprocess (the interface users see) and through
``cmbagent_batch.spec.config.effective_config`` directly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.cli.parser import FLAG_SETTINGS
from cmbagent_batch.errors import UsageError
from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.config import ENV_VARS, SWITCHES, effective_config
from tests.helpers.cli import clean_env
from tests.helpers.cli import cli as run_cli

# Every configuration key written, so that each one has a line to name.
FULL = """\
version: 1
job:
  name: cfg
  run_dir: out/cfg
  budget_usd: 2.5
execution:
  backend: local
  mode: sequential
  max_workers: 3
  use_process_pool: true
  task_timeout: 60
  retries: 2
  keep_going: true
  max_memory_mb: 2048
  memory_safety_fraction: 0.5
  tasks_per_rank: 4
llm:
  default_model: mini
  models:
    mini:
      model: gpt-4o-mini
      price: {prompt_per_1m: 0.15, completion_per_1m: 0.6}
analysis:
  sources: [explicit]
  model: mini
  fallback: sequential
tasks:
  - id: a
    kind: shell
    run: "true"
"""
FULL_CONFIG = {
    "analysis.cache_dir": {"value": None, "source": "default"},
    "analysis.fallback": {"value": "sequential", "source": "spec line 26"},
    "analysis.model": {"value": "mini", "source": "spec line 25"},
    "analysis.sources": {"value": ["explicit"], "source": "spec line 24"},
    "execution.backend": {"value": "local", "source": "spec line 7"},
    "execution.backfill_s": {"value": 60.0, "source": "default"},
    "execution.inventory": {"value": None, "source": "default"},
    "execution.isolation": {"value": "process", "source": "spec line 10"},  # written as use_process_pool: true
    "execution.keep": {"value": ["data", "codebase", "logs", "outputs", "chats", "cost"], "source": "default"},
    "execution.keep_going": {"value": True, "source": "spec line 13"},
    "execution.kill_grace": {"value": 5.0, "source": "default"},
    "execution.max_memory_mb": {"value": 2048, "source": "spec line 14"},
    "execution.max_workers": {"value": 3, "source": "spec line 9"},
    "execution.memory_safety_fraction": {"value": 0.5, "source": "spec line 15"},
    "execution.mode": {"value": "sequential", "source": "spec line 8"},
    "execution.path": {"value": "interpreter", "source": "default"},
    "execution.retries": {"value": 2, "source": "spec line 12"},
    "execution.rerun_on": {"value": ["spec", "inputs", "code"], "source": "default"},
    "execution.retry_backoff": {"value": 1.0, "source": "default"},
    "execution.task_timeout": {"value": 60, "source": "spec line 11"},
    "execution.tasks_per_rank": {"value": 4, "source": "spec line 16"},
    "job.budget_usd": {"value": 2.5, "source": "spec line 5"},
    "job.keep_superseded": {"value": 3, "source": "default"},
    "job.run_dir": {"value": "out/cfg", "source": "spec line 4"},
    "llm.default_model": {"value": "mini", "source": "spec line 18"},
}

SMALL = """\
version: 1
job:
  name: small
execution:
  max_workers: 3
tasks:
  - id: a
    kind: shell
    run: "true"
"""
SMALL_CONFIG = {
    "analysis.cache_dir": {"value": None, "source": "default"},
    "analysis.fallback": {"value": "error", "source": "default"},
    "analysis.model": {"value": None, "source": "default"},
    "analysis.sources": {"value": ["explicit", "files"], "source": "default"},
    "execution.backend": {"value": "auto", "source": "default"},
    "execution.backfill_s": {"value": 60.0, "source": "default"},
    "execution.inventory": {"value": None, "source": "default"},
    "execution.isolation": {"value": "process", "source": "default"},
    "execution.keep": {"value": ["data", "codebase", "logs", "outputs", "chats", "cost"], "source": "default"},
    "execution.keep_going": {"value": False, "source": "default"},
    "execution.kill_grace": {"value": 5.0, "source": "default"},
    "execution.max_memory_mb": {"value": None, "source": "default"},
    "execution.max_workers": {"value": 3, "source": "spec line 5"},
    "execution.memory_safety_fraction": {"value": 0.8, "source": "default"},
    "execution.mode": {"value": "auto", "source": "default"},
    "execution.path": {"value": "interpreter", "source": "default"},
    "execution.retries": {"value": 0, "source": "default"},
    "execution.rerun_on": {"value": ["spec", "inputs", "code"], "source": "default"},
    "execution.retry_backoff": {"value": 1.0, "source": "default"},
    "execution.task_timeout": {"value": None, "source": "default"},
    "execution.tasks_per_rank": {"value": 1, "source": "default"},
    "job.budget_usd": {"value": None, "source": "default"},
    "job.keep_superseded": {"value": 3, "source": "default"},
    "job.run_dir": {"value": "runs/small", "source": "default"},
    "llm.default_model": {"value": None, "source": "default"},
}

WITH_LLM = FULL.replace("  sources: [explicit]\n", "  sources: [explicit, files, llm]\n")
NO_MODEL = """\
version: 1
job:
  name: nomodel
llm:
  models:
    mini:
      model: gpt-4o-mini
      price: {prompt_per_1m: 0.15, completion_per_1m: 0.6}
tasks:
  - id: a
    kind: shell
    run: "true"
"""


# -- helpers -------------------------------------------------------------------------------------------


def cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command line with ``HOME`` at ``home``, no CMBAGENT_/OPENAI_ variables but those of ``env``."""
    return run_cli(home, *args, env=clean_env(home, home=home, drop=("CMBAGENT_", "OPENAI_"), **(env or {})))


def config_json(home: Path, spec: Path, *flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = cli(home, "config", str(spec), "--format", "json", *flags, env=env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def direct(spec: Path, env: dict[str, str] | None = None,
           flags: dict[str, tuple[Any, str]] | None = None) -> dict[str, dict[str, Any]]:
    return effective_config(load_spec(str(spec)), env or {}, flags).to_dict()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def full(tmp_path: Path) -> Path:
    path = tmp_path / "full.yaml"
    path.write_text(FULL, encoding="utf-8")
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL, encoding="utf-8")
    return path


def spec_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults and the spec -----------------------------------------------------------------------------


def test_defaults_and_spec_lines(home: Path, small: Path, full: Path) -> None:
    assert config_json(home, small) == SMALL_CONFIG
    assert direct(small) == SMALL_CONFIG
    assert config_json(home, full) == FULL_CONFIG
    assert direct(full) == FULL_CONFIG
    assert FULL.splitlines()[8] == "  max_workers: 3"  # "spec line 9" is 1-based


def test_text_output(home: Path, small: Path) -> None:
    result = cli(home, "config", str(small))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "analysis.cache_dir                null                      default\n"
        "analysis.fallback                 error                     default\n"
        "analysis.model                    null                      default\n"
        'analysis.sources                  ["explicit", "files"]     default\n'
        "execution.backend                 auto                      default\n"
        "execution.backfill_s              60.0                      default\n"
        "execution.inventory               null                      default\n"
        "execution.isolation               process                   default\n"
        'execution.keep                    ["data", "codebase", "logs", "outputs", "chats", "cost"]  default\n'
        "execution.keep_going              false                     default\n"
        "execution.kill_grace              5.0                       default\n"
        "execution.max_memory_mb           null                      default\n"
        "execution.max_workers             3                         spec line 5\n"
        "execution.memory_safety_fraction  0.8                       default\n"
        "execution.mode                    auto                      default\n"
        "execution.path                    interpreter               default\n"
        'execution.rerun_on                ["spec", "inputs", "code"]  default\n'
        "execution.retries                 0                         default\n"
        "execution.retry_backoff           1.0                       default\n"
        "execution.task_timeout            null                      default\n"
        "execution.tasks_per_rank          1                         default\n"
        "job.budget_usd                    null                      default\n"
        "job.keep_superseded               3                         default\n"
        "job.run_dir                       runs/small                default\n"
        "llm.default_model                 null                      default\n")


def test_text_output_names_env_and_flag_sources(home: Path, small: Path) -> None:
    result = cli(home, "config", str(small), "--workers", "9", env={"CMBAGENT_RUN_DIR": "/scratch/run"})
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "execution.max_workers             9                         flag --workers" in lines
    assert "job.run_dir                       /scratch/run              env CMBAGENT_RUN_DIR" in lines


# -- environment variables -----------------------------------------------------------------------------

# variable -> (text, setting, value); FULL writes every setting except analysis.cache_dir in the spec
ENV_CASES = {
    "CMBAGENT_BACKEND": ("mpi", "execution.backend", "mpi"),
    "CMBAGENT_EXECUTION_MODE": ("parallel", "execution.mode", "parallel"),
    "CMBAGENT_MAX_WORKERS": ("16", "execution.max_workers", 16),
    "CMBAGENT_ISOLATION": ("thread", "execution.isolation", "thread"),
    "CMBAGENT_USE_PROCESS_POOL": ("no", "execution.isolation", "thread"),
    "CMBAGENT_TASK_TIMEOUT": ("90.5", "execution.task_timeout", 90.5),
    "CMBAGENT_RETRIES": ("0", "execution.retries", 0),
    "CMBAGENT_KEEP_GOING": ("off", "execution.keep_going", False),
    "CMBAGENT_MAX_MEMORY_MB": (" 4096 ", "execution.max_memory_mb", 4096),
    "CMBAGENT_TASKS_PER_RANK": ("8", "execution.tasks_per_rank", 8),
    "CMBAGENT_PATH": ("inherit", "execution.path", "inherit"),
    "CMBAGENT_RUN_DIR": ("/scratch/runs", "job.run_dir", "/scratch/runs"),
    "CMBAGENT_KEEP_SUPERSEDED": ("0", "job.keep_superseded", 0),
    "CMBAGENT_CACHE_DIR": ("/scratch/cache", "analysis.cache_dir", "/scratch/cache"),
}


def test_every_variable_is_covered() -> None:
    assert set(ENV_CASES) == set(ENV_VARS)
    assert all(ENV_VARS[var][0] == setting for var, (_, setting, _) in ENV_CASES.items())
    assert SWITCHES == ("CMBAGENT_ENABLE_PARALLEL", "CMBAGENT_AUTO_DETECT_DEPS", "CMBAGENT_USE_LLM_DEPS")


@pytest.mark.parametrize("var", sorted(ENV_CASES))
def test_a_variable_beats_the_spec(home: Path, full: Path, var: str) -> None:
    text, setting, value = ENV_CASES[var]
    expected = {**FULL_CONFIG, setting: {"value": value, "source": f"env {var}"}}
    assert config_json(home, full, env={var: text}) == expected
    assert direct(full, {var: text}) == expected


# flag arguments -> setting, value, the flag as the source names it, and a variable (with its text) it beats
FLAG_CASES = [
    (["--backend", "auto"], "execution.backend", "auto", "--backend", "CMBAGENT_BACKEND", "mpi"),
    (["--mode", "auto"], "execution.mode", "auto", "--mode", "CMBAGENT_EXECUTION_MODE", "parallel"),
    (["--workers", "7"], "execution.max_workers", 7, "--workers", "CMBAGENT_MAX_WORKERS", "16"),
    (["--task-timeout", "5"], "execution.task_timeout", 5.0, "--task-timeout", "CMBAGENT_TASK_TIMEOUT", "90.5"),
    (["--retries", "4"], "execution.retries", 4, "--retries", "CMBAGENT_RETRIES", "0"),
    (["--keep-going"], "execution.keep_going", True, "--keep-going", "CMBAGENT_KEEP_GOING", "0"),
    (["--fail-fast"], "execution.keep_going", False, "--fail-fast", "CMBAGENT_KEEP_GOING", "1"),
    (["--run-dir", "/data/here"], "job.run_dir", "/data/here", "--run-dir", "CMBAGENT_RUN_DIR", "/scratch/runs"),
    (["--cache-dir", "/data/c"], "analysis.cache_dir", "/data/c", "--cache-dir", "CMBAGENT_CACHE_DIR", "/scratch/cache"),
]


def test_every_flag_is_covered() -> None:
    assert {case[1] for case in FLAG_CASES} == {setting for setting, _ in FLAG_SETTINGS.values()}


@pytest.mark.parametrize(("args", "setting", "value", "flag", "var", "text"), FLAG_CASES,
                         ids=[" ".join(case[0]) for case in FLAG_CASES])
def test_a_flag_beats_the_variable_and_the_spec(home: Path, full: Path, args: list[str], setting: str, value: Any,
                                                flag: str, var: str, text: str) -> None:
    expected = {**FULL_CONFIG, setting: {"value": value, "source": f"flag {flag}"}}
    assert config_json(home, full, *args, env={var: text}) == expected
    assert direct(full, {var: text}, {setting: (value, flag)}) == expected
    without_flag = direct(full, {var: text})[setting]
    assert without_flag["source"] == f"env {var}" and without_flag["value"] != value


def test_a_flag_left_unset_changes_nothing(full: Path) -> None:
    flags = {setting: (None, flag) for setting, flag in FLAG_SETTINGS.values()}
    assert direct(full, {}, flags) == FULL_CONFIG


# -- the switches --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "flags", "mode", "source"), [
    ({"CMBAGENT_ENABLE_PARALLEL": "1"}, [], "parallel", "env CMBAGENT_ENABLE_PARALLEL"),
    ({"CMBAGENT_ENABLE_PARALLEL": "false"}, [], "sequential", "env CMBAGENT_ENABLE_PARALLEL"),
    ({"CMBAGENT_ENABLE_PARALLEL": "yes", "CMBAGENT_EXECUTION_MODE": "parallel"}, [], "parallel",
     "env CMBAGENT_EXECUTION_MODE"),
    ({"CMBAGENT_ENABLE_PARALLEL": "1"}, ["--mode", "auto"], "auto", "flag --mode"),
], ids=["on", "off", "agrees-with-mode", "flag-wins"])
def test_enable_parallel(home: Path, full: Path, env: dict[str, str], flags: list[str], mode: str,
                         source: str) -> None:
    assert config_json(home, full, *flags, env=env)["execution.mode"] == {"value": mode, "source": source}


def test_enable_parallel_decides_an_auto_mode(home: Path, full: Path) -> None:
    env = {"CMBAGENT_ENABLE_PARALLEL": "0", "CMBAGENT_EXECUTION_MODE": "auto"}
    assert direct(full, env)["execution.mode"] == {"value": "sequential", "source": "env CMBAGENT_ENABLE_PARALLEL"}


@pytest.mark.parametrize(("text", "env", "sources", "source"), [
    (FULL, {"CMBAGENT_AUTO_DETECT_DEPS": "1"}, ["explicit", "files"], "env CMBAGENT_AUTO_DETECT_DEPS"),
    (SMALL, {"CMBAGENT_AUTO_DETECT_DEPS": "0"}, ["explicit"], "env CMBAGENT_AUTO_DETECT_DEPS"),
    (FULL, {"CMBAGENT_USE_LLM_DEPS": "on"}, ["explicit", "llm"], "env CMBAGENT_USE_LLM_DEPS"),
    (WITH_LLM, {"CMBAGENT_USE_LLM_DEPS": "0"}, ["explicit", "files"], "env CMBAGENT_USE_LLM_DEPS"),
    (WITH_LLM, {"CMBAGENT_USE_LLM_DEPS": "TRUE"}, ["explicit", "files", "llm"], "env CMBAGENT_USE_LLM_DEPS"),
], ids=["files-on", "files-off", "llm-on", "llm-off", "llm-already-on"])
def test_dependency_switches(home: Path, tmp_path: Path, text: str, env: dict[str, str], sources: list[str],
                             source: str) -> None:
    spec = spec_file(tmp_path, "spec.yaml", text)
    expected = {"value": sources, "source": source}
    assert config_json(home, spec, env=env)["analysis.sources"] == expected
    assert direct(spec, env)["analysis.sources"] == expected


# -- errors --------------------------------------------------------------------------------------------

BOOL_WORDS = "expected one of 1, true, yes, on, 0, false, no, off"
MALFORMED = [
    ("CMBAGENT_BACKEND", "slurm", "expected one of auto, local, mpi"),
    ("CMBAGENT_EXECUTION_MODE", "fast", "expected one of auto, sequential, parallel"),
    ("CMBAGENT_MAX_WORKERS", "abc", "expected a whole number"),
    ("CMBAGENT_MAX_WORKERS", "2.5", "expected a whole number"),
    ("CMBAGENT_MAX_WORKERS", "0", "expected a number of at least 1"),
    ("CMBAGENT_ISOLATION", "threads", "expected one of process, thread"),
    ("CMBAGENT_USE_PROCESS_POOL", "maybe", BOOL_WORDS),
    ("CMBAGENT_TASK_TIMEOUT", "soon", "expected a number of seconds"),
    ("CMBAGENT_TASK_TIMEOUT", "0", "expected a finite number of seconds above 0"),
    ("CMBAGENT_TASK_TIMEOUT", "nan", "expected a finite number of seconds above 0"),
    ("CMBAGENT_RETRIES", "-1", "expected a number of at least 0"),
    ("CMBAGENT_KEEP_GOING", "2", BOOL_WORDS),
    ("CMBAGENT_MAX_MEMORY_MB", "1.5", "expected a whole number"),
    ("CMBAGENT_TASKS_PER_RANK", "0", "expected a number of at least 1"),
    ("CMBAGENT_PATH", "venv", "expected one of interpreter, inherit"),
    ("CMBAGENT_RUN_DIR", "  ", "expected a non-empty value"),
    ("CMBAGENT_KEEP_SUPERSEDED", "-1", "expected a number of at least 0"),
    ("CMBAGENT_CACHE_DIR", "", "expected a non-empty value"),
    ("CMBAGENT_ENABLE_PARALLEL", "2", BOOL_WORDS),
    ("CMBAGENT_AUTO_DETECT_DEPS", "maybe", BOOL_WORDS),
    ("CMBAGENT_USE_LLM_DEPS", "si", BOOL_WORDS),
]


def test_every_variable_has_a_malformed_case() -> None:
    assert {var for var, _, _ in MALFORMED} == set(ENV_VARS) | set(SWITCHES)


@pytest.mark.parametrize(("var", "text", "why"), MALFORMED, ids=[f"{v}={t!r}" for v, t, _ in MALFORMED])
def test_a_malformed_variable_is_an_error_naming_it(home: Path, full: Path, var: str, text: str, why: str) -> None:
    message = f"environment variable {var}={text!r}: {why}"
    result = cli(home, "config", str(full), env={var: text})
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")
    with pytest.raises(UsageError) as err:
        direct(full, {var: text})
    assert str(err.value) == message


@pytest.mark.parametrize(("var", "text"), [("CMBAGENT_TASK_TIMEOUT", "inf"), ("CMBAGENT_TASK_TIMEOUT", "1e400")])
def test_an_infinite_timeout_is_malformed(home: Path, full: Path, var: str, text: str) -> None:
    result = cli(home, "config", str(full), "--format", "json", env={var: text})
    assert result.returncode == 2
    assert result.stderr.startswith(f"cmbagent-batch: error: environment variable {var}={text!r}: ")


@pytest.mark.slow
def test_plan_names_a_malformed_variable_too(home: Path, full: Path) -> None:
    result = cli(home, "plan", str(full), env={"CMBAGENT_MAX_WORKERS": "abc"})
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "cmbagent-batch: error: environment variable CMBAGENT_MAX_WORKERS='abc': expected a whole number\n")
    result = cli(home, "plan", str(full), env={"CMBAGENT_CACHE_DIR": " "})
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "cmbagent-batch: error: environment variable CMBAGENT_CACHE_DIR=' ': expected a non-empty value\n")


@pytest.mark.parametrize(("parallel", "mode"), [("1", "sequential"), ("no", "parallel"), ("on", " sequential")])
def test_enable_parallel_contradicting_execution_mode(home: Path, full: Path, parallel: str, mode: str) -> None:
    env = {"CMBAGENT_ENABLE_PARALLEL": parallel, "CMBAGENT_EXECUTION_MODE": mode}
    message = (f"CMBAGENT_ENABLE_PARALLEL={parallel!r} contradicts CMBAGENT_EXECUTION_MODE={mode!r}; "
               "unset one of them")
    result = cli(home, "config", str(full), env=env)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"cmbagent-batch: error: {message}\n")
    with pytest.raises(UsageError) as err:
        direct(full, env)
    assert str(err.value) == message


NO_MODEL_MESSAGE = ("LLM dependency analysis is on (env CMBAGENT_USE_LLM_DEPS) but the spec names no model: "
                    "set analysis.model or llm.default_model")


@pytest.mark.parametrize("text", [SMALL, NO_MODEL], ids=["no-llm-section", "no-default-model"])
@pytest.mark.parametrize("command", ["config", "plan"])
def test_llm_deps_on_a_spec_without_a_model(home: Path, tmp_path: Path, text: str, command: str) -> None:
    spec = spec_file(tmp_path, "spec.yaml", text)
    result = cli(home, command, str(spec), env={"CMBAGENT_USE_LLM_DEPS": "1"})
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"cmbagent-batch: error: {NO_MODEL_MESSAGE}\n")
    with pytest.raises(UsageError) as err:
        direct(spec, {"CMBAGENT_USE_LLM_DEPS": "1"})
    assert str(err.value) == NO_MODEL_MESSAGE


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "argument --workers: expected a whole number of at least 1, got '0'"),
    (["--workers", "x"], "argument --workers: expected a whole number of at least 1, got 'x'"),
    (["--retries", "-1"], "argument --retries: expected a whole number of at least 0, got '-1'"),
    (["--task-timeout", "0"], "argument --task-timeout: expected a finite number above 0, got '0'"),
])
def test_a_malformed_flag_is_a_usage_error(home: Path, small: Path, args: list[str], message: str) -> None:
    result = cli(home, "config", str(small), *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == f"cmbagent-batch config: error: {message}"
