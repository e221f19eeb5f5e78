"""Local executors: a thread pool for shell (and, by default, python) tasks, a process pool for python
callables when ``use_process_pool`` is set. The scheduler sees only ``concurrent.futures.Executor``s."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from cmbagent_batch.tasks.shell import terminate_all


class LocalPools:
    def __init__(self, workers: int, use_process_pool: bool) -> None:
        self.workers = workers
        self.use_process_pool = use_process_pool
        self.threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="task")
        self.processes: ProcessPoolExecutor | None = None

    def _new_process_pool(self) -> ProcessPoolExecutor:
        # forkserver, not fork: the runner has threads (scheduler, journal, pools), and a child forked
        # while one of them holds a lock would hang on it.
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver"))

    def executor_for(self, kind: str) -> Executor:
        if kind == "python" and self.use_process_pool:
            if self.processes is None:
                self.processes = self._new_process_pool()
            return self.processes
        return self.threads

    def replace_broken(self, executor: Executor) -> None:
        """A worker process died: the pool is unusable, so start a new one (once per breakage)."""
        if executor is self.processes and self.processes is not None:
            self.processes.shutdown(wait=False, cancel_futures=True)
            self.processes = self._new_process_pool()

    def terminate_running(self, grace: float) -> None:
        terminate_all(grace)
        if self.processes is not None:
            for proc in list(getattr(self.processes, "_processes", {}).values()):
                proc.terminate()

    def shutdown(self, wait: bool = True) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=wait, cancel_futures=True)
