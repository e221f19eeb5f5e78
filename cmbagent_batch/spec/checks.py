"""The semantic pass: what a schema cannot say about a job spec.

Works on raw (possibly partly invalid) data after matrix expansion, so that one run reports every
problem (the checks across all tasks: ``taskchecks.py``). Each check returns ``Finding``s whose path
points into the file as written; the loader locates them. ``check_python_timeouts`` alone works on the effective configuration (the spec with the
CMBAGENT_* variables and flags applied), at the places the loader kept.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cmbagent_batch.errors import Problem
from cmbagent_batch.spec.model import Isolation, JobSpec, TaskSpec
from cmbagent_batch.spec.pricing import builtin_table, closest, lookup
from cmbagent_batch.spec.tasks import Entry, by_entry

TASK_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
GLOB_CHARS = re.compile(r"[*?\[]")
KIND_REQUIRES = {"shell": "run", "python": "call", "agent": "instructions"}
KIND_FIELDS = {
    "shell": ("run",),
    "python": ("call", "args"),
    "agent": ("agent", "instructions", "model", "max_turns", "code_execution"),
}
LOCAL_KEYS = ("model_path", "threads", "n_ctx", "startup_timeout")  # llm.models keys of provider 'local' only
SLURM_TIME = re.compile(
    r"(?:(?P<d>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d{1,2})(?::(?P<c>\d{1,2}))?)?)"
)

Node = TypeVar("Node", int, str)  # a task, by index or by id


@dataclass(frozen=True, slots=True)
class Finding:
    path: tuple[Any, ...]
    message: str
    key: bool = False  # locate at the key rather than the value
    warning: bool = False  # the spec is still valid: the problem is said, and the command goes on


def parse_slurm_time(value: str | int) -> int | None:
    """Seconds of a Slurm time limit, or None if malformed. ``UNLIMITED`` is 0; an int is minutes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 60 if value >= 0 else None  # 0: no limit, as in Slurm
    if not isinstance(value, str):
        return None
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    m = SLURM_TIME.fullmatch(value.strip())
    if not m:
        return None
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:  # days-hours[:minutes[:seconds]]
        if g["dh"] > 23 or g.get("dm", 0) > 59 or g.get("ds", 0) > 59:
            return None
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "c" in g:  # hours:minutes:seconds
        if g["b"] > 59 or g["c"] > 59:
            return None
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    if "b" in g:  # minutes:seconds
        return None if g["b"] > 59 else g["a"] * 60 + g["b"]
    return g["a"] * 60  # minutes; 0 means no limit


def path_problem(path: str, note: str = "") -> str | None:
    """Why a declared input/output path may not be used, or None (``note`` follows the path)."""
    if path.startswith(("/", "~")):
        return f"absolute path {path!r}{note} escapes the task's work directory; use a relative path"
    if ".." in path.replace("\\", "/").split("/"):
        return f"path {path!r}{note} uses '..' and escapes the task's work directory"
    return None


def hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One dependency cycle as [a, b, ..., a] where each id depends on the next, or None.

    Kahn's algorithm removes everything not on or behind a cycle; the walk from the smallest
    remaining id along its smallest remaining dependency then must loop. Iterative, deterministic.
    """
    waiting = {tid: len(ds) for tid, ds in deps.items()}
    dependents: dict[str, list[str]] = {}
    for tid, ds in deps.items():
        for d in ds:
            dependents.setdefault(d, []).append(tid)
    ready = [tid for tid, n in waiting.items() if n == 0]
    while ready:
        for child in dependents.get(ready.pop(), ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    left = {tid for tid, n in waiting.items() if n > 0}
    if not left:
        return None
    return closed_loop(walk_to_loop(min(left), lambda node: min(d for d in deps[node] if d in left)))


def walk_to_loop(start: Node, step: Callable[[Node], Node]) -> list[Node]:
    """The loop that walking ``step`` from ``start`` runs into, in walk order (each node once).

    On finitely many nodes, each with a next one, every walk ends in a loop.
    """
    seen: dict[Node, int] = {}
    walk: list[Node] = []
    node = start
    while node not in seen:
        seen[node] = len(walk)
        walk.append(node)
        node = step(node)
    return walk[seen[node]:]


def closed_loop(loop: list[Node]) -> list[Node]:
    """``loop`` rotated to start at its smallest node, that node repeated at the end: deterministic."""
    first = loop.index(min(loop))
    return loop[first:] + loop[:first + 1]


def check_models(data: dict[str, Any], entries: Sequence[Entry]) -> list[Finding]:
    """Every model used is defined and priced (in the spec or the shipped table; a local model in the spec),
    has only its provider's keys; agent tasks and LLM analysis have a model."""
    out: list[Finding] = []
    llm = _mapping(data, "llm")
    models = _mapping(llm, "models")
    for name, entry in models.items():
        if not isinstance(entry, dict):
            continue
        out.extend(_check_provider(name, entry))
        if "price" in entry:
            continue
        if entry.get("provider") == "local":
            out.append(Finding(("llm", "models", name),
                               f"model {name!r} runs here (provider: local) and needs a price: write price: "
                               "{prompt_per_1m: 0, completion_per_1m: 0} (costs are never assumed to be $0)",
                               key=True))
        elif isinstance(entry.get("model"), str) and lookup(builtin_table(), entry["model"]) is None:
            out.append(_unpriced(name, entry["model"]))
    default = llm.get("default_model")
    if isinstance(default, str) and default not in models:
        out.append(Finding(("llm", "default_model"), f"model {default!r} is not defined in llm.models{hint(default, models)}"))
    analysis = _mapping(data, "analysis")
    amodel = analysis.get("model")
    if isinstance(amodel, str) and amodel not in models:
        out.append(Finding(("analysis", "model"), f"model {amodel!r} is not defined in llm.models{hint(amodel, models)}"))
    sources = analysis.get("sources")
    if isinstance(sources, list) and "llm" in sources and amodel is None and not isinstance(default, str):
        out.append(Finding(("analysis", "sources"), "'llm' analysis needs a model: set analysis.model or llm.default_model"))
    reported: set[tuple[int, str]] = set()  # one finding per entry, not per matrix expansion
    for e in entries:
        out.extend(_check_declared(e, models, reported))
        if e.body.get("kind") != "agent":
            continue
        for k in range(len(e) if "model" in e.fills else 1):
            out.extend(_check_agent(e, k, models, default, reported))
    return out


