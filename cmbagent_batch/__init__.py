"""cmbagent-batch: a declarative, YAML-driven batch runner for HPC."""

__version__ = "0.1.0"
