"""``cmbagent-batch export RUN_DIR --format ro-crate``: a real run (shell and python tasks with files, a
failure and its dependent, an agent task on the scripted endpoint) exported, then checked with the
standard tools: roc-validator (the Provenance Run Crate 0.5 profile and those it extends) and ro-crate-py,
and against the run itself: file hashes, the spec's hash, the plan's edges, the ledger's head, the models,
and each task's action (state, error, rank, host, times). And under MPI, on 3 ranks.

roc-validator expands the JSON-LD with its two contexts, which it fetches over HTTP. The tests run offline:
its HTTP cache (in the test's directory) is filled first with the RO-Crate context that ro-crate-py ships,
its bioschemas terms named as RO-Crate 1.1 names them, and the workflow-run context's terms.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from tests.helpers.cli import cli, write_spec
from tests.helpers.mpi_run import MPIEXEC, mpirun
from tests.helpers.runs import published, read_run
from tests.helpers.scripted_llm import Reply, ScriptedLLM

rocrate = pytest.importorskip("rocrate", reason="the test extra installs ro-crate-py")
ro_crate_py = pytest.importorskip("rocrate.rocrate", reason="the test extra installs ro-crate-py")
services = pytest.importorskip("rocrate_validator.services", reason="the test extra installs roc-validator")
# rdflib, under the validator's SHACL checks, warns of its own deprecations
pytestmark = pytest.mark.filterwarnings("ignore:ConjunctiveGraph is deprecated:DeprecationWarning")

KEY = "sk-export-test-0123456789"
JOB = """\
version: 1
job: {{name: prov}}
execution: {{keep_going: true, max_workers: 2}}
llm:
  models:
    m: {{model: test-model, base_url: "{url}", api_key_env: TEST_LLM_KEY, timeout: 30, max_retries: 0,
        price: {{prompt_per_1m: 1.0, completion_per_1m: 2.0}}}}
tasks:
  - id: gen
    kind: shell
    run: cat raw.txt > a.txt; echo two > b.txt
    inputs: [raw.txt]
    outputs: [a.txt, b.txt]
  - id: sq-{{i}}
    kind: python
    matrix: {{i: [1, 2]}}
    call: crate_tasks:square
    args: {{x: "{{i}}"}}
    inputs: [a.txt]
    outputs: [sq.txt]
  - id: bad
    kind: shell
    run: echo oops >&2; exit 3
    depends_on: [gen]
  - id: after-bad
    kind: shell
    run: "true"
    depends_on: [bad]
  - id: think
    kind: agent
    model: m
    instructions: "THINK: go"
    outputs: [thought.md]
"""
TASKS = """\
def square(x, ctx):
    with open("sq.txt", "w") as fh:
        fh.write(open("a.txt").read() + str(int(x) ** 2))
    return {"x": int(x)}
