"""The validated job spec as frozen objects: nothing after ``load_spec`` sees raw dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from cmbagent_batch.errors import Problem
from cmbagent_batch.spec.pricing import Price

EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return EMPTY


def freeze(value: Any) -> Any:
    """Deep-freeze JSON-like data: dicts become read-only mappings, lists become tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def thaw(value: Any) -> Any:
    """Inverse of ``freeze``: plain dicts and lists, e.g. to pass as call arguments or dump as JSON."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (MappingProxyType, dict)):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One entry of ``llm.models``: how to reach a model and what it costs."""

    name: str  # the key in llm.models, used by tasks and analysis
    model: str  # the model name sent to the endpoint
    base_url: str | None = None  # None: the OpenAI default endpoint
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout: float = 120.0
    max_retries: int = 3
    price: Price | None = None  # set by the loader: the spec's price, else the shipped table's
    price_table: str = "spec"  # where ``price`` comes from: "spec" or the shipped table's id
    provider: str = "openai"  # openai: an OpenAI-compatible endpoint | local: a llama.cpp server we start
    # provider local only
    model_path: str | None = None  # a GGUF file, relative to the spec file's directory; None: the shipped one
    threads: int | None = None  # None: min(2, CPUs)
    n_ctx: int = 4096  # context window, in tokens
    startup_timeout: float = 60.0  # seconds for the server to load the model and answer
    line: int = 0  # where a problem with running the model is reported: its model_path, else its provider
    column: int = 0


@dataclass(frozen=True, slots=True)
class JobInfo:
    name: str
    run_dir: str  # relative paths are relative to the spec file's directory
    budget_usd: float | None = None
    keep_superseded: int = 3  # earlier output sets kept per task in RUN_DIR/superseded/, newest first


class Isolation(str, Enum):
    """Where a python task (``kind: python``) runs: ``execution.isolation``."""

    PROCESS = "process"
    """In a worker process, its work directory as cwd: a crash, a segfault or an ``os.chdir`` cannot touch
    other tasks or the runner, and a timeout is enforced."""
    THREAD = "thread"
    """In a thread of the runner (or of an MPI worker rank): cheapest for tiny pure-Python tasks, but it
    shares the cwd and ``os.environ``, and it cannot be stopped, so a timeout cannot be enforced."""

    @classmethod
    def from_process_pool(cls, use_process_pool: bool) -> Isolation:
        """The older spelling ``use_process_pool``: true is ``process``, false is ``thread``."""
        return cls.PROCESS if use_process_pool else cls.THREAD


class TaskPath(str, Enum):
    """The ``PATH`` tasks start with: ``execution.path``."""

    INTERPRETER = "interpreter"
    """The directory of the python running cmbagent-batch (a virtual environment's ``bin``, not resolved
    through symlinks) first, then the runner's ``PATH``: a task's ``python`` is the runner's, on a laptop
    as under ``submit``."""
    INHERIT = "inherit"
    """The runner's ``PATH`` as it was given."""


@dataclass(frozen=True, slots=True)
class InventorySpec:
    """``execution.inventory``: one node, declared."""

    cpus: int
    gpus: tuple[str, ...] = ()
    memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionSpec:
    backend: str = "auto"  # auto | local | mpi
    mode: str = "auto"  # auto | sequential | parallel
    max_workers: int | None = None  # None: chosen from CPUs and memory
    isolation: Isolation = Isolation.PROCESS  # where python tasks run
    task_timeout: float | None = None  # seconds; None: no limit
    retries: int = 0
    keep_going: bool = False
    max_memory_mb: int | None = None  # per worker
    memory_safety_fraction: float = 0.8
    tasks_per_rank: int = 1
    retry_backoff: float = 1.0
    kill_grace: float = 5.0
    keep: tuple[str, ...] = ("data", "codebase", "logs", "outputs", "chats", "cost")  # removed after success: the rest
    rerun_on: tuple[str, ...] = ("spec", "inputs", "code")  # what, when changed, reruns a finished task
    path: TaskPath = TaskPath.INTERPRETER  # the PATH tasks start with
    inventory: InventorySpec | None = None  # None: discovered (Slurm's allocation, else this machine)
    backfill_s: float = 60.0  # how long a task that does not fit may be passed by smaller ones


@dataclass(frozen=True, slots=True)
class AnalysisSpec:
    sources: tuple[str, ...] = ("explicit", "files")  # subset of explicit, files, llm
    model: str | None = None  # a key of llm.models; None: llm.default_model
    fallback: str = "error"  # error | explicit | sequential
    cache_dir: str | None = None  # None: .cmbagent-batch/cache beside the spec file