def _check_declared(e: Entry, models: dict[str, Any], reported: set[tuple[int, str]]) -> list[Finding]:
    """A task's ``models``: each defined in llm.models; not on an agent task, whose ``model`` says it."""
    if "models" not in e.body:
        return []
    if e.body.get("kind") == "agent":
        return [Finding(("tasks", e.index, "models"), "an agent task calls its model: give it model, not models")]
    out = []
    for k in range(len(e) if "models" in e.fills else 1):
        declared = e.field("models", k)
        for n, name in enumerate(declared if isinstance(declared, list) else ()):
            if isinstance(name, str) and name not in models and (e.index, name) not in reported:
                reported.add((e.index, name))
                out.append(Finding(("tasks", e.index, "models", n),
                                   f"model {name!r} is not defined in llm.models{hint(name, models)}"))
    return out


def _check_agent(e: Entry, k: int, models: dict[str, Any], default: Any, reported: set[tuple[int, str]]) -> list[Finding]:
    out: list[Finding] = []
    model = e.field("model", k)
    if (e.index, str(model)) in reported:
        return out
    reported.add((e.index, str(model)))
    if model is None and not isinstance(default, str):
        out.append(Finding(("tasks", e.index), "an agent task needs a model: set model here or llm.default_model"))
    elif isinstance(model, str) and model not in models:
        out.append(Finding(("tasks", e.index, "model"), f"model {model!r} is not defined in llm.models{hint(model, models)}"))
    outputs = e.field("outputs", k)
    if not e.field("code_execution", k) and isinstance(outputs, list) and (
            len(outputs) > 1 or any(isinstance(o, str) and any(c in o for c in "*?[") for o in outputs)):
        out.append(Finding(("tasks", e.index, "outputs"),
                               "an agent task without code_execution writes one file, its final answer: declare "
                               "one output, or set code_execution: true so that its code can write more"))
    return out


