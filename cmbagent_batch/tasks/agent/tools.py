"""The code-execution tools of an agent task: ``run_python`` and ``run_shell``, confined to ``codebase/``.

Each execution runs under ``cmbagent_batch.tasks.agent.sandbox`` (Landlock: it reads anything, writes only
inside ``codebase/``), in a process group of its own that is killed when the execution ends, so nothing
it leaves in the background outlives it. Its output goes to a file (not a pipe, which a background child
would hold open) and the model sees the exit code and the output, cut to ``OUTPUT_LIMIT`` characters.
The environment it gets has no API key or other secret of the runner's.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from cmbagent_batch.llm.endpoint import SECRET_NAME

CODE_TIMEOUT = 600.0  # seconds one code execution may take
OUTPUT_LIMIT = 8000  # characters of a code execution's output shown to the model


def tool_environment(environ: Mapping[str, str], codebase: str, key_env: str) -> dict[str, str]:
    """What code the agent runs may see: the runner's environment minus the API key and anything that
    looks like a secret, with ``TMPDIR`` and ``HOME`` inside ``codebase/``. Pure."""
    env = {k: v for k, v in environ.items() if k != key_env and not SECRET_NAME.search(k)}
    env.update(TMPDIR=os.path.join(codebase, ".tmp"), HOME=codebase, PYTHONDONTWRITEBYTECODE="1")
    return env


def code_tools(work_dir: str, key_env: str, failed: Callable[[str], None]) -> list[Any]:
    """The two AG2 tools. ``failed`` is told when code cannot be confined (the attempt must then fail)."""
    from ag2 import tool

    codebase = os.path.join(work_dir, "codebase")
    logs = os.path.join(work_dir, "logs")
    os.makedirs(os.path.join(codebase, ".tmp"), exist_ok=True)
    env = tool_environment(os.environ, codebase, key_env)
    numbers = itertools.count(1)

    @tool
    def run_python(code: str) -> str:
        """Run a Python program in the task's codebase directory; returns its exit code and output."""
        n = next(numbers)
        path = os.path.join(codebase, f"snippet_{n}.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(code)
        return confined([sys.executable, path], codebase, env, os.path.join(logs, f"tool-{n}.log"), failed)

    @tool
    def run_shell(command: str) -> str:
        """Run a bash command in the task's codebase directory; returns its exit code and output."""
        n = next(numbers)
        return confined(["bash", "-c", command], codebase, env, os.path.join(logs, f"tool-{n}.log"), failed)

    return [run_python, run_shell]


def confined(argv: list[str], codebase: str, env: dict[str, str], log: str, failed: Callable[[str], None],
             timeout: float = CODE_TIMEOUT) -> str:
    """Run ``argv`` in ``codebase``, writes confined to it; what the model is told of it."""
    wrapped = [sys.executable, "-m", "cmbagent_batch.tasks.agent.sandbox", "--writable", codebase, "--", *argv]
    with open(log, "w+b") as out:
        proc = subprocess.Popen(wrapped, cwd=codebase, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what it left running in the background
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    if code == 126 and "Landlock" in text:
        failed(text.strip())
        return "code execution is not available on this machine: " + text.strip()
    if len(text) > OUTPUT_LIMIT:
        text = text[: OUTPUT_LIMIT // 2] + "\n...[output cut]...\n" + text[-OUTPUT_LIMIT // 2:]
    if code is None:
        return f"timed out after {timeout:g} s (killed)\n{text}"
    return f"exit code {code}\n{text}"