"""
WFRUN_TERMS = ["ParameterConnection", "ContainerImage", "DockerImage", "SIFImage", "connection", "sourceParameter", "targetParameter", "md5", "sha1", "sha256", "sha512", "environment", "registry", "tag", "containerImage", "resourceUsage"]


def contexts() -> dict[str, Any]:
    """The two contexts a crate names, by URL, as the validator would fetch them."""
    shipped = json.loads((Path(rocrate.__file__).parent / "data" / "ro-crate.jsonld").read_text())["@context"]
    bio = "https://bioschemas.org/"
    shipped.update({"ComputationalWorkflow": bio + "ComputationalWorkflow", "FormalParameter": bio + "FormalParameter",
                    "input": bio + "ComputationalWorkflow#input", "output": bio + "ComputationalWorkflow#output"})
    wfrun = {t: f"https://w3id.org/ro/terms/workflow-run#{t}" for t in WFRUN_TERMS}
    return {"https://w3id.org/ro/crate/1.1/context": {"@context": shipped},
            "https://w3id.org/ro/terms/workflow-run/context": {"@context": wfrun}}


def http_cache(where: Path) -> str:
    """A requests-cache database holding the contexts, filled through a transport that never leaves this host."""
    from requests.adapters import HTTPAdapter
    from requests_cache import CachedSession
    from urllib3.response import HTTPResponse

    bodies = contexts()

    class Local(HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            raw = HTTPResponse(body=io.BytesIO(json.dumps(bodies[request.url]).encode()), status=200,
                               headers={"Content-Type": "application/ld+json"}, preload_content=False)
            return self.build_response(request, raw)

    name = str(where / "http-cache")
    with CachedSession(cache_name=name, backend="sqlite", expire_after=-1) as session:
        session.mount("https://w3id.org/", Local())
        for url in bodies:
            assert session.get(url).status_code == 200
    return name


def validation_issues(crate: Path, cache: str) -> list[str]:
    """What roc-validator finds against the Provenance Run Crate profile, requirements only (MUST)."""
    result = services.validate({"rocrate_uri": str(crate), "profile_identifier": "provenance-run-crate",
                                "requirement_severity": "REQUIRED", "offline": True, "cache_path": cache,
                                "skip_availability_check": True})
    issues = [f"{i.check.identifier if i.check else ''}: {i.message}" for i in result.get_issues()]
    assert result.passed() == (not issues)
    return issues


def graph(crate: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((crate / "ro-crate-metadata.json").read_text())
    return {e["@id"]: e for e in data["@graph"]}


def ids(value: Any) -> list[str]:
    """The ids a property refers to (one reference, or a list of them)."""
    if value is None:
        return []
    return [v["@id"] for v in (value if isinstance(value, list) else [value])]


def usage(g: dict[str, dict[str, Any]], action: dict[str, Any]) -> dict[str, Any]:
    return {g[i]["name"]: g[i]["value"] for i in ids(action["resourceUsage"])}


def local_path(file_id: str, crate: Path) -> Path:
    return Path(unquote(urlparse(file_id).path)) if file_id.startswith("file:") else crate / file_id


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job run once (exit 1: a task fails), then exported to DIR/crate."""
    tmp = tmp_path_factory.mktemp("export")
    (tmp / "raw.txt").write_text("raw\n")
    (tmp / "crate_tasks.py").write_text(TASKS)
    with ScriptedLLM([Reply("a thought")]) as srv:
        spec = write_spec(tmp, JOB.format(url=srv.base_url))
        result = run_cli(tmp, "run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    result = run_cli(tmp, "export", str(spec), "--format", "ro-crate", "-o", str(tmp / "crate"))
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp


def run_cli(where: Path, *args: str) -> Any:
    from tests.helpers.cli import clean_env

    return cli(where, *args, env=clean_env(where, TEST_LLM_KEY=KEY))


@pytest.mark.slow  # a run with an agent task, then the export
def test_the_crate_of_a_run_validates_with_roc_validator_and_ro_crate_py(exported: Path) -> None:
    crate = exported / "crate"
    assert validation_issues(crate, http_cache(exported)) == []
    read = ro_crate_py.ROCrate(str(crate))
    assert read.mainEntity.id == "job.yaml"
    assert {a.id for a in read.get_by_type("CreateAction")} >= {"#task/gen", "#task/bad", "#task/think"}


@pytest.mark.slow
def test_its_file_hashes_are_those_of_the_published_outputs(exported: Path) -> None:
    crate, run_dir = exported / "crate", exported / "runs" / "prov"
    g = graph(crate)
    files = {i: e for i, e in g.items() if e.get("@type") == "File"}
    for task in ("gen", "sq-1", "sq-2", "think"):
        root = published(run_dir, task)
        outputs = ids(g[f"#task/{task}"]["result"])
        on_disk = sorted(str(p) for p in root.rglob("*") if p.is_file())
        assert sorted(str(local_path(i, crate)) for i in outputs) == on_disk
        for i in outputs:
            assert files[i]["sha256"] == sha256(local_path(i, crate)), i
            assert files[i]["contentSize"] == local_path(i, crate).stat().st_size
    # a consumer's input is its producer's output (one entity), and an input from beside the spec is hashed
    assert ids(g["#task/sq-1"]["object"]) == [(published(run_dir, "gen") / "a.txt").as_uri()]
    raw = (exported / "raw.txt").as_uri()
    assert ids(g["#task/gen"]["object"]) == [raw] and files[raw]["sha256"] == sha256(exported / "raw.txt")


@pytest.mark.slow
def test_it_holds_the_spec_and_its_hash_the_plan_with_edge_sources_the_models_and_the_ledger_head(
        exported: Path) -> None:
    crate, run_dir = exported / "crate", exported / "runs" / "prov"
    g, manifest = graph(crate), read_run(run_dir)
    spec = g["job.yaml"]
    assert spec["@type"] == ["File", "SoftwareSourceCode", "ComputationalWorkflow", "HowTo"]
    assert spec["sha256"] == manifest["spec"]["sha256"] == sha256(crate / "job.yaml") == sha256(exported / "job.yaml")
    plan = json.loads((crate / "plan.json").read_text())
    printed = json.loads(run_cli(exported, "plan", "job.yaml", "--format", "json").stdout)
    assert plan["edges"] == printed["edges"]
    assert {(e["from"], e["to"], e["source"]) for e in plan["edges"]} == {
        ("gen", "bad", "explicit"), ("bad", "after-bad", "explicit"), ("gen", "sq-1", "files"), ("gen", "sq-2", "files")}
    assert g["plan.json"]["sha256"] == sha256(crate / "plan.json")
    model = g["#model/m"]
    assert (model["name"], model["identifier"]) == ("test-model", "m")
    assert set(model["alternateName"]) == {"test-model", "gpt-4o-mini-2024-07-18"}  # sent, and as reported
    assert g["#tool/4"]["softwareRequirements"] == {"@id": "#model/m"}
    assert g["#ledger/head"]["value"] == manifest["ledger"]["head"]
    assert g["#price-table/spec"]["identifier"] == "spec"
    assert "1 entries, head " + manifest["ledger"]["head"] + ", verified" in g["#ledger"]["description"]
    ledger = g[ids(g["#ledger"]["about"])[0]]
    assert ledger["sha256"] == sha256(run_dir / "ledger.jsonl")


@pytest.mark.slow
def test_every_task_is_an_action_with_its_state_error_rank_host_and_times(exported: Path) -> None:
    g = graph(exported / "crate")
    tasks = read_run(exported / "runs" / "prov")["tasks"]
    actions = {i[len("#task/"):]: e for i, e in g.items() if e.get("@type") == "CreateAction" and i.startswith("#task/")}
    assert set(actions) == set(tasks)
    for tid, action in actions.items():
        facts = usage(g, action)
        assert (facts["state"], facts["rank"], facts["host"]) == (tasks[tid]["state"], 0, tasks[tid]["host"])
        control = g[f"#task/{tid}/control"]
        assert control["object"] == {"@id": f"#task/{tid}"} and control["@type"] == "ControlAction"
    bad, after = actions["bad"], actions["after-bad"]
    assert (bad["error"], bad["actionStatus"]["@id"]) == ("exit code 3", "http://schema.org/FailedActionStatus")
    assert usage(g, bad)["exit_code"] == 3 and bad["startTime"] <= bad["endTime"]
    assert (after["error"], "startTime" in after) == ("upstream task 'bad' failed", False)
    assert actions["gen"]["actionStatus"] == {"@id": "http://schema.org/CompletedActionStatus"}
    runner = next(e for e in g.values() if e.get("@type") == "OrganizeAction")
    assert len(ids(runner["object"])) == 6 and runner["instrument"] == {"@id": "#cmbagent-batch"}


@pytest.mark.slow
def test_a_copied_crate_holds_its_files_and_validates(exported: Path) -> None:
    crate = exported / "copied"
    result = run_cli(exported, "export", "runs/prov", "-o", str(crate), "--copy", "--license",
                     "https://spdx.org/licenses/CC-BY-4.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Wrote a Workflow Run RO-Crate of run ")
    assert "files of" in result.stdout and "copied into the crate): " + str(crate / "ro-crate-metadata.json") in result.stdout
    g = graph(crate)
    copied = [i for i, e in g.items() if e.get("@type") == "File"]
    assert copied and all(not i.startswith("file:") and g[i]["sha256"] == sha256(crate / i) for i in copied)
    assert g["./"]["license"] == {"@id": "https://spdx.org/licenses/CC-BY-4.0"}
    assert validation_issues(crate, http_cache(exported)) == []


SHELL_ONLY = """\
version: 1
job: {name: small}
tasks:
  - id: one
    kind: shell
    run: echo 1 > one.txt
    outputs: [one.txt]
"""


def test_export_refuses_what_it_cannot_write_or_trust_with_exit_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SHELL_ONLY)
    cli(tmp_path, "run", str(spec), check=True)
    run_dir = tmp_path / "runs" / "small"
    made = cli(tmp_path, "export", "job.yaml", check=True)
    crate, run_id = run_dir / "ro-crate", read_run(run_dir)["run_id"]
    hashed = (published(run_dir, "one") / "one.txt").stat().st_size + (crate / "plan.json").stat().st_size
    assert made.stdout == (f"Wrote a Workflow Run RO-Crate of run {run_id} (1 tasks, 2 files of {hashed:,} bytes "
                           f"hashed, referenced where they are (--copy copies them)): {crate}/ro-crate-metadata.json "
                           f"({(crate / 'ro-crate-metadata.json').stat().st_size:,} bytes)\n")
    cases = {
        ("nowhere",): "cmbagent-batch: error: nowhere: no such file or directory; export takes RUN_DIR, a run "
                      "directory (with run.json), or SPEC, a job spec (its run directory, as run finds it)\n",
        (str(tmp_path),): f"cmbagent-batch: error: {tmp_path} is not a run directory (no run.json); export takes RUN_DIR, a run "
                          "directory (with run.json), or SPEC, a job spec (its run directory, as run finds it)\n",
        (str(run_dir),): f"cmbagent-batch: error: cannot write the crate to {run_dir}/ro-crate: the directory is not "
                         "empty (a crate is written into a new or empty directory; remove it or give another -o)\n",
        (str(run_dir), "-o", "job.yaml"): "cmbagent-batch: error: cannot write the crate to -o job.yaml: it is a file\n",
    }
    for args, message in cases.items():
        result = cli(tmp_path, "export", *args)
        assert (result.returncode, result.stderr) == (2, message), args
    result = cli(tmp_path, "export", str(run_dir), "--format", "rocrate")
    assert result.returncode == 2
    assert result.stderr.endswith("cmbagent-batch export: error: argument --format: invalid choice: 'rocrate' "
                                  "(did you mean 'ro-crate'?); choose from ro-crate\n")
    old = hashlib.sha256(spec.read_bytes()).hexdigest()
    spec.write_text(SHELL_ONLY + "# edited\n")
    now = hashlib.sha256(spec.read_bytes()).hexdigest()
    result = cli(tmp_path, "export", str(run_dir), "-o", "elsewhere")
    assert (result.returncode, result.stderr) == (2, (
        f"cmbagent-batch: error: {spec} changed since the run in {run_dir} (sha256 {now[:12]} now, {old[:12]} "
        "then): the crate would describe a job that did not run; restore the spec as it ran, or run it again\n"))
    assert not (tmp_path / "elsewhere").exists()


