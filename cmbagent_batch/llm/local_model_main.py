"""A local model's server process: ``python -m cmbagent_batch.llm.local_model_main PARENT_PID SERVER_ARGS...``.

Runs llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server SERVER_ARGS...``) with two
precautions. It ends, with its process group, once process PARENT_PID is no longer its parent (checked
every 0.5 s): a runner killed by SIGKILL leaves no server behind. (PR_SET_PDEATHSIG would fire when the
*thread* that started the server ends, and a server started by a task thread outlives that thread.) And
the server's settings come from its arguments alone: the environment variables its settings would read
(HOST, PORT, MODEL, API_KEY, CONFIG_FILE, N_CTX, ...) are removed first.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not args[0].isdigit():
        print("usage: python -m cmbagent_batch.llm.local_model_main PARENT_PID SERVER_ARGS...", file=sys.stderr)
        sys.exit(2)
    parent = int(args[0])
    if os.getppid() != parent:  # the runner is gone already
        sys.exit(1)
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    from llama_cpp.server.settings import ConfigFileSettings, Settings

    read = {name.lower() for name in (*Settings.model_fields, *ConfigFileSettings.model_fields)}
    for name in list(os.environ):
        if name.lower() in read | {"host", "port", "config_file"}:
            del os.environ[name]
    sys.argv = ["llama_cpp.server", *args[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main()
