"""The preflight checks of a loaded spec (``spec/preflight.py``): python calls resolve without running user
code, the API keys of the models called are set, ``CMBAGENT_*`` variables are known; and a misspelled model
name is caught when the spec is loaded. Specs are real YAML files in tmp_path; messages are exact."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from cmbagent_batch.errors import Problem, Severity, SpecError
from cmbagent_batch.spec import load_spec
from cmbagent_batch.spec.callables import Resolver
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.preflight import calls_needed, check_calls, check_keys, keys_needed, unknown_variables
from cmbagent_batch.spec.variables import DEVELOPMENT_VARIABLES, MATRIX_PREFIX, PREFIX, is_known, known
from tests.helpers.cli import clean_env, cli
from tests.helpers.runs import published

ROOT = Path(__file__).resolve().parent.parent
HEAD = "version: 1\njob:\n  name: demo\n"

SIMS = """\
import os
from math import sqrt as root

open("imported.txt", "w").close()  # must never run during a preflight


def run_camb(params):
    return params


class Spectra:
    pass


A, (B, *C) = 1, (2, 3)
if os.name == "posix":
    def posix_only():
        pass
try:
    import numpy as np
except ImportError:
    np = None
"""


def callables(spec: JobSpec) -> list[Problem]:
    return check_calls(spec.path, calls_needed(spec))


def spec_file(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body, encoding="utf-8")
    return path


def python_tasks(*calls: str) -> str:
    return "tasks:\n" + "".join(f"  - {{id: t{i}, kind: python, call: \"{c}\"}}\n" for i, c in enumerate(calls))


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """Modules beside the spec: sims.py, a package whose __init__ has a side effect, and odd ones."""
    (tmp_path / "sims.py").write_text(SIMS, encoding="utf-8")
    pipeline = tmp_path / "pipeline"
    (pipeline / "stages").mkdir(parents=True)
    (pipeline / "__init__.py").write_text('open("pipeline-imported.txt", "w").close()\n', encoding="utf-8")
    (pipeline / "fit.py").write_text("def fit():\n    pass\n", encoding="utf-8")
    (pipeline / "stages" / "__init__.py").write_text("", encoding="utf-8")
    (pipeline / "stages" / "clean.py").write_text("def clean():\n    pass\n", encoding="utf-8")
    (tmp_path / "nspkg" / "inner").mkdir(parents=True)  # a namespace package: no __init__.py
    (tmp_path / "nspkg" / "inner" / "mod.py").write_text("def go():\n    pass\n", encoding="utf-8")
    (tmp_path / "lazy.py").write_text("def __getattr__(name):\n    return print\n", encoding="utf-8")
    (tmp_path / "star.py").write_text("from sims import *\n", encoding="utf-8")
    (tmp_path / "registry.py").write_text("for n in ('a', 'b'):\n    globals()[n] = print\n", encoding="utf-8")
    (tmp_path / "broken.py").write_text("def run(:\n    pass\n", encoding="utf-8")
    return tmp_path


def test_calls_that_resolve_or_cannot_be_told_pass_and_no_user_code_runs(code: Path) -> None:
    spec = load_spec(str(spec_file(code, python_tasks(
        "sims:run_camb", "sims:Spectra", "sims:root", "sims:C", "sims:posix_only", "sims:np",
        "pipeline.fit:fit", "pipeline.stages.clean:clean", "nspkg.inner.mod:go", "nspkg:anything",
        "lazy:anything", "star:anything", "registry:a", "os.path:join", "math:sqrt", "json:dumps"))))
    assert callables(spec) == []
    assert not (code / "imported.txt").exists()
    assert not (code / "pipeline-imported.txt").exists()


def test_misspelled_function_module_and_package(code: Path) -> None:
    spec = load_spec(str(spec_file(code, python_tasks(
        "sims:run_cmab", "simz:run_camb", "pipeline.fti:fit", "pipeline.stages.clean:claen", "sims.x:f",
        "broken:run", "json:dumpz"))))
    json_init = sys.modules["json"].__file__
    assert [str(p) for p in callables(spec)] == [
        f"{spec.path}:5:34: $.tasks[0].call (task 't0'): call 'sims:run_cmab': sims.py defines no function "
        "'run_cmab' (did you mean 'run_camb'?)",
        f"{spec.path}:6:34: $.tasks[1].call (task 't1'): call 'simz:run_camb': no module named 'simz' in the "
        f"spec's directory {code} or among the modules of {sys.executable} (did you mean 'sims'?)",
        f"{spec.path}:7:34: $.tasks[2].call (task 't2'): call 'pipeline.fti:fit': no module named 'pipeline.fti' "
        "in pipeline/ (did you mean 'pipeline.fit'?)",
        f"{spec.path}:8:34: $.tasks[3].call (task 't3'): call 'pipeline.stages.clean:claen': "
        "pipeline/stages/clean.py defines no function 'claen' (did you mean 'clean'?)",
        f"{spec.path}:9:34: $.tasks[4].call (task 't4'): call 'sims.x:f': sims.py is a module, not a package: "
        "it has no module 'sims.x'",
        f"{spec.path}:10:34: $.tasks[5].call (task 't5'): call 'broken:run': broken.py cannot be imported: "
        "line 1: invalid syntax",
        f"{spec.path}:11:34: $.tasks[6].call (task 't6'): call 'json:dumpz': {json_init} defines no function "
        "'dumpz' (did you mean 'dump'?)",
    ]
    assert not (code / "pipeline-imported.txt").exists()


def test_a_matrix_entry_is_reported_once_at_its_call(code: Path) -> None:
    spec = load_spec(str(spec_file(code, """\
