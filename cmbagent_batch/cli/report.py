"""``cmbagent-batch report``: write a run's report page, RUN_DIR/report.html or ``-o FILE``."""

from __future__ import annotations

import os

from cmbagent_batch.cli.console import warn
from cmbagent_batch.cli.options import ReportOptions
from cmbagent_batch.cli.rundirs import run_dir_with_run
from cmbagent_batch.errors import ExitCode
from cmbagent_batch.rundir.atomic import writable_output


def report(opts: ReportOptions) -> int:
    from cmbagent_batch.report.page import REPORT, write_report

    run_dir = run_dir_with_run(opts.run_dir, "report")
    out = writable_output(opts.output or os.path.join(run_dir, REPORT))
    path, g = write_report(run_dir, out, warn=warn)
    print(f"wrote {path}: {len(g.state):,} tasks, {len(g.attempts):,} attempts in {len(g.runs):,} run(s)")
    return ExitCode.OK
