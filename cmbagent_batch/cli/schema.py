"""``cmbagent-batch schema``: print a JSON Schema shipped with cmbagent-batch (for editors)."""

from __future__ import annotations

import sys

from cmbagent_batch.cli.options import SchemaOptions
from cmbagent_batch.errors import ExitCode


def schema(opts: SchemaOptions) -> int:
    from cmbagent_batch.spec.schema import schema_text

    sys.stdout.write(schema_text(opts.name))
    return ExitCode.OK