tasks:
  - id: "sim{i}"
    kind: python
    call: sims:run_cmab
    matrix: {i: [1, 2, 3]}
""")))
    assert [str(p) for p in callables(spec)] == [
        f"{spec.path}:7:11: $.tasks[0].call (task 'sim{{i}}'): call 'sims:run_cmab': sims.py defines no "
        "function 'run_cmab' (did you mean 'run_camb'?)",
    ]


def test_entries_listing_the_same_call_are_each_reported_and_the_call_is_looked_at_once(
        code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[str] = []
    real = Resolver._problem

    def counted(self: Resolver, call: str) -> str | None:
        told.append(call)
        return real(self, call)

    monkeypatch.setattr(Resolver, "_problem", counted)
    spec = load_spec(str(spec_file(code, python_tasks(*["sims:run_camb", "sims:run_cmab"] * 500))))
    found = callables(spec)
    assert [p.path for p in found] == [f"$.tasks[{i}].call" for i in range(1, 1000, 2)]
    assert {p.message for p in found} == {"call 'sims:run_cmab': sims.py defines no function 'run_cmab' "
                                          "(did you mean 'run_camb'?)"}
    assert sorted(told) == ["sims:run_camb", "sims:run_cmab"]


def test_a_spec_run_from_another_directory_finds_its_modules_beside_it(code: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file(code, python_tasks("sims:run_camb", "sims:simulate"))
    monkeypatch.chdir(code.parent)
    spec = load_spec(f"{code.name}/job.yaml")
    assert [p.message for p in callables(spec)] == ["call 'sims:simulate': sims.py defines no function 'simulate'"]


BINDERS = {
    "setup.py": "def _setup():\n    global f\n    def f():\n        pass\n\n\nclass Registry:\n"
                "    def install(self):\n        global g\n        g = print\n\n\n_setup()\n"
                "Registry().install()\n",
    "walrus.py": "if (f := print):\n    pass\nvalues = [(g := n) for n in range(2)]\n"
                 "@(h := staticmethod)\ndef k():\n    pass\n",
    "scope.py": 'locals()["f"] = print\n',
    "itself.py": 'import sys\nsys.modules[__name__].f = print\n',
    "setter.py": 'import sys\n\n\ndef install():\n    setattr(sys.modules["setter"], "f", print)\n',
    "alias.py": "import sys\n_me = sys.modules[__name__]\n_me.f = print\n",
    "registry.py": "def register(fn):\n    globals()[fn.__name__ + '_task'] = fn\n    return fn\n",
    "typed.py": "from __future__ import annotations\nimport functools\nfrom typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from os.path import join as f\n__all__ = ['g']\n__all__ += ['h']\n\n\n"
                "@functools.lru_cache\ndef g():\n    pass\n\n\ndef h():\n    pass\n\n\ndel h\n",
}


def test_names_bound_by_global_walrus_or_through_the_module_object_are_accepted(tmp_path: Path) -> None:
    for name, source in BINDERS.items():
        (tmp_path / name).write_text(source, encoding="utf-8")
    spec = load_spec(str(spec_file(tmp_path, python_tasks(
        "setup:f", "setup:g", "walrus:f", "walrus:g", "walrus:h", "scope:f", "itself:anything", "setter:anything",
        "alias:anything", "registry:anything", "typed:f", "typed:g", "typed:h", "setup:_setupp", "walrus:valuez"))))
    assert [p.message for p in callables(spec)] == [
        "call 'setup:_setupp': setup.py defines no function '_setupp' (did you mean '_setup'?)",
        "call 'walrus:valuez': walrus.py defines no function 'valuez' (did you mean 'values'?)",
    ]


def test_a_package_whose_init_has_a_syntax_error_cannot_be_imported_from(tmp_path: Path) -> None:
    (tmp_path / "brk" / "ok").mkdir(parents=True)
    (tmp_path / "brk" / "__init__.py").write_text("x = 1\ndef x(:\n", encoding="utf-8")
    (tmp_path / "brk" / "sub.py").write_text("def f():\n    pass\n", encoding="utf-8")
    (tmp_path / "brk" / "ok" / "mod.py").write_text("def f():\n    pass\n", encoding="utf-8")
    (tmp_path / "nul.py").write_bytes(b"def f():\n    pass\nx = '\0'\n")
    spec = load_spec(str(spec_file(tmp_path, python_tasks("brk.sub:f", "brk.ok.mod:f", "brk:f", "nul:f"))))
    assert [p.message for p in callables(spec)] == [
        "call 'brk.sub:f': brk/__init__.py cannot be imported: line 2: invalid syntax",
        "call 'brk.ok.mod:f': brk/__init__.py cannot be imported: line 2: invalid syntax",
        "call 'brk:f': brk/__init__.py cannot be imported: line 2: invalid syntax",
        "call 'nul:f': nul.py cannot be imported: source code string cannot contain null bytes",
    ]


def test_a_module_beside_the_spec_loses_to_one_the_task_runner_has_imported(tmp_path: Path) -> None:
    for name in ("json", "yaml", "colorsys"):  # the runner imports json and yaml, never colorsys
        (tmp_path / f"{name}.py").write_text("def myfunc():\n    pass\n", encoding="utf-8")
    spec = load_spec(str(spec_file(tmp_path, python_tasks(
        "json:myfunc", "json:dumps", "json.tool:main", "json.zzz:f", "yaml:myfunc", "colorsys:myfunc",
        "sys:exitt"))))
    assert [p.message for p in callables(spec)] == [
        "call 'json:myfunc': json is the standard library's module, which the task imports instead of json.py "
        "beside the spec; json defines no function 'myfunc'",
        "call 'json.zzz:f': json is the standard library's module, which the task imports instead of json.py "
        f"beside the spec; no module named 'json.zzz' in {Path(sys.modules['json'].__file__).parent}/",
        f"call 'yaml:myfunc': yaml is the installed module {yaml.__file__}, which the task imports instead of "
        "yaml.py beside the spec; yaml defines no function 'myfunc'",
        "call 'sys:exitt': module 'sys' defines no function 'exitt' (did you mean 'exit'?)",
    ]


def test_a_run_imports_the_module_the_preflight_says(tmp_path: Path) -> None:
    job = tmp_path / "job"  # not the current directory, which python -m puts first on the path
    job.mkdir()
    for name in ("json", "colorsys"):
        (job / f"{name}.py").write_text("def myfunc():\n    return 'beside the spec'\n", encoding="utf-8")
    spec_file(job, 'tasks:\n  - {id: t0, kind: python, call: "colorsys:myfunc"}\n'
                   '  - {id: t1, kind: python, call: "json:dumps", args: [[1]]}\n')
    run = cli(tmp_path, "run", "--quiet", "job/job.yaml")
    assert (run.returncode, run.stderr) == (0, "")
    assert [(published(job / "runs" / "demo", t) / "return.json").read_text() for t in ("t0", "t1")] == ['"beside the spec"\n', '"[1]"\n']
    spec_file(job, python_tasks("json:myfunc"))
    refused = cli(tmp_path, "validate", "job/job.yaml")
    assert (refused.returncode, refused.stderr.splitlines()) == (2, [
        "job/job.yaml:5:34: $.tasks[0].call (task 't0'): call 'json:myfunc': json is the standard library's "
        "module, which the task imports instead of json.py beside the spec; json defines no function 'myfunc'",
        "1 problem in 1 file",
    ])


MODELS = """\
llm:
  default_model: gpt
  models:
    gpt:
      model: gpt-4o-mini
    custom:
      model: gpt-4o
      api_key_env: CUSTOM_KEY
    smol:
      provider: local
      price: {prompt_per_1m: 0, completion_per_1m: 0}
