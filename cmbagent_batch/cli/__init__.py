"""The ``cmbagent-batch`` command line."""

from cmbagent_batch.cli.main import main

__all__ = ["main"]
