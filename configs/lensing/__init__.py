"""Stand-ins for a lensing pipeline's code, so that configs/slurm-mpi.yaml's calls resolve: replace them
with your own package beside your spec."""
