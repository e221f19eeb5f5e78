"""Checks of a loaded spec against the place it will run: python calls resolve, the API keys its models
need are set, and every ``CMBAGENT_*`` variable set is one cmbagent-batch knows. No user code runs.

Each takes the spec (and the environment) and returns ``Problem``s, located in the spec file: the file
is parsed again for their places only when there are some. Linear in the number of tasks: each distinct
call and each model is checked once.
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cmbagent_batch.errors import Problem, Severity
from cmbagent_batch.spec.callables import Resolver
from cmbagent_batch.spec.checks import Finding
from cmbagent_batch.spec.model import JobSpec
from cmbagent_batch.spec.tasks import by_entry, calling_models, of_kind
from cmbagent_batch.spec.variables import DEFAULT_KEY_ENV, PREFIX, is_known, known
from cmbagent_batch.spec.yamldata import json_path, name_tasks
from cmbagent_batch.spec.yamlio import parse_yaml, read_bytes

ENVIRONMENT = "environment"  # the file of a problem with an environment variable
NAMED = 2  # tasks named in a message; the rest are counted
MPI_TOOLS = ("mpiexec", "mpirun", "mpicc", "mpicxx", "mpifort", "mpif90")  # a site's MPI brings these
KEYLESS_PROVIDERS = ("local",)  # served by cmbagent-batch itself, which checks no key


@dataclass(frozen=True, slots=True)
class CallNeed:
    """A python entry's ``call: module:function``."""

    entry: int  # its index in $.tasks
    call: str


@dataclass(frozen=True, slots=True)
class KeyNeed:
    """A model the job may call whose provider needs an API key, and who calls it."""

    model: str  # its key in llm.models
    variable: str  # the variable holding its key
    place: tuple[str, ...]  # where a problem points: its api_key_env, else its name
    at_key: bool  # the problem points at the model's key (it has no api_key_env)
    tasks: int  # tasks using it (agent tasks, and tasks that declare it in models)
    named: tuple[str, ...]  # the first of them, by id
    analysis: bool  # it is the LLM dependency analysis's model
    fallback: bool = False  # ... and that analysis falls back when it fails (analysis.fallback is not error)

    def users(self, analysis: bool) -> str:
        """Who calls it, for messages: "agent tasks 'a', 'b' and 3 more and the LLM dependency analysis use it"."""
        parts = []
        if self.tasks:
            quoted = [repr(i) for i in self.named]
            if self.tasks > len(quoted):
                listed = f"{', '.join(quoted[:NAMED])} and {self.tasks - NAMED:,} more"
            else:
                listed = " and ".join(filter(None, (", ".join(quoted[:-1]), quoted[-1])))
            parts.append(f"task{'s' if self.tasks > 1 else ''} {listed}")
        if analysis:
            parts.append("the LLM dependency analysis")
        return f"{' and '.join(parts)} {'use' if self.tasks > 1 or len(parts) > 1 else 'uses'} it"


def calls_needed(spec: JobSpec) -> tuple[CallNeed, ...]:
    """Each python entry's ``call`` (the schema refuses placeholders in a call: a matrix entry's tasks share it)."""
    seen: dict[int, str] = {}
    for t, _ in by_entry(spec.tasks):
        if t.kind == "python" and t.call is not None and t.entry not in seen:
            seen[t.entry] = t.call
    return tuple(CallNeed(entry, call) for entry, call in seen.items())


def check_calls(spec_path: str, calls: Sequence[CallNeed]) -> list[Problem]:
    """Every call resolves, without importing user code (see ``spec/callables.py``): one error at the
    ``call`` of each entry whose call does not."""
    resolver = Resolver(os.path.dirname(os.path.abspath(spec_path)))
    found = []
    for need in calls:
        why = resolver.problem(need.call)
        if why is not None:
            found.append(Finding(("tasks", need.entry, "call"), why))
    return locate(spec_path, found)


def keys_needed(spec: JobSpec) -> tuple[KeyNeed, ...]:
    """Every model the job may call whose provider needs a key (all but ``local``): the agent tasks' models,
    those other tasks declare (``models``) and the LLM dependency analysis's, with their users."""
    named: dict[str, list[str]] = {}
    count: dict[str, int] = {}
    for t in itertools.chain(of_kind(spec.tasks, "agent"), calling_models(spec.tasks)):
        for key in t.models or ((t.model,) if t.model is not None else ()):
            count[key] = count.get(key, 0) + 1
            ids = named.get(key) or named.setdefault(key, [])
            if len(ids) <= NAMED:  # one more than shown: three are named, four are "'a', 'b' and 2 more"
                ids.append(t.id)
    analysis_model = (spec.analysis.model or spec.llm.default_model) if "llm" in spec.analysis.sources else None
    out = []
    for name in sorted(set(count) | ({analysis_model} if analysis_model else set())):
        model = spec.llm.models.get(name)
        if model is None or model.provider in KEYLESS_PROVIDERS:
            continue  # an undefined model is refused when the spec is loaded
        place = ("llm", "models", name, "api_key_env") if model.api_key_env else ("llm", "models", name)
        out.append(KeyNeed(name, model.api_key_env or DEFAULT_KEY_ENV, place, model.api_key_env is None,
                           count.get(name, 0), tuple(named.get(name, ())), name == analysis_model,
                           spec.analysis.fallback != "error"))
    return tuple(out)


