"""Every ``CMBAGENT_*`` environment variable cmbagent-batch knows, in one registry: those that override a
setting (the table of ``spec/config.py``), those the runner sets in each task's environment
(``tasks/shell.py``), and those the repository's own test setup reads. A ``CMBAGENT_*`` variable outside
it is a misspelling or a leftover: the preflight warns about it (``spec/preflight.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from cmbagent_batch.spec.config import ENV_VARS, SWITCHES

PREFIX = "CMBAGENT_"
MATRIX_PREFIX = "CMBAGENT_MATRIX_"  # + a matrix parameter's name in capitals: set for each task of a matrix entry
TASK_VARIABLES = ("CMBAGENT_TASK_ID", "CMBAGENT_TASK_DIR", "CMBAGENT_RUN_DIR", "CMBAGENT_RANK",
                  "CMBAGENT_ATTEMPT", "CMBAGENT_HOST", "CMBAGENT_LAUNCH", "CMBAGENT_NODELIST", "CMBAGENT_NTASKS",
                  "CMBAGENT_GPUS", "CMBAGENT_MODEL")
# tests/test_ledger_report.py and slurm/local-cluster.sh
DEVELOPMENT_VARIABLES = ("CMBAGENT_BATCH_NO_BROWSER", "CMBAGENT_SLURM_DIR", "CMBAGENT_SLURM_CTLD_PORT",
                         "CMBAGENT_SLURM_SLURMD_PORT", "CMBAGENT_SLURM_START_TIMEOUT", "CMBAGENT_SLURM_CRED_EXPIRE")
DEFAULT_KEY_ENV = "OPENAI_API_KEY"  # the variable holding a model's API key when its api_key_env names none


class Use(Enum):
    """Why cmbagent-batch knows a variable."""

    SETTING = "setting"
    """It overrides a setting of the spec (``spec/config.py``), or switches one."""
    TASK = "task"
    """The runner sets it in each task's environment (a task that runs cmbagent-batch again passes it on)."""
    DEVELOPMENT = "development"
    """The repository's test setup reads it."""


@functools.cache
def known() -> Mapping[str, Use]:
    """Every known ``CMBAGENT_*`` variable by name (``CMBAGENT_MATRIX_*`` aside: see ``is_known``)."""
    found = dict.fromkeys(DEVELOPMENT_VARIABLES, Use.DEVELOPMENT)
    found.update(dict.fromkeys(TASK_VARIABLES, Use.TASK))
    found.update(dict.fromkeys((*ENV_VARS, *SWITCHES), Use.SETTING))
    return MappingProxyType(found)


def is_known(name: str) -> bool:
    """Whether cmbagent-batch reads or sets the variable ``name``."""
    return name in known() or name.startswith(MATRIX_PREFIX)
