"""What each command was asked to do: one frozen dataclass per command, made from the parsed command line.

The commands take these, never an ``argparse.Namespace``. This module imports nothing heavy, so the
parser can build options before it knows which command runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: importing the spec package at start-up would slow every command
    from cmbagent_batch.spec.config import Flags

TextOrJson = Literal["text", "json"]
TableFormat = Literal["table", "json", "csv"]


@dataclass(frozen=True, slots=True)
class ValidateOptions:
    specs: tuple[str, ...]
    format: TextOrJson


@dataclass(frozen=True, slots=True)
class ConfigOptions:
    spec: str
    format: TextOrJson
    flags: Flags


@dataclass(frozen=True, slots=True)
class PlanOptions:
    spec: str
    format: Literal["text", "json", "dot", "mermaid"]
    refresh_analysis: bool
    estimate: bool
    cache_dir: str | None  # as given by --cache-dir (relative to the current directory)
    flags: Flags


@dataclass(frozen=True, slots=True)
class RunOptions:
    spec: str
    fresh: bool
    only: tuple[str, ...] | None  # task ids or globs
    prune_superseded: bool  # remove RUN_DIR/superseded/ first, whatever job.keep_superseded says
    dry_run: bool
    quiet: bool
    walltime_grace: float
    walltime_file: str | None
    cache_dir: str | None  # as given by --cache-dir (relative to the current directory)
    flags: Flags


@dataclass(frozen=True, slots=True)
class StatusOptions:
    run_dir: str
    format: TextOrJson
    explain: bool
    all: bool = False  # list every task, however many


@dataclass(frozen=True, slots=True)
class ExportOptions:
    run_dir: str  # a run directory, or a job spec whose run directory to export
    format: Literal["ro-crate"]
    output: str | None  # the crate's directory; None: RUN_DIR/ro-crate
    copy: bool  # copy the outputs and inputs into the crate (default: referenced where they are)
    license: str | None
    cache_dir: str | None


@dataclass(frozen=True, slots=True)
class SlurmRequest:
    """The allocation flags of ``submit`` (None: not given, the spec's slurm: section decides)."""

    nodes: int | None
    ntasks_per_node: int | None
    cpus_per_task: int | None
    time: str | None
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    mem: str | None
    dependency: str | None
    requeue: int | None
    signal_grace: int | None
    sbatch_args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    spec: str
    dry_run: bool
    slurm: SlurmRequest
    run_dir: str | None
    cache_dir: str | None


@dataclass(frozen=True, slots=True)
class CancelOptions:
    run_dir: str


@dataclass(frozen=True, slots=True)
class ReportOptions:
    run_dir: str  # a run directory, or a job spec (its run directory)
    output: str | None  # -o FILE (default RUN_DIR/report.html)


@dataclass(frozen=True, slots=True)
class AfterStepOptions:
    run_dir: str
    exit_code: int
    requeue_max: int
    job_id: str


@dataclass(frozen=True, slots=True)
class SchemaOptions:
    name: Literal["job", "plan", "run", "ledger-entry"]


@dataclass(frozen=True, slots=True)
class LedgerSummarizeOptions:
    ledgers: tuple[str, ...]
    by: Literal["model", "task", "agent", "rank", "attempt", "day"]
    format: TableFormat


@dataclass(frozen=True, slots=True)
class LedgerVerifyOptions:
    ledger: str
    run_json: str | None
    head: str | None
    entries: int | None


@dataclass(frozen=True, slots=True)
class LedgerExportOptions:
    ledger: str
    format: Literal["csv", "json"]
    output: str | None


@dataclass(frozen=True, slots=True)
class LedgerRepriceOptions:
    ledger: str
    prices: str
    format: TableFormat
    output: str | None


@dataclass(frozen=True, slots=True)
class LedgerDiffOptions:
    a: str
    b: str


@dataclass(frozen=True, slots=True)
class LedgerReportOptions:
    ledgers: tuple[str, ...]
    output: str
    budget: float | None


LedgerOptions = (LedgerSummarizeOptions | LedgerVerifyOptions | LedgerExportOptions | LedgerRepriceOptions
                 | LedgerDiffOptions | LedgerReportOptions)
Options = (ValidateOptions | ConfigOptions | PlanOptions | RunOptions | StatusOptions | ExportOptions | SubmitOptions
           | CancelOptions | AfterStepOptions | SchemaOptions | LedgerOptions | ReportOptions)