def check_keys(spec_path: str, keys: Sequence[KeyNeed], environ: Mapping[str, str], *, submitting: bool,
               analysis_call: bool) -> list[Problem]:
    """Every model the job will call has its ``api_key_env`` variable (default ``OPENAI_API_KEY``) set and not
    blank in ``environ``: the agent tasks' models and, when ``analysis_call`` (the LLM dependency analysis
    will call its model, not cached), the analysis model. ``submitting``: ``environ`` is the shell ``submit``
    runs in, which the job inherits. One error per model, at its ``api_key_env`` (else its name)."""
    found = []
    for need in keys:
        analysis = need.analysis and analysis_call
        if not need.tasks and not analysis:
            continue
        value = environ.get(need.variable)
        if value is not None and value.strip():
            continue
        state = "is not set" if value is None else "is empty"
        who = need.users(analysis)
        if submitting:
            message = (f"model {need.model!r}: its API key variable {need.variable} {state} in this shell ({who}): "
                       "the job gets the environment submit runs in, so export it before submit")
        else:
            message = f"model {need.model!r}: its API key variable {need.variable} {state} here ({who})"
        degraded = not need.tasks and need.fallback  # the analysis alone, which falls back when it fails
        if degraded:
            message += "; the dependency analysis will fail and fall back (analysis.fallback)"
        found.append(Finding(need.place, message, key=need.at_key, warning=degraded))
    return locate(spec_path, found)


def unknown_variables(environ: Mapping[str, str]) -> list[Problem]:
    """A warning for each ``CMBAGENT_*`` variable (in any case) in ``environ`` that cmbagent-batch neither
    reads nor sets for tasks, with the known one it most likely misspells; located in ``environment``."""
    out = []
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX) or is_known(name):
            continue
        # compared without the prefix they share, which would make every name look alike
        close = difflib.get_close_matches(name.upper()[len(PREFIX):], [k[len(PREFIX):] for k in known()], n=1)
        meant = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
        out.append(Problem(ENVIRONMENT, None, None, name, f"{name} is not a variable cmbagent-batch reads{meant}",
                           severity=Severity.WARNING))
    return out


def shadowed_tools(environ: Mapping[str, str], executable: str) -> list[Problem]:
    """A warning when putting the interpreter's directory first on the tasks' ``PATH`` (``execution.path:
    interpreter``) hides a cluster's own MPI tools behind those of a virtual environment (the mpich wheel's):
    a program built against the site's MPI needs the site's launcher. Another virtual environment's tools
    (a wheel's too) are not a site's."""
    directory = os.path.dirname(os.path.abspath(executable)) if executable else ""
    if not directory:
        return []
    ours, theirs = [], ""
    for tool in MPI_TOOLS:
        mine = os.path.join(directory, tool)
        if not os.access(mine, os.X_OK):
            continue
        for place in environ.get("PATH", "").split(os.pathsep):
            other = os.path.join(place, tool)
            if place and os.path.normpath(place) != directory and os.access(other, os.X_OK) and \
                    os.path.realpath(other) != os.path.realpath(mine) and not _python_environment(place):
                ours.append(tool)
                theirs = theirs or place
                break
    if not ours:
        return []
    return [Problem(ENVIRONMENT, None, None, "PATH",
                    f"tasks find {', '.join(ours)} in {directory}, put first on their PATH (execution.path: "
                    f"interpreter), before those in {theirs}: a program built against that MPI needs its own "
                    "launcher; set execution.path: inherit, or call it by its full path",
                    severity=Severity.WARNING)]


def _python_environment(bin_dir: str) -> bool:
    """Whether ``bin_dir`` is another virtual environment's: its MPI tools are a wheel's, as ours are."""
    return os.path.exists(os.path.join(os.path.dirname(os.path.abspath(bin_dir)), "pyvenv.cfg"))


def locate(path: str, findings: list[Finding]) -> list[Problem]:
    """Errors at the places of ``findings`` in the spec file ``path``, each naming the task entry it is in;
    the file is parsed again for it, only when there are findings."""
    if not findings:
        return []
    doc = parse_yaml(read_bytes(path), path)
    problems = [Problem(path, *doc.locate(f.path, key=f.key), json_path(f.path), f.message,
                        severity=Severity.WARNING if f.warning else Severity.ERROR) for f in findings]
    return name_tasks(problems, doc.data)
