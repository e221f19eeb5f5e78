"""The preflight: what can be known wrong before a task runs is reported by ``validate``, ``plan``,
``submit`` (before ``sbatch``) and ``run`` (before its first task), with no task run and no job submitted."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env, cli, q, write_spec
from tests.helpers.mpi_run import MPIEXEC, mpirun
from tests.helpers.runs import published, work_dir

COMMANDS = (("validate",), ("plan",), ("submit", "--dry-run"), ("run",))


def fake_sbatch(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``sbatch`` only records that it was called (it must never be)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho called >> {q(tmp_path / 'sbatch-calls')}\necho 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    env = clean_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def refused_everywhere(tmp_path: Path, spec: Path, expected: str, env: dict[str, str] | None = None) -> None:
    """Every command that reads the spec refuses it with ``expected`` on stderr, exit 2, and nothing ran:
    the side-effect file the tasks would make is absent and sbatch was never called."""
    env = env or fake_sbatch(tmp_path)
    for command in (*COMMANDS, ("submit",)):
        r = cli(tmp_path, *command, spec.name, env=env)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert expected in r.stderr.splitlines(), (command, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "side-effect").exists()
    assert not (tmp_path / "sbatch-calls").exists()
    assert not (tmp_path / "runs").exists()


def test_a_placeholder_near_miss_is_an_error_with_did_you_mean(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f"""
        version: 1
        job: {{name: ph, run_dir: runs/ph}}
        tasks:
          - id: "sim_{{H0}}"
            kind: shell
            run: touch {q(tmp_path / 'side-effect')}; echo {{HO}}
            matrix: {{H0: [67, 70], ombh2: [0.022]}}
    """)
    refused_everywhere(tmp_path, spec, "job.yaml:6:10: $.tasks[0].run (task 'sim_{H0}'): unknown placeholder {HO} "
                                       "(did you mean {H0}?): the matrix parameters are H0, ombh2; write {{HO}} for "
                                       "a literal {HO}")


def test_an_escaped_placeholder_is_a_literal_and_the_shells_braces_are_left_alone(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: ph, run_dir: runs/ph}
        tasks:
          - id: "sim_{H0}"
            kind: shell
            run: |
              echo {H0} {{H0}} "${H0:-unset}" '{print $1}' {a,b} '{"h": {H0}}' > out.txt
            outputs: [out.txt]
            matrix: {H0: [67]}
    """)
    r = cli(tmp_path, "run", "job.yaml")
    assert r.returncode == 0, r.stderr
    assert (published(tmp_path / "runs/ph", "sim_67") / "out.txt").read_text() == '67 {H0} unset {print $1} a b {"h": 67}\n'


def test_an_input_no_task_writes_must_exist_beside_the_spec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f"""
        version: 1
        job: {{name: inputs, run_dir: runs/inputs}}
        tasks:
          - id: make
            kind: shell
            run: touch {q(tmp_path / 'side-effect')}; echo x > outs.txt
            outputs: [outs.txt]
          - id: "use_{{h}}"
            kind: shell
            run: cat outs.txt outs_{{h}}.txt
            inputs: [outs.txt, "outs_{{h}}.txt"]
            matrix: {{h: [67, 68, 69]}}
    """)
    refused_everywhere(tmp_path, spec, f"job.yaml:11:24: $.tasks[1].inputs[1] (task 'use_{{h}}'): input 'outs_67.txt' "
                                       f"not found: no task writes it and {tmp_path} has no such file (and 2 more "
                                       "inputs of this entry's tasks); create it, declare it in the outputs of the "
                                       "task that makes it, or list it under late_inputs if it appears only once the "
                                       "job runs")
    for h in (67, 68, 69):  # once they are there, all is well
        (tmp_path / f"outs_{h}.txt").write_text(f"{h}\n")
    assert cli(tmp_path, "validate", "job.yaml").returncode == 0
    assert cli(tmp_path, "run", "job.yaml").returncode == 0


