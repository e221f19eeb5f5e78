"""``cmbagent-batch validate``: check job specs and report every problem (exit 0 all valid, 2 not).

The specs are checked with the CMBAGENT_* variables applied, as ``run``, ``plan`` and ``submit`` check them."""

from __future__ import annotations

import json
import os
import sys

from cmbagent_batch.cli.options import ValidateOptions
from cmbagent_batch.errors import ExitCode, Problem, SpecError


def validate(opts: ValidateOptions) -> int:
    from cmbagent_batch.spec import load_spec
    from cmbagent_batch.spec.config import effective_config

    problems: list[Problem] = []
    summaries = []
    for path in opts.specs:
        try:  # with the CMBAGENT_* variables applied, as ``run`` would: some checks need the final settings
            spec = effective_config(load_spec(path), os.environ).spec
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        summaries.append(f"{path}: valid ({len(spec.tasks)} task{'s' if len(spec.tasks) != 1 else ''})")
    if opts.format == "json":
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for line in summaries:
            print(line)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            bad = len({p.file for p in problems})
            print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {bad} file{'s' if bad != 1 else ''}",
                  file=sys.stderr)
    return ExitCode.USAGE if problems else ExitCode.OK
