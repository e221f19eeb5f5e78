"""Fixtures shared across test files."""

pytest_plugins = ["tests.slurm_cluster"]  # slurm_conf: a local Slurm for the Slurm tests
