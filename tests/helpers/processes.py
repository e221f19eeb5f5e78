"""Looking at processes from tests (real ones: psutil on this machine)."""

from __future__ import annotations

import os

import psutil


def live_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (a zombie waits for its parent to reap it)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found