@dataclass(frozen=True, slots=True)
class LlmSpec:
    default_model: str | None = None
    models: Mapping[str, ModelSpec] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class SlurmSpec:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    mem: str | None = None
    constraint: str | None = None
    signal_grace: int = 120
    requeue: int = 0
    mpi: str = "pmi2"
    extra_directives: tuple[str, ...] = ()
    # given on the command line of `submit` only
    dependency: str | None = None
    sbatch_args: tuple[str, ...] = ()


class Unplaceable(str, Enum):
    """What a run does with a task whose resources can never fit where it runs."""

    REFUSE = "refuse"
    """Refuse the run before anything starts (exit 2)."""
    SKIP = "skip"
    """Skip the task, and the tasks that depend on it, saying why."""


@dataclass(frozen=True, slots=True)
class Resources:
    """A task's shape: ``ranks`` processes spread evenly over ``nodes`` nodes, each rank with its CPUs and
    GPUs, and the memory it needs on each node (``resources.cpus: N`` in a spec is ``cpus_per_rank: N``)."""

    nodes: int = 1
    ranks: int = 1
    cpus_per_rank: int = 1
    gpus_per_rank: int = 0
    memory_mb: int | None = None  # per node

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes

    @property
    def cpus_per_node(self) -> int:
        return self.ranks_per_node * self.cpus_per_rank

    @property
    def gpus_per_node(self) -> int:
        return self.ranks_per_node * self.gpus_per_rank

    @property
    def cpus(self) -> int:
        """Every core it books, on all its nodes."""
        return self.ranks * self.cpus_per_rank

    @property
    def gpus(self) -> int:
        return self.ranks * self.gpus_per_rank

    @property
    def single(self) -> bool:
        """One core of one node, no GPU: the default shape."""
        return self.nodes == 1 and self.ranks == 1 and self.cpus_per_rank == 1 and not self.gpus_per_rank


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task, after matrix expansion."""

    id: str
    kind: str  # shell | python | agent
    description: str = ""
    depends_on: tuple[str, ...] = ()  # explicit dependencies (globs already expanded)
    inputs: tuple[str, ...] = ()  # paths or globs, relative to the task's work directory (late_inputs included)
    late_inputs: tuple[str, ...] = ()  # inputs that may appear only at run time: the preflight skips them
    outputs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=_empty)
    timeout: float | None = None
    retries: int | None = None  # None: execution.retries
    resources: Resources = field(default_factory=Resources)
    budget_usd: float | None = None
    models: tuple[str, ...] = ()  # keys of llm.models its own code calls, through the rank's gateway
    estimate: float | None = None  # expected seconds, weights the critical path
    when_unplaceable: Unplaceable = Unplaceable.REFUSE
    # shell
    run: str | None = None
    # python
    call: str | None = None  # "module:function"
    args: Any = None  # frozen JSON-like value
    # agent
    agent: str | None = None
    instructions: str | None = None
    model: str | None = None  # a key of llm.models
    max_turns: int = 10
    code_execution: bool = False
    # where the task came from
    matrix: Mapping[str, Any] = field(default_factory=_empty)  # this instance's matrix values
    entry: int = 0  # position of the entry in $.tasks that made this task
    line: int = 0  # line of that entry in the spec file

    @property
    def origin(self) -> str:
        """Where the task came from, for messages: ``$.tasks[3]`` plus its matrix values."""
        where = f"$.tasks[{self.entry}]"
        if not self.matrix:
            return where
        return where + " (" + ", ".join(f"{k}={_text(v)}" for k, v in self.matrix.items()) + ")"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated job spec."""

    path: str  # the spec file as given
    sha256: str  # of the file's bytes
    version: int
    job: JobInfo
    execution: ExecutionSpec
    llm: LlmSpec
    analysis: AnalysisSpec
    slurm: SlurmSpec
    tasks: Sequence[TaskSpec]  # loaded: a ``spec.tasks.Tasks``, which makes each task when asked for
    declared: Mapping[str, int] = field(default_factory=_empty)  # "execution.max_workers" -> line, for keys written in the file
    # "$.tasks[3].timeout" -> (line, column): the places a check of the effective configuration (after the
    # CMBAGENT_* variables and flags) may point at: every python entry, its timeout, execution.task_timeout
    places: Mapping[str, tuple[int, int]] = field(default_factory=_empty)
    warnings: tuple[Problem, ...] = ()  # found as it was loaded; the preflight says them
    # position of each task by id, made on first use when ``tasks`` cannot say it (a lookup must not scan)
    _positions: dict[str, int] = field(default_factory=dict, init=False, compare=False, repr=False)

    def task(self, task_id: str) -> TaskSpec:
        return self.tasks[self.position(task_id)]

    def position(self, task_id: str) -> int:
        """Where the task ``task_id`` is in ``tasks``; KeyError if there is none."""
        position = getattr(self.tasks, "position", None)
        if position is not None:
            return int(position(task_id))
        if not self._positions and self.tasks:
            self._positions.update((t.id, i) for i, t in enumerate(self.tasks))
        return self._positions[task_id]
