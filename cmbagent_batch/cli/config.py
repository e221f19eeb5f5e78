"""``cmbagent-batch config``: the effective configuration and where each value came from."""

from __future__ import annotations

import json
import os

from cmbagent_batch.cli.options import ConfigOptions
from cmbagent_batch.errors import ExitCode


def config(opts: ConfigOptions) -> int:
    from cmbagent_batch.spec import load_spec
    from cmbagent_batch.spec.config import effective_config

    table = effective_config(load_spec(opts.spec), os.environ, opts.flags).to_dict()
    if opts.format == "json":
        print(json.dumps(table, indent=2))
        return ExitCode.OK
    width = max(len(k) for k in table)
    for key, entry in table.items():
        value = entry["value"]
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}}  {shown:<24}  {entry['source']}")
    return ExitCode.OK
