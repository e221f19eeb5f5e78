"""Preflight: every mistake that can be known without running a task, found before the first one starts.

``validate``, ``plan``, ``run`` (before its first task) and ``submit`` (before ``sbatch``) run the same
checks on the effective spec (CMBAGENT_* variables and flags applied):

- every input that no task writes exists beside the spec file, unless listed under ``late_inputs``;
- every ``call:`` resolves to a function, found without importing user code;
- every model the job will call has its API key variable set (``submit``: in the submitting shell);
- a local model can start here;
- every CMBAGENT_* variable set is one cmbagent-batch reads (a warning).

What the job needs of the place it runs (``Needs``) is read from the spec once, and cached with its plan:
an unchanged spec's ``plan`` checks it again, against the files and variables of the moment, without
loading the spec. Placeholders and model names are checked as the spec is loaded (``spec/matrix.py``,
``spec/checks.py``). Problems are located in the spec file, which is parsed again only when there are some.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cmbagent_batch.errors import AnalysisError, Problem, Severity, SpecError
from cmbagent_batch.llm import local_model
from cmbagent_batch.plan.analysis.cache import Cache
from cmbagent_batch.plan.analysis.files import Sources, input_sources
from cmbagent_batch.rundir.journal import replay
from cmbagent_batch.rundir.layout import journal_paths, resolve_run_dir
from cmbagent_batch.spec import gcpause
from cmbagent_batch.spec import preflight as spec_checks
from cmbagent_batch.spec.checks import Finding
from cmbagent_batch.spec.model import JobSpec, TaskPath
from cmbagent_batch.spec.preflight import CallNeed, KeyNeed
from cmbagent_batch.spec.tasks import Tasks, entries_of
from cmbagent_batch.states import DONE_STATES

Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class InputNeed:
    """The inputs of one ``inputs`` item of an entry that no task writes: they must be beside the spec."""

    entry: int  # its index in $.tasks
    index: int  # the item's index in the entry's inputs
    wanted: tuple[tuple[str, str], ...]  # (input as its task expands it, the task's id)


@dataclass(frozen=True, slots=True)
class LocalNeed:
    """A local model the job uses, and where a problem with it points."""

    model: local_model.LocalModel
    line: int
    column: int
    path: str


FORMAT = 1  # of a cached ``Needs``: a record of another format is read from the spec again


@dataclass(frozen=True, slots=True)
class Needs:
    """What a job needs of the place it runs, read from its spec: the checks against that place need only this."""

    spec_path: str  # as given to this command (a cached record is told the path of the moment)
    run_dir: str  # tasks that succeeded there need their inputs no more
    inputs: tuple[InputNeed, ...]
    calls: tuple[CallNeed, ...]
    keys: tuple[KeyNeed, ...]
    local: tuple[LocalNeed, ...]
    warnings: tuple[Problem, ...] = ()  # found as the spec was loaded
    interpreter_first: bool = True  # execution.path: interpreter (the tasks' PATH starts with python's directory)

    @classmethod
    def of(cls, spec: JobSpec, *, inputs: bool = True) -> Needs:
        with gcpause.paused():  # per-task records: the collector would rescan them all, again and again
            return cls(spec.path, resolve_run_dir(spec), external_inputs(spec) if inputs else (),
                       spec_checks.calls_needed(spec), spec_checks.keys_needed(spec), _local_models(spec),
                       spec.warnings, spec.execution.path is TaskPath.INTERPRETER)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self), "warnings": [p.to_dict() for p in self.warnings]}

    @classmethod
    def from_json(cls, data: dict[str, Any], spec_path: str) -> Needs | None:
        """A cached record, for the spec at ``spec_path`` now (None: of another format)."""
        if data.get("format") != FORMAT:
            return None
        return cls(
            spec_path,
            data["run_dir"],
            tuple(InputNeed(i["entry"], i["index"], tuple((p, t) for p, t in i["wanted"])) for i in data["inputs"]),
            tuple(CallNeed(**c) for c in data["calls"]),
            tuple(KeyNeed(**{**k, "place": tuple(k["place"]), "named": tuple(k["named"])}) for k in data["keys"]),
            tuple(LocalNeed(local_model.LocalModel(**n["model"]), n["line"], n["column"], n["path"])
                  for n in data["local"]),
            tuple(Problem(**{**w, "file": spec_path, "severity": Severity(w["severity"])}) for w in data["warnings"]),
            data["interpreter_first"],
        )


@dataclass(frozen=True, slots=True)
class Checks:
    """How one command checks a job: in the shell ``submit`` runs in (the job inherits it), or here."""

    environ: Mapping[str, str]
    say: Warn  # prints a warning, located as it is (``FILE:LINE:COL: $.path: warning: ...``)
    submitting: bool = False
    keys: bool = True  # ``plan --estimate`` prices a job before its keys are set
    inputs: bool = True  # ``run`` checks the inputs of the tasks it launches itself, once it knows them

    def problems(self, needs: Needs, analysis_call: Callable[[], bool]) -> list[Problem]:
        """Every problem, errors and warnings, in file order. ``analysis_call``: whether the LLM dependency
        analysis will call its model (asked only when its model's key matters)."""
        found = missing_inputs(needs, _succeeded(needs.run_dir) if needs.inputs else set()) if self.inputs else []
        found += spec_checks.check_calls(needs.spec_path, needs.calls)
        if self.keys and needs.keys:
            calls = analysis_call() if any(k.analysis for k in needs.keys) else False
            found += spec_checks.check_keys(needs.spec_path, needs.keys, self.environ, submitting=self.submitting,
                                            analysis_call=calls)
        found += [Problem(needs.spec_path, n.line, n.column, n.path, why) for n in needs.local
                  if (why := local_model.missing(n.model)) is not None]
        found += list(needs.warnings) + spec_checks.unknown_variables(self.environ)
        if needs.interpreter_first:
            found += spec_checks.shadowed_tools(self.environ, sys.executable)
        return sorted(found, key=lambda p: (p.file != needs.spec_path, p.line or 0, p.column or 0))

    def __call__(self, needs: Needs, analysis_call: Callable[[], bool]) -> None:
        """Warnings through ``say``; errors raised together as one ``SpecError``."""
        found = self.problems(needs, analysis_call)
        for p in found:
            if p.severity is Severity.WARNING:
                self.say(str(p))
        errors = [p for p in found if p.severity is Severity.ERROR]
        if errors:
            raise SpecError(errors)


def preflight(spec: JobSpec, environ: Mapping[str, str], cache_dir: str | None, *,
              submitting: bool = False) -> list[Problem]:
    """Every problem of ``spec`` here, errors and warnings, in file order. ``cache_dir``: where a cached LLM
    dependency analysis would be, to know whether the analysis will make a call."""
    return Checks(environ, lambda message: None, submitting).problems(Needs.of(spec), analysis_calls(spec, cache_dir))


def check(spec: JobSpec, cache_dir: str | None, checks: Checks) -> None:
    """``checks`` of ``spec``: warnings said, errors raised (``SpecError``)."""
    checks(Needs.of(spec, inputs=checks.inputs), analysis_calls(spec, cache_dir))


def check_launched_inputs(spec: JobSpec, sources: Sources | None, launched: Collection[str]) -> None:
    """``run``'s check of inputs, once it knows which tasks it launches: those no task writes must be beside
    the spec; a task up to date or not selected needs none (``SpecError`` lists what is missing).
    ``sources``: ``input_sources`` of the spec's tasks, if known."""
    needs = Needs(spec.path, "", external_inputs(spec, sources, launched), (), (), ())
    if errors := missing_inputs(needs, set()):
        raise SpecError(errors)


def analysis_calls(spec: JobSpec, cache_dir: str | None, refresh: bool = False) -> Callable[[], bool]:
    """Whether the LLM dependency analysis will call its model: it is a source and its answer is not cached
    (or ``refresh`` asks for a new one). Asked lazily: finding out means matching the analysis's cache key."""

    def calls() -> bool:
        if "llm" not in spec.analysis.sources:
            return False
        if refresh:
            return True
        from cmbagent_batch.plan.analysis.deps import analyse

        cache = _Peek(cache_dir, lambda message: None) if cache_dir and os.path.isdir(cache_dir) else None
        try:
            analyse(spec, cache, refresh=False, warn=lambda message: None, offline=True)
        except AnalysisError:
            return True
        return False

    return calls


class _Peek(Cache):
    """The cache, read and never written: finding out whether the analysis is cached leaves it as it was
    (a corrupt record is then reported by the analysis that follows, not fixed here unseen)."""

    def put(self, kind: str, key: str, payload: Any) -> str | None:
        return None


def external_inputs(spec: JobSpec, sources: Sources | None = None,
                    only: Collection[str] | None = None) -> tuple[InputNeed, ...]:
    """The inputs no task writes, which come from the spec file's directory, but ``late_inputs``; of the tasks
    ``only`` (None: all). ``sources``: ``input_sources`` of the spec's tasks, if known."""
    found: dict[tuple[int, int], list[tuple[str, str]]] = {}
    shared = {e.index: e.template for e in entries_of(spec.tasks) or () if not e.varies("inputs")}
    for tid, entries in (input_sources(spec.tasks) if sources is None else sources).items():
        if only is not None and tid not in only:
            continue
        if not any(not matches for _, matches in entries):
            continue
        task = shared.get(spec.tasks.entry_at(spec.position(tid)).index) if isinstance(spec.tasks, Tasks) else None
        task = task or spec.task(tid)
        for index, (pattern, matches) in enumerate(entries):
            if not matches and pattern not in task.late_inputs:
                found.setdefault((task.entry, index), []).append((pattern, tid))
    return tuple(InputNeed(entry, index, tuple(wanted)) for (entry, index), wanted in sorted(found.items()))


def missing_inputs(needs: Needs, succeeded: Collection[str]) -> list[Problem]:
    """An input no task writes must be beside the spec file now (a glob: match something), unless its task
    ``succeeded`` already. One problem per ``inputs`` item of an entry, naming the first of its tasks' inputs
    missing and counting the rest."""
    base = os.path.dirname(os.path.abspath(needs.spec_path))
    there: dict[str, bool] = {}
    found = []
    for need in needs.inputs:
        absent: dict[str, None] = {}
        for pattern, tid in need.wanted:
            if tid in succeeded or pattern in absent:
                continue
            if pattern not in there:
                there[pattern] = bool(glob.glob(os.path.join(base, os.path.normpath(pattern))))
            if not there[pattern]:
                absent[pattern] = None
        if not absent:
            continue
        first, more = next(iter(absent)), len(absent) - 1
        others = f" (and {more:,} more inputs of this entry's tasks)" if more else ""
        found.append(Finding(("tasks", need.entry, "inputs", need.index),
                             f"input {first!r} not found: no task writes it and {base} has no such file{others}; "
                             "create it, declare it in the outputs of the task that makes it, or list it under "
                             "late_inputs if it appears only once the job runs"))
    return spec_checks.locate(needs.spec_path, found)


def _succeeded(run_dir: str) -> set[str]:
    """The tasks whose last run in ``run_dir`` succeeded (or was up to date): their inputs were there."""
    return {tid for tid, h in replay(journal_paths(run_dir)).items() if h.state in DONE_STATES}


def _local_models(spec: JobSpec) -> tuple[LocalNeed, ...]:
    """The local models the job uses, each pointing at its ``model_path``, else its ``provider``."""
    return tuple(LocalNeed(local_model.LocalModel.from_spec(m, spec.path), m.line, m.column,
                           f"$.llm.models.{m.name}.{'model_path' if m.model_path is not None else 'provider'}")
                 for m in local_model.used(spec))