def _unpriced(name: str, model: str) -> Finding:
    """A model that neither the spec nor the shipped table prices: a misspelling of a priced model is
    pointed at its ``model`` with the name meant; any other name needs a price."""
    table = builtin_table()
    where = f"model {name!r} ({model}) is not in the shipped price table {table.id}"
    price = "price: {prompt_per_1m: ..., completion_per_1m: ...}"
    meant = closest(table, model)
    if meant is not None:
        return Finding(("llm", "models", name, "model"),
                       f"{where} (did you mean {meant!r}?); a model it lacks needs {price}")
    return Finding(("llm", "models", name),
                   f"{where}: add {price} (write 0 for a free model; costs are never assumed to be $0)", key=True)


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` when it is a mapping, else an empty one (the schema reports the wrong type)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _check_provider(name: str, entry: dict[str, Any]) -> list[Finding]:
    """Keys of one provider given to a model of the other."""
    provider = entry.get("provider", "openai")
    if provider == "local":
        why = {"base_url": "a local model is served on 127.0.0.1 by cmbagent-batch itself",
               "api_key_env": "a local model needs no API key"}
    elif provider == "openai":
        why = dict.fromkeys(LOCAL_KEYS, "this model is reached at an endpoint (provider 'openai'); set "
                                         "provider: local to run it here")
    else:
        return []
    other = "openai" if provider == "local" else "local"
    return [Finding(("llm", "models", name, key), f"{key!r} is for provider {other!r}: {reason}", key=True)
            for key, reason in why.items() if key in entry]


def check_slurm(data: dict[str, Any]) -> list[Finding]:
    slurm = data.get("slurm")
    if not isinstance(slurm, dict) or "time" not in slurm:
        return []
    value = slurm["time"]
    if isinstance(value, (str, int)) and not isinstance(value, bool) and parse_slurm_time(value) is None:
        return [
            Finding(
                ("slurm", "time"),
                f"malformed Slurm time {value!r}: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
            )
        ]
    return []


def check_execution(data: dict[str, Any]) -> list[Finding]:
    """``use_process_pool``, the older spelling of ``isolation``, may be given with it only if they agree."""
    execution = _mapping(data, "execution")
    isolation, pool = execution.get("isolation"), execution.get("use_process_pool")
    if not isinstance(pool, bool) or isolation not in tuple(Isolation):
        return []
    if Isolation.from_process_pool(pool) is Isolation(isolation):
        return []
    return [Finding(("execution", "use_process_pool"),
                    f"execution.use_process_pool: {_yaml(pool)} contradicts execution.isolation: {isolation}; "
                    "keep only isolation")]


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return format(value, "g") if isinstance(value, float) else str(value)


def check_python_timeouts(spec: JobSpec, sources: Mapping[str, str]) -> list[Problem]:
    """A python task with a timeout (its own or ``execution.task_timeout``) may not run in a thread, which
    cannot be stopped. ``spec`` is the effective one; ``sources`` says where each setting came from
    (``spec line 7``, ``env CMBAGENT_ISOLATION``, ``flag --task-timeout``). One problem per entry with a
    timeout of its own, and one for ``execution.task_timeout``."""
    ex = spec.execution
    if ex.isolation is not Isolation.THREAD:
        return []
    own: dict[int, _Named] = {}
    default = _Named()
    calling: dict[int, _Named] = {}
    for t, ids in by_entry(spec.tasks):
        if t.kind == "python" and t.models:
            calling.setdefault(t.entry, _Named()).add(t, ids)
        if t.kind == "python" and t.timeout is not None:
            own.setdefault(t.entry, _Named()).add(t, ids)
        elif t.kind == "python" and ex.task_timeout is not None:
            default.add(t, ids)
    thread, process = _thread_setting(spec, sources["execution.isolation"])

    def refuse(path: str, what: str, tasks: _Named, remove: str) -> Problem:
        return _problem(spec, path, f"{what} cannot be enforced on {tasks}: python tasks run in threads "
                                    f"({thread}) and a thread cannot be stopped. Fix: {process}, or {remove}")

    out = [refuse(f"$.tasks[{entry}].timeout", f"timeout: {_yaml(tasks.timeout)}", tasks, "remove the timeout")
           for entry, tasks in own.items()]
    out += [_problem(spec, f"$.tasks[{entry}].models", f"models cannot be given to {tasks}: python tasks run in "
                     f"threads ({thread}), which share the runner's environment, so a call cannot get a gateway "
                     f"token of its own. Fix: {process}, or call the model from a shell task")
            for entry, tasks in calling.items()]
    if default.count:
        what, source = f"execution.task_timeout: {_yaml(ex.task_timeout)}", sources["execution.task_timeout"]
        kind, name = source.split(" ", 1)
        if kind == "spec":
            out.append(refuse("$.execution.task_timeout", what, default, "remove execution.task_timeout"))
        else:  # from a variable or a flag: pointed at the first python task it would apply to
            remove = f"unset {name}" if kind == "env" else f"drop {name}"
            out.append(refuse(f"$.tasks[{default.entry}]", f"{what} ({source})", default, remove))
    return out


def _thread_setting(spec: JobSpec, source: str) -> tuple[str, str]:
    """How ``isolation: thread`` was given, with its source, and how to ask for ``process`` there instead."""
    kind, name = source.split(" ", 1)
    if kind == "spec":
        given = "isolation: thread" if "execution.isolation" in spec.declared else "use_process_pool: false"
        return f"execution.{given}, {source}", "use execution.isolation: process (the default)"
    if kind == "env":
        value = "yes" if name == "CMBAGENT_USE_PROCESS_POOL" else "process"
        return f"execution.isolation: thread, {source}", f"set {name}={value}"
    return f"execution.isolation: thread, {source}", f"drop {name}"


@dataclass(slots=True)
class _Named:
    """Python tasks a setting cannot be enforced on: the first, by file order, and how many."""

    first: str = ""
    entry: int = 0
    timeout: float | None = None
    count: int = 0

    def add(self, t: TaskSpec, ids: Sequence[str]) -> None:
        if not self.count:
            self.first, self.entry, self.timeout = ids[0], t.entry, t.timeout
        self.count += len(ids)

    def __str__(self) -> str:
        more = f" (and {self.count - 1:,} more)" if self.count > 1 else ""
        return f"python task {self.first!r}{more}"


def _problem(spec: JobSpec, path: str, message: str) -> Problem:
    line, column = spec.places.get(path, (None, None))
    return Problem(spec.path, line, column, path, message)