analysis:
  sources: [explicit, llm]
  model: custom
tasks:
  - id: "ask{i}"
    kind: agent
    instructions: summarise
    matrix: {i: [1, 2, 3, 4, 5]}
  - {id: offline, kind: agent, instructions: summarise, model: smol}
  - {id: review, kind: agent, instructions: summarise, model: custom}
"""


def test_unset_and_empty_keys_name_the_model_its_variable_and_its_users(tmp_path: Path) -> None:
    spec = load_spec(str(spec_file(tmp_path, MODELS)))
    f = spec.path
    found = check_keys(spec.path, keys_needed(spec), {"CUSTOM_KEY": " "}, submitting=False, analysis_call=True)
    assert [str(p) for p in found] == [
        f"{f}:11:20: $.llm.models.custom.api_key_env: model 'custom': its API key variable CUSTOM_KEY is empty "
        "here (task 'review' and the LLM dependency analysis use it)",
        f"{f}:7:5: $.llm.models.gpt: model 'gpt': its API key variable OPENAI_API_KEY is not set here "
        "(tasks 'ask1', 'ask2' and 3 more use it)",
    ]
    assert {p.severity for p in found} == {Severity.ERROR}


def test_submit_says_the_key_must_be_exported_in_the_submitting_shell(tmp_path: Path) -> None:
    spec = load_spec(str(spec_file(tmp_path, MODELS)))
    assert [str(p) for p in check_keys(spec.path, keys_needed(spec), {"OPENAI_API_KEY": "sk-1"}, submitting=True, analysis_call=False)] == [
        f"{spec.path}:11:20: $.llm.models.custom.api_key_env: model 'custom': its API key variable CUSTOM_KEY is "
        "not set in this shell (task 'review' uses it): the job gets the environment submit runs in, so "
        "export it before submit",
    ]


def test_keys_set_a_local_model_and_a_cached_analysis_need_nothing(tmp_path: Path) -> None:
    spec = load_spec(str(spec_file(tmp_path, MODELS)))
    assert check_keys(spec.path, keys_needed(spec), {"OPENAI_API_KEY": "sk-1", "CUSTOM_KEY": "sk-2"}, submitting=True, analysis_call=True) == []
    only_analysis = load_spec(str(spec_file(tmp_path, MODELS.split("tasks:")[0] + "tasks:\n"
                                            "  - {id: a, kind: shell, run: echo}\n", "analysis.yaml")))
    assert check_keys(only_analysis.path, keys_needed(only_analysis), {}, submitting=False, analysis_call=False) == []
    assert [p.message for p in check_keys(only_analysis.path, keys_needed(only_analysis), {}, submitting=False, analysis_call=True)] == [
        "model 'custom': its API key variable CUSTOM_KEY is not set here (the LLM dependency analysis uses it)",
    ]


def test_three_users_are_all_named(tmp_path: Path) -> None:
    spec = load_spec(str(spec_file(tmp_path, MODELS.replace("[1, 2, 3, 4, 5]", "[1, 2, 3]"))))
    assert [p.message for p in check_keys(spec.path, keys_needed(spec), {"CUSTOM_KEY": "k"}, submitting=False, analysis_call=False)] == [
        "model 'gpt': its API key variable OPENAI_API_KEY is not set here (tasks 'ask1', 'ask2' and 'ask3' "
        "use it)",
    ]


def test_unknown_cmbagent_variables_are_warned_about_with_did_you_mean() -> None:
    environ = {"CMBAGENT_MAX_WORKER": "2", "cmbagent_isolation": "thread", "CMBAGENT_FOO": "1",
               "CMBAGENT_MAX_WORKERS": "2", "CMBAGENT_USE_LLM_DEPS": "0", "CMBAGENT_TASK_ID": "a",
               "CMBAGENT_MATRIX_ELL": "2", "CMBAGENT_BATCH_NO_BROWSER": "1", "HOME": "/home/me"}
    found = unknown_variables(environ)
    assert [str(p) for p in found] == [
        "environment: warning: CMBAGENT_FOO is not a variable cmbagent-batch reads",
        "environment: warning: CMBAGENT_MAX_WORKER is not a variable cmbagent-batch reads "
        "(did you mean CMBAGENT_MAX_WORKERS?)",
        "environment: warning: cmbagent_isolation is not a variable cmbagent-batch reads "
        "(did you mean CMBAGENT_ISOLATION?)",
    ]
    assert {p.severity for p in found} == {Severity.WARNING}
    assert found[1].to_dict() == {
        "file": "environment", "line": None, "column": None, "path": "CMBAGENT_MAX_WORKER", "task": None,
        "severity": "warning", "message": "CMBAGENT_MAX_WORKER is not a variable cmbagent-batch reads "
                                          "(did you mean CMBAGENT_MAX_WORKERS?)"}


NAME = re.compile(r"CMBAGENT_[A-Z0-9_]*")


def _sources() -> list[Path]:
    package = [p for p in (ROOT / "cmbagent_batch").rglob("*") if p.is_file() and p.suffix in (".py", ".sbatch", ".json")]
    return [*package, ROOT / "slurm" / "local-cluster.sh", ROOT / "tests" / "test_ledger_report.py"]


def test_every_cmbagent_variable_in_the_code_is_registered_and_every_registered_one_is_used() -> None:
    seen: dict[str, str] = {}
    for path in _sources():
        for found in NAME.finditer(path.read_text(encoding="utf-8")):
            seen.setdefault(found.group(), str(path.relative_to(ROOT)))
    prefixes = {n for n in seen if n.endswith("_")}
    assert prefixes <= {PREFIX, MATRIX_PREFIX}, f"name families not registered: {sorted(prefixes)}"
    unregistered = {n: where for n, where in seen.items() if n not in prefixes and not is_known(n)}
    assert not unregistered, f"read or set but not in spec/variables.py: {unregistered}"
    assert set(known()) <= set(seen), f"registered but used nowhere: {sorted(set(known()) - set(seen))}"
    assert set(DEVELOPMENT_VARIABLES) <= set(known())


def test_a_misspelled_model_name_is_a_load_error_with_did_you_mean(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "llm:\n  models:\n    mini:\n      model: openai/gpt-4o-mni\n"
                               "tasks:\n  - {id: a, kind: agent, instructions: hi, model: mini}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:7:14: $.llm.models.mini.model: model 'mini' (openai/gpt-4o-mni) is not in the shipped price "
        "table builtin-2025-08 (did you mean 'gpt-4o-mini'?); a model it lacks needs price: "
        "{prompt_per_1m: ..., completion_per_1m: ...}",
    ]


def test_validate_suggests_the_priced_model_name(tmp_path: Path) -> None:
    spec_file(tmp_path, "llm:\n  models:\n    mini:\n      model: gpt-4o-mni\n"
                        "tasks:\n  - {id: a, kind: agent, instructions: hi, model: mini}\n")
    r = cli(tmp_path, "validate", "job.yaml", env=clean_env(tmp_path))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [
        "job.yaml:7:14: $.llm.models.mini.model: model 'mini' (gpt-4o-mni) is not in the shipped price table "
        "builtin-2025-08 (did you mean 'gpt-4o-mini'?); a model it lacks needs price: "
        "{prompt_per_1m: ..., completion_per_1m: ...}",
        "1 problem in 1 file",
    ]
