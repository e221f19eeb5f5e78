"""``cmbagent-batch validate``: check job specs and report every problem (exit 0 all valid, 2 not).

The specs are checked with the CMBAGENT_* variables applied, and pass the preflight (``plan/preflight.py``),
as ``run``, ``plan`` and ``submit`` check them. Warnings are printed and do not change the exit code."""

from __future__ import annotations

import json
import os
import sys

from cmbagent_batch.cli.options import ValidateOptions
from cmbagent_batch.errors import ExitCode, Problem, Severity, SpecError


def validate(opts: ValidateOptions) -> int:
    from cmbagent_batch.execute.placing import inventory_of, misfits
    from cmbagent_batch.plan.cached import cache_dir
    from cmbagent_batch.plan.preflight import preflight
    from cmbagent_batch.spec import load_spec
    from cmbagent_batch.spec.config import effective_config

    found: list[Problem] = []
    said: set[Problem] = set()
    summaries = []
    for path in opts.specs:
        try:  # with the CMBAGENT_* variables applied, as ``run`` would: some checks need the final settings
            spec = effective_config(load_spec(path), os.environ).spec
            if spec.execution.inventory is not None:  # a discovered one is the run's business, where it runs
                misfits(spec, inventory_of(spec, os.environ))
            checked = preflight(spec, os.environ, cache_dir(path, None))
        except SpecError as exc:
            found.extend(exc.problems)
            continue
        found.extend(p for p in checked if p not in said)  # a variable's warning is said once, not per file
        said.update(checked)
        if any(p.severity is Severity.ERROR for p in checked):
            continue
        summaries.append(f"{path}: valid ({len(spec.tasks)} task{'s' if len(spec.tasks) != 1 else ''})")
    problems = [p for p in found if p.severity is Severity.ERROR]
    if opts.format == "json":
        print(json.dumps([p.to_dict() for p in found], indent=2))
    else:
        for line in summaries:
            print(line)
        for p in found:
            print(p, file=sys.stderr)
        if problems:
            bad = len({p.file for p in problems})
            print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {bad} file{'s' if bad != 1 else ''}",
                  file=sys.stderr)
    return ExitCode.USAGE if problems else ExitCode.OK
