"""Headless Chromium for the tests of the HTML pages (the ledger report, the run report).

The browser tests need Debian's ``chromium`` on PATH (``apt-get install chromium``); without it they fail,
unless ``CMBAGENT_BATCH_NO_BROWSER=1`` is set, which skips them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str:
    """Chromium's path; a failure (not a skip) when it is missing, unless the browser tests are turned off."""
    if os.environ.get("CMBAGENT_BATCH_NO_BROWSER") == "1":
        pytest.skip("CMBAGENT_BATCH_NO_BROWSER=1: browser tests skipped")
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not on PATH: apt-get install chromium "
                    "(or set CMBAGENT_BATCH_NO_BROWSER=1 to skip the browser tests)")
    return exe


def run_chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a fresh profile, ``HOME`` and caches under ``tmp_path``."""
    home = tmp_path / "home"
    env = clean_env(tmp_path, drop=(), XDG_CONFIG_HOME=str(home / ".config"),
                    XDG_CACHE_HOME=str(home / ".cache"))
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    r = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r
