"""The ``RUN_DIR|SPEC`` argument of the commands that read a run (``status``, ``report``, ``export``): a run
directory as given, or the run directory of a job spec, found as ``run`` finds it (``job.run_dir``,
``CMBAGENT_RUN_DIR``). Each mistake is exit 2 with one line that says what the command takes."""

from __future__ import annotations

import os

from cmbagent_batch.errors import SpecError, UsageError


def forms(command: str) -> str:
    """What ``command`` takes, for the end of its messages."""
    return (f"{command} takes RUN_DIR, a run directory (with run.json), or SPEC, a job spec (its run directory, "
            "as run finds it)")


def run_dir_of(given: str, command: str) -> tuple[str, str | None]:
    """The run directory ``given`` names, and the spec it was found from (None: a directory was given)."""
    if os.path.isdir(given):
        return given, None
    if not os.path.exists(given):
        raise UsageError(f"{given}: no such file or directory; {forms(command)}")
    from cmbagent_batch.rundir.layout import resolve_run_dir
    from cmbagent_batch.spec.config import effective_config
    from cmbagent_batch.spec.loader import load_spec

    try:
        spec = load_spec(given)
    except SpecError as exc:
        n = len(exc.problems)
        raise UsageError(f"{given} is neither a run directory nor a valid job spec ({n} problem{'s' if n != 1 else ''}: "
                         f"`cmbagent-batch validate {given}` lists {'them' if n != 1 else 'it'}); "
                         f"{forms(command)}") from None
    return resolve_run_dir(effective_config(spec, os.environ, {}).spec), given


def no_run(run_dir: str, spec: str | None, command: str) -> UsageError:
    """The mistake of naming a directory that holds no run (no run.json)."""
    if spec is not None:
        return UsageError(f"{run_dir}, the run directory of {spec}, holds no run yet (no run.json); "
                          f"`cmbagent-batch run {spec}` starts one")
    return UsageError(f"{run_dir} is not a run directory (no run.json); {forms(command)}")


def run_dir_with_run(given: str, command: str) -> str:
    """``run_dir_of``, which must hold a run (its run.json)."""
    run_dir, spec = run_dir_of(given, command)
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        raise no_run(run_dir, spec, command)
    return run_dir
