"""A toy MPI program for configs/mixed.yaml: each rank draws its own Metropolis chain for the amplitude of
a Gaussian likelihood, and rank 0 writes the chains' mean and how many ranks ran.

The task calls ``run``, which starts the ranks where the task was placed: ``$CMBAGENT_LAUNCH python
mpi_chain.py OUT``, each rank bound to one of the cores booked for it."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys


def chain(seed: int, steps: int) -> list[float]:
    """A Metropolis chain of ``steps`` draws of A ~ N(2.1, 0.05^2), from A = 2.0."""
    rng = random.Random(seed)
    a, out = 2.0, []
    for _ in range(steps):
        b = a + rng.gauss(0.0, 0.05)
        if math.log(rng.random()) < ((a - 2.1) ** 2 - (b - 2.1) ** 2) / (2 * 0.05**2):
            a = b
        out.append(a)
    return out


def run(out: str = "chain.json") -> dict[str, float]:
    """The task: this file's ``main`` on the task's ranks; what rank 0 wrote."""
    launch = shlex.split(os.environ["CMBAGENT_LAUNCH"])
    subprocess.run([*launch, sys.executable, os.path.abspath(__file__), out], check=True)
    with open(out, encoding="utf-8") as fh:
        result: dict[str, float] = json.load(fh)
    return result


def main(out: str) -> None:
    from mpi4py import MPI  # on the ranks only: the task's own process does not start MPI

    comm = MPI.COMM_WORLD
    mine = chain(seed=comm.Get_rank(), steps=20_000)[2_000:]  # each rank burns in its own chain
    total = comm.reduce(sum(mine), op=MPI.SUM)
    count = comm.reduce(len(mine), op=MPI.SUM)
    if comm.Get_rank() == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"ranks": comm.Get_size(), "mean_A": round(total / count, 4)}, fh)
            fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
