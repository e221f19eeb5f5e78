"""The effective configuration: schema defaults < the spec file < CMBAGENT_* variables < flags.

Every setting remembers where its value came from, so ``cmbagent-batch config`` can say it.
A malformed environment value is an error naming the variable, never ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cmbagent_batch.errors import SpecError, UsageError
from cmbagent_batch.spec.checks import check_python_timeouts
from cmbagent_batch.spec.model import AnalysisSpec, ExecutionSpec, Isolation, JobSpec, TaskPath
from cmbagent_batch.spec.numbers import env_seconds, env_whole

Parse = Callable[[str], Any]
FlagValue = str | int | float | bool | None
Flags = Mapping[str, tuple[FlagValue, str]]
"""Settings given on the command line: {setting: (value, "--flag")}; a value None was not given."""

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")


_positive_int = env_whole(1)
_count = env_whole(0)


def _choice(*options: str) -> Parse:
    def parse(text: str) -> str:
        if text.strip() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text.strip()

    return parse


def _isolation(text: str) -> Isolation:
    return Isolation(_choice(*(i.value for i in Isolation))(text))


def _task_path(text: str) -> TaskPath:
    return TaskPath(_choice(*(p.value for p in TaskPath))(text))


def _process_pool(text: str) -> Isolation:
    """CMBAGENT_USE_PROCESS_POOL, the older spelling of CMBAGENT_ISOLATION: yes is process, no is thread."""
    return Isolation.from_process_pool(_bool(text))


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text


def _path(text: str) -> str:
    """A directory named in the environment: relative to the current directory, like a flag's."""
    return os.path.abspath(_text(text))


# Variable -> (setting, parser). CMBAGENT_ENABLE_PARALLEL, CMBAGENT_AUTO_DETECT_DEPS and
# CMBAGENT_USE_LLM_DEPS are switches over execution.mode and analysis.sources (see _switches).
ENV_VARS: dict[str, tuple[str, Parse]] = {
    "CMBAGENT_BACKEND": ("execution.backend", _choice("auto", "local", "mpi")),
    "CMBAGENT_EXECUTION_MODE": ("execution.mode", _choice("auto", "sequential", "parallel")),
    "CMBAGENT_MAX_WORKERS": ("execution.max_workers", _positive_int),
    "CMBAGENT_ISOLATION": ("execution.isolation", _isolation),
    "CMBAGENT_USE_PROCESS_POOL": ("execution.isolation", _process_pool),
    "CMBAGENT_TASK_TIMEOUT": ("execution.task_timeout", env_seconds),
    "CMBAGENT_RETRIES": ("execution.retries", _count),
    "CMBAGENT_KEEP_GOING": ("execution.keep_going", _bool),
    "CMBAGENT_MAX_MEMORY_MB": ("execution.max_memory_mb", _positive_int),
    "CMBAGENT_TASKS_PER_RANK": ("execution.tasks_per_rank", _positive_int),
    "CMBAGENT_PATH": ("execution.path", _task_path),
    "CMBAGENT_RUN_DIR": ("job.run_dir", _path),
    "CMBAGENT_KEEP_SUPERSEDED": ("job.keep_superseded", _count),
    "CMBAGENT_CACHE_DIR": ("analysis.cache_dir", _path),
}
SWITCHES = ("CMBAGENT_ENABLE_PARALLEL", "CMBAGENT_AUTO_DETECT_DEPS", "CMBAGENT_USE_LLM_DEPS")
# Setting -> the older key that the spec may write it as (the loader reads that key as the setting).
OLDER_SPELLINGS = {"execution.isolation": "execution.use_process_pool"}


@dataclass(frozen=True, slots=True)
class Setting:
    value: Any
    source: str  # "default", "spec line 12", "env CMBAGENT_MAX_WORKERS", "flag --workers"


@dataclass(frozen=True, slots=True)
class Config:
    """A spec with its settings overridden, and where each setting came from."""

    spec: JobSpec
    settings: Mapping[str, Setting]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": _jsonable(s.value), "source": s.source} for k, s in sorted(self.settings.items())}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # execution.inventory
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items() if v not in (None, ())}
    return list(value) if isinstance(value, tuple) else value