def test_late_inputs_may_appear_once_the_job_runs(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: late, run_dir: runs/late}
        tasks:
          - id: use
            kind: shell
            run: cat maps/a.fits
            inputs: [params.ini]
            late_inputs: ["maps/*.fits"]
    """)
    (tmp_path / "params.ini").write_text("x\n")
    r = cli(tmp_path, "validate", "job.yaml")
    assert r.returncode == 0, r.stderr
    assert cli(tmp_path, "plan", "job.yaml").returncode == 0
    r = cli(tmp_path, "run", "job.yaml")  # still missing when the task starts: the task fails, saying why
    assert r.returncode == 1
    assert "input 'maps/*.fits' not found: no task writes it" in r.stderr
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps/a.fits").write_text("map\n")
    assert cli(tmp_path, "run", "job.yaml").returncode == 0
    assert (work_dir(tmp_path / "runs/late", "use") / "logs/stdout.log").read_text().endswith("map\n")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] + ("-dry-run" if len(c) > 1 else ""))
def test_a_glob_input_beside_the_spec_passes(tmp_path: Path, command: tuple[str, ...]) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: glob, run_dir: runs/glob}
        execution: {backend: local}
        tasks:
          - id: use
            kind: shell
            run: cat data/*.txt
            inputs: ["data/*.txt"]
    """)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.txt").write_text("a\n")
    r = cli(tmp_path, *command, "job.yaml", env=fake_sbatch(tmp_path))
    assert r.returncode == 0, r.stderr


def test_a_misspelled_call_is_refused_before_any_task_runs(tmp_path: Path) -> None:
    (tmp_path / "sims.py").write_text("def run_camb(h0):\n    return h0\n")
    spec = write_spec(tmp_path, f"""
        version: 1
        job: {{name: calls, run_dir: runs/calls}}
        tasks:
          - id: first
            kind: shell
            run: touch {q(tmp_path / 'side-effect')}
          - id: camb
            kind: python
            call: sims:run_cmab
            args: {{h0: 67}}
            depends_on: [first]
    """)
    refused_everywhere(tmp_path, spec, "job.yaml:9:11: $.tasks[1].call (task 'camb'): call 'sims:run_cmab': sims.py "
                                       "defines no function 'run_cmab' (did you mean 'run_camb'?)")


AGENT_JOB = """
    version: 1
    job: {{name: keys, run_dir: runs/keys}}
    llm:
      default_model: gpt
      models:
        gpt: {{provider: openai, model: gpt-4o-mini, api_key_env: MY_LLM_KEY, base_url: "http://127.0.0.1:9/v1"}}
    tasks:
      - id: upstream
        kind: shell
        run: touch {marker}
      - id: review
        kind: agent
        instructions: review it
        depends_on: [upstream]
"""


def test_an_unset_api_key_is_refused_before_the_queue(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, AGENT_JOB.format(marker=q(tmp_path / "side-effect")))
    env = fake_sbatch(tmp_path)
    here = ("job.yaml:6:62: $.llm.models.gpt.api_key_env: model 'gpt': its API key variable MY_LLM_KEY is not set here "
            "(task 'review' uses it)")
    for command in (("validate",), ("plan",), ("run",)):
        r = cli(tmp_path, *command, spec.name, env=env)
        assert (r.returncode, r.stderr.splitlines()[0]) == (2, here), r.stderr
    for command in (("submit", "--dry-run"), ("submit",)):
        r = cli(tmp_path, *command, spec.name, env=env)
        assert r.returncode == 2
        assert r.stderr.splitlines()[0] == (
            "job.yaml:6:62: $.llm.models.gpt.api_key_env: model 'gpt': its API key variable MY_LLM_KEY is not set in this shell "
            "(task 'review' uses it): the job gets the environment submit runs in, so export it before submit")
    assert not (tmp_path / "side-effect").exists()
    assert not (tmp_path / "sbatch-calls").exists()
    r = cli(tmp_path, "plan", "--estimate", spec.name, env=env)  # pricing a job needs no key
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path, "validate", spec.name, env={**env, "MY_LLM_KEY": "sk-test"})
    assert r.returncode == 0, r.stderr


