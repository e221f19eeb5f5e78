"""Slurm: the job script (``script``), Slurm's commands (``client``), the run directory's record of its
jobs (``jobs``) and what a job does after a walltime stop (``walltime``). Imports nothing of MPI."""