def _spec_settings(spec: JobSpec) -> dict[str, Setting]:
    sections = {"job": spec.job, "execution": spec.execution, "analysis": spec.analysis}
    out: dict[str, Setting] = {}
    for section, obj in sections.items():
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            key = f"{section}.{f.name}"
            if key == "job.name":
                continue
            line = spec.declared.get(key) or spec.declared.get(OLDER_SPELLINGS.get(key, ""))
            out[key] = Setting(getattr(obj, f.name), f"spec line {line}" if line else "default")
    out["llm.default_model"] = Setting(
        spec.llm.default_model,
        f"spec line {spec.declared['llm.default_model']}" if "llm.default_model" in spec.declared else "default",
    )
    return out


def _switches(env: Mapping[str, str], settings: dict[str, Setting]) -> None:
    def read(var: str) -> bool | None:
        if var not in env:
            return None
        try:
            return _bool(env[var])
        except ValueError as exc:
            raise UsageError(f"environment variable {var}={env[var]!r}: {exc}") from None

    parallel = read("CMBAGENT_ENABLE_PARALLEL")
    if parallel is not None:
        mode = "parallel" if parallel else "sequential"
        explicit = env.get("CMBAGENT_EXECUTION_MODE")
        if explicit is not None and explicit.strip() not in (mode, "auto"):
            raise UsageError(
                f"CMBAGENT_ENABLE_PARALLEL={env['CMBAGENT_ENABLE_PARALLEL']!r} contradicts "
                f"CMBAGENT_EXECUTION_MODE={explicit!r}; unset one of them"
            )
        if explicit is None or explicit.strip() == "auto":
            settings["execution.mode"] = Setting(mode, "env CMBAGENT_ENABLE_PARALLEL")
    sources = list(settings["analysis.sources"].value)
    for var, source in (("CMBAGENT_AUTO_DETECT_DEPS", "files"), ("CMBAGENT_USE_LLM_DEPS", "llm")):
        on = read(var)
        if on is None:
            continue
        if on and source not in sources:
            sources.append(source)
        if not on and source in sources:
            sources.remove(source)
        order = ("explicit", "files", "llm")
        settings["analysis.sources"] = Setting(tuple(s for s in order if s in sources), f"env {var}")


def effective_config(spec: JobSpec, env: Mapping[str, str], flags: Flags | None = None) -> Config:
    """Apply ``env`` (CMBAGENT_* variables) and ``flags`` ({setting: (value, "--flag")}) to ``spec``."""
    settings = _spec_settings(spec)
    from_env: dict[str, str] = {}  # setting -> the variable that set it
    for var, (key, parse) in ENV_VARS.items():
        if var in env:
            try:
                value = parse(env[var])
            except ValueError as exc:
                raise UsageError(f"environment variable {var}={env[var]!r}: {exc}") from None
            if key in from_env and value != settings[key].value:
                other = from_env[key]
                raise UsageError(f"{var}={env[var]!r} contradicts {other}={env[other]!r}; unset one of them")
            settings[key], from_env[key] = Setting(value, f"env {var}"), var
    _switches(env, settings)
    for key, (value, flag) in (flags or {}).items():
        if value is not None:
            settings[key] = Setting(value, f"flag {flag}")
    if "llm" in settings["analysis.sources"].value and not (
        settings["analysis.model"].value or settings["llm.default_model"].value
    ):
        raise UsageError(
            f"LLM dependency analysis is on ({settings['analysis.sources'].source}) but the spec names no "
            "model: set analysis.model or llm.default_model"
        )
    effective = _apply(spec, settings)
    if problems := check_python_timeouts(effective, {k: s.source for k, s in settings.items()}):
        raise SpecError(problems)
    return Config(spec=effective, settings=settings)


def _apply(spec: JobSpec, settings: Mapping[str, Setting]) -> JobSpec:
    def values(prefix: str) -> dict[str, Any]:
        return {k.split(".", 1)[1]: s.value for k, s in settings.items() if k.startswith(prefix + ".")}

    analysis = values("analysis")
    if analysis.get("model") is None:
        analysis["model"] = settings["llm.default_model"].value
    return dataclasses.replace(
        spec,
        job=dataclasses.replace(spec.job, **values("job")),
        execution=ExecutionSpec(**values("execution")),
        analysis=AnalysisSpec(**analysis),
    )