def test_an_unknown_cmbagent_variable_is_warned_about_everywhere(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: vars, run_dir: runs/vars}
        tasks:
          - {id: a, kind: shell, run: "true"}
    """)
    env = {**fake_sbatch(tmp_path), "CMBAGENT_MAX_WORKER": "4"}
    warning = ("environment: warning: CMBAGENT_MAX_WORKER is not a variable cmbagent-batch reads "
               "(did you mean CMBAGENT_MAX_WORKERS?)")
    for command in COMMANDS:
        r = cli(tmp_path, *command, "job.yaml", env=env)
        assert r.returncode == 0, (command, r.stderr)
        assert r.stderr.count(warning) == 1, (command, r.stderr)


def test_a_cached_plan_is_checked_against_the_files_and_variables_of_the_moment(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: cached, run_dir: runs/cached}
        tasks:
          - {id: a, kind: shell, run: cat params.ini, inputs: [params.ini]}
    """)
    (tmp_path / "params.ini").write_text("x\n")
    first = cli(tmp_path, "plan", "--format", "json", "job.yaml")
    assert first.returncode == 0, first.stderr
    assert '"from_cache": false' in first.stdout
    (tmp_path / "params.ini").unlink()
    r = cli(tmp_path, "plan", "job.yaml", env={**clean_env(tmp_path), "CMBAGENT_RETRIE": "1"})
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "environment: warning: CMBAGENT_RETRIE is not a variable cmbagent-batch reads (did you mean CMBAGENT_RETRIES?)",
        f"job.yaml:4:56: $.tasks[0].inputs[0] (task 'a'): input 'params.ini' not found: no task writes it and "
        f"{tmp_path} has no such file; create it, declare it in the outputs of the task that makes it, or list it "
        "under late_inputs if it appears only once the job runs",
    ]
    (tmp_path / "params.ini").write_text("x\n")
    again = cli(tmp_path, "plan", "--format", "json", "job.yaml")
    assert again.returncode == 0, again.stderr
    assert '"from_cache": true' in again.stdout


def test_a_task_that_succeeded_needs_its_inputs_no_more(tmp_path: Path) -> None:
    """Raw data purged from scratch after its task succeeded: a resume, a requeue or a resubmission goes on."""
    write_spec(tmp_path, """
        version: 1
        job: {name: purge, run_dir: runs/purge}
        execution: {rerun_on: [spec, code]}
        tasks:
          - {id: stage1, kind: shell, run: cat raw.dat > clean.dat, inputs: [raw.dat], outputs: [clean.dat]}
          - {id: stage2, kind: shell, run: cat clean.dat, inputs: [clean.dat]}
    """)
    (tmp_path / "raw.dat").write_text("raw\n")
    assert cli(tmp_path, "run", "job.yaml").returncode == 0
    (tmp_path / "raw.dat").unlink()
    for command in (("validate",), ("plan",), ("submit", "--dry-run")):
        r = cli(tmp_path, *command, "job.yaml", env=fake_sbatch(tmp_path))
        assert r.returncode == 0, (command, r.stderr)
    r = cli(tmp_path, "run", "job.yaml")
    assert r.returncode == 0, r.stderr
    assert "stage1" not in r.stderr and "1 skipped" in r.stderr  # stage1 up to date; stage2 reads its output
    r = cli(tmp_path, "run", "--fresh", "job.yaml")  # from scratch, stage1 runs again: its input must be there
    assert r.returncode == 2
    assert "input 'raw.dat' not found: no task writes it" in r.stderr
    assert "kept at" not in r.stderr and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["purge"]
    r = cli(tmp_path, "run", "--only", "nosuch", "job.yaml")
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: --only 'nosuch' matches no task\n")


def test_braces_far_from_any_parameter_are_a_warning_and_latex_is_left_alone(tmp_path: Path) -> None:
    write_spec(tmp_path, r"""
        version: 1
        job: {name: braces, run_dir: runs/braces}
        tasks:
          - id: "cl_{lmax}"
            kind: shell
            description: 'C_\ell^{TT} and \mathrm{dof} for {lmax}'
            run: seq 3 | awk '{print}' > {lmax}.txt; echo {Lmax} {lmx}
            outputs: ["{lmax}.txt"]
            matrix: {lmax: [500]}
    """)
    r = cli(tmp_path, "validate", "job.yaml")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [  # every unknown name of the string, and only errors while there are some
        "job.yaml:7:10: $.tasks[0].run (task 'cl_{lmax}'): unknown placeholder {Lmax} (did you mean {lmax}?): the "
        "matrix parameters are lmax; write {{Lmax}} for a literal {Lmax}",
        "job.yaml:7:10: $.tasks[0].run (task 'cl_{lmax}'): unknown placeholder {lmx} (did you mean {lmax}?): the "
        "matrix parameters are lmax; write {{lmx}} for a literal {lmx}",
        "2 problems in 1 file",
    ]
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace(" echo {Lmax} {lmx}", ""))
    for command in COMMANDS:
        r = cli(tmp_path, *command, "job.yaml", env=fake_sbatch(tmp_path))
        assert r.returncode == 0, (command, r.stderr)
        assert r.stderr.count("warning: {print} is not a matrix parameter (lmax)") == 1, (command, r.stderr)
    assert (published(tmp_path / "runs/braces", "cl_500") / "500.txt").read_text() == "1\n2\n3\n"


