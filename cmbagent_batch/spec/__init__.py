"""The job spec: YAML in, validated frozen objects out."""

from cmbagent_batch.spec.loader import load_spec
from cmbagent_batch.spec.model import JobSpec, ModelSpec, TaskSpec

__all__ = ["JobSpec", "ModelSpec", "TaskSpec", "load_spec"]