MPI_JOB = """\
version: 1
job: {name: ranks}
execution: {backend: mpi, keep_going: true}
tasks:
  - id: gen-{i}
    kind: shell
    matrix: {i: [1, 2, 3, 4]}
    run: sleep 0.2 && echo "$CMBAGENT_RANK {i}" > part.txt
    outputs: [part.txt]
  - id: merge
    kind: shell
    depends_on: ["gen-*"]
    run: echo merged > merged.txt
    outputs: [merged.txt]
"""


@pytest.mark.slow  # runs under mpiexec
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_an_mpi_run_exports_with_each_action_on_its_worker_rank(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the MPI backend needs the 'mpi' extra")
    spec = write_spec(tmp_path, MPI_JOB)
    result = mpirun(tmp_path, 3, "run", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    cli(tmp_path, "export", str(spec), "-o", "crate", check=True)
    crate = tmp_path / "crate"
    assert validation_issues(crate, http_cache(tmp_path)) == []
    g, tasks = graph(crate), read_run(tmp_path / "runs" / "ranks")["tasks"]
    ranks = set()
    for tid, task in tasks.items():
        facts = usage(g, g[f"#task/{tid}"])
        assert (facts["rank"], facts["host"]) == (task["rank"], task["host"]) and facts["state"] == "succeeded"
        ranks.add(facts["rank"])
        part = ids(g[f"#task/{tid}"]["result"])[0]
        assert g[part]["sha256"] == sha256(local_path(part, crate))
    assert ranks == {1, 2}
    assert os.path.isfile(crate / "plan.json")
