"""Local executors: a thread pool for shell and agent tasks (and python tasks under ``isolation:
thread``), and worker processes (``backends.processes``) for python tasks, by default. The scheduler
sees each as an ``Executor``: a key it hands back to ``submit``.

The thread pool has ``workers`` slots and more threads than that: an attempt prepares its work directory,
then waits at the gate for a slot, runs, gives the slot back and publishes its outputs. So the next
attempt is ready to start the moment a task ends, and directory work never holds a slot.

``hold`` (a stop with a drain) starts nothing more and lets what runs go on: the slots grant no more
attempts, and the worker processes start no more calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from cmbagent_batch.attempt import Attempt, Gate
from cmbagent_batch.backends.processes import WorkerProcesses
from cmbagent_batch.backends.slots import Slots, StartNotice
from cmbagent_batch.tasks.runner import run_attempt, run_attempts
from cmbagent_batch.tasks.shell import terminate_all


class LocalPools:
    def __init__(self, workers: int, isolated: bool) -> None:
        self.workers = workers
        self.isolated = isolated  # python tasks in worker processes
        self.slots = Slots(workers)
        # Attempts handed over ahead of a free slot. Preparing one (directories, log files) takes about as
        # long as a tiny task runs, so with few workers more than one apiece wait ready.
        self.prefetch = max(workers, 4)
        self.threads = ThreadPoolExecutor(max_workers=workers + self.prefetch, thread_name_prefix="task")
        self.processes = WorkerProcesses(workers)  # its processes start with the first python task

    def _in_processes(self, kind: str) -> bool:
        return kind == "python" and self.isolated

    def executor_for(self, kind: str) -> Executor:
        return self.processes if self._in_processes(kind) else self.threads

    def gate(self, kind: str, on_start: Callable[[], None]) -> Gate | None:
        # A process pool runs one attempt per worker process: what is handed over waits in its queue, and
        # a worker reports when it begins one (a batch: its first).
        return StartNotice(on_start) if self._in_processes(kind) else self.slots.gate(on_start)

    def submit(self, executor: Executor, attempts: Sequence[Attempt], gate: Gate | None) -> Future[Any]:
        """Hand one attempt or a batch of them (python tasks in worker processes) to ``executor``, with the
        submission's gate; the future's result is the attempt's ``Outcome``, or the batch's list of them."""
        if executor is self.processes:
            on_start = gate.on_start if isinstance(gate, StartNotice) else None
            return self.processes.submit_attempts(attempts, max(a.priority for a in attempts), len(attempts) == 1,
                                                  on_start)
        if len(attempts) == 1:
            return executor.submit(run_attempt, attempts[0], gate)
        return executor.submit(run_attempts, attempts)

    def batches(self, kind: str) -> float:
        # seconds of work a batch holds: a round trip to a worker process costs ~0.1 ms; to a thread, little
        return 0.02 if self._in_processes(kind) else 0.0

    def prefetch_kinds(self) -> frozenset[str]:
        """Kinds whose attempts may be handed over ahead of a free worker (see ``Limits``)."""
        kinds = {"shell", "agent"} | ({"python"} if self.workers > 1 or not self.isolated else set())
        return frozenset(kinds)

    def hold(self) -> None:
        """Start nothing more; running attempts go on. An attempt at (or on its way to) its gate ends
        "terminated by the runner before it started"; a process pool's calls not started are cancelled."""
        self.slots.stop()
        self.processes.hold()

    def terminate_running(self, grace: float) -> None:
        self.slots.stop()
        self.processes.terminate(grace)
        terminate_all(grace)

    def shutdown(self, wait: bool = True) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=True)
        self.processes.shutdown(wait=wait, cancel_futures=True)
