"""``cmbagent-batch export``: a finished run's provenance as a Workflow Run RO-Crate (``provenance/``)."""

from __future__ import annotations

import os

from cmbagent_batch.cli.console import warn
from cmbagent_batch.cli.options import ExportOptions
from cmbagent_batch.cli.rundirs import run_dir_with_run
from cmbagent_batch.errors import ExitCode, UsageError
from cmbagent_batch.rundir.atomic import writable_dir

CRATE_DIR = "ro-crate"  # the crate's directory in the run directory, without -o


def export(opts: ExportOptions) -> int:
    from cmbagent_batch.provenance.crate import write_crate
    from cmbagent_batch.provenance.sources import read_source

    run_dir = os.path.abspath(run_dir_with_run(opts.run_dir, "export"))
    crate_dir = os.path.abspath(opts.output) if opts.output else os.path.join(run_dir, CRATE_DIR)
    flag = f"-o {opts.output}" if opts.output else crate_dir
    if os.path.exists(crate_dir) and not os.path.isdir(crate_dir):
        raise UsageError(f"cannot write the crate to {flag}: it is a file")
    if os.path.isdir(crate_dir) and os.listdir(crate_dir):
        raise UsageError(f"cannot write the crate to {flag}: the directory is not empty (a crate is written into "
                         "a new or empty directory; remove it or give another -o)")
    source = read_source(run_dir, opts.cache_dir, warn)
    made = write_crate(source, writable_dir(crate_dir, "crate directory"), opts.copy, opts.license, warn)
    kept = "copied into the crate" if opts.copy else "referenced where they are (--copy copies them)"
    print(f"Wrote a Workflow Run RO-Crate of run {source.manifest['run_id']} ({made.tasks:,} tasks, {made.files:,} "
          f"files of {made.hashed_bytes:,} bytes hashed, {kept}): {made.path} ({made.bytes:,} bytes)")
    return ExitCode.OK