def test_a_sites_mpi_hidden_by_the_interpreters_directory_is_warned_about(tmp_path: Path) -> None:
    here = Path(sys.executable).parent
    if not os.access(here / "mpiexec", os.X_OK):
        pytest.skip("no mpiexec beside this python (pip install mpich)")
    site = tmp_path / "site" / "bin"
    site.mkdir(parents=True)
    (site / "mpiexec").write_text("#!/bin/sh\necho site\n")
    (site / "mpiexec").chmod(0o755)
    write_spec(tmp_path, """
        version: 1
        job: {name: mpi, run_dir: runs/mpi}
        tasks:
          - {id: a, kind: shell, run: command -v mpiexec}
    """)
    env = {**clean_env(tmp_path), "PATH": f"{site}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    r = cli(tmp_path, "validate", "job.yaml", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"environment: warning: tasks find mpiexec in {here}, put first on their PATH (execution.path: interpreter), "
        f"before those in {site}: a program built against that MPI needs its own launcher; set execution.path: "
        "inherit, or call it by its full path"]
    r = cli(tmp_path, "validate", "job.yaml", env={**env, "CMBAGENT_PATH": "inherit"})
    assert (r.returncode, r.stderr) == (0, "")
    (site.parent / "pyvenv.cfg").write_text("home = /usr/bin\n")  # another Python environment's: a wheel's MPI
    r = cli(tmp_path, "validate", "job.yaml", env=env)
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_under_mpi_rank_0_alone_reports_and_no_task_runs(tmp_path: Path) -> None:
    write_spec(tmp_path, f"""
        version: 1
        job: {{name: ranks, run_dir: runs/ranks}}
        tasks:
          - id: "sim_{{H0}}"
            kind: shell
            run: touch {q(tmp_path / 'side-effect')}; echo {{HO}}
            matrix: {{H0: [67, 70]}}
          - {{id: use, kind: shell, run: cat params.ini, inputs: [params.ini], depends_on: ["sim_*"]}}
    """)
    r = mpirun(tmp_path, 3, "run", "job.yaml")
    assert r.returncode == 2
    assert r.stderr.count("unknown placeholder {HO} (did you mean {H0}?)") == 1, r.stderr
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace("{HO}", "{{HO}}"))
    r = mpirun(tmp_path, 3, "run", "job.yaml")
    assert r.returncode == 2
    assert r.stderr.count("input 'params.ini' not found: no task writes it") == 1, r.stderr
    assert not (tmp_path / "side-effect").exists()


def test_a_missing_key_of_an_analysis_that_falls_back_is_a_warning(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: fb, run_dir: runs/fb}
        llm:
          default_model: gpt
          models:
            gpt: {provider: openai, model: gpt-4o-mini, api_key_env: MY_LLM_KEY, base_url: "http://127.0.0.1:9/v1"}
        analysis: {sources: [explicit, files, llm], fallback: explicit}
        tasks:
          - {id: a, kind: shell, run: "true"}
    """)
    r = cli(tmp_path, "validate", "job.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "job.yaml:6:62: $.llm.models.gpt.api_key_env: warning: model 'gpt': its API key variable MY_LLM_KEY is not "
        "set here (the LLM dependency analysis uses it); the dependency analysis will fail and fall back "
        "(analysis.fallback)"]
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace("explicit}", "error}"))
    r = cli(tmp_path, "validate", "job.yaml")
    assert r.returncode == 2, r.stderr


def test_a_refused_run_leaves_no_empty_run_directory(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        version: 1
        job: {name: empty, run_dir: runs/deep/empty}
        tasks:
          - {id: a, kind: shell, run: "true"}
    """)
    r = cli(tmp_path, "run", "--only", "nosuch", "job.yaml")
    assert (r.returncode, r.stderr) == (2, "cmbagent-batch: error: --only 'nosuch' matches no task\n")
    assert not (tmp_path / "runs").exists()
