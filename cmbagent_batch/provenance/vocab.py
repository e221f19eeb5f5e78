"""The terms a run crate is written in: the RO-Crate and workflow-run contexts, the Workflow Run RO-Crate
profiles it conforms to, and the identifiers of the measures and facts cmbagent-batch adds
(``TERMS``, an ad hoc namespace under w3id.org/ro/terms, as RO-Crate suggests for a tool's own terms).

Pure: builders of plain JSON-LD objects.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cmbagent_batch.states import TaskState

CONTEXT = ["https://w3id.org/ro/crate/1.1/context", "https://w3id.org/ro/terms/workflow-run/context"]
RO_CRATE = "https://w3id.org/ro/crate/1.1"
PROFILES = (
    ("https://w3id.org/ro/wfrun/process/0.5", "Process Run Crate", "0.5"),
    ("https://w3id.org/ro/wfrun/workflow/0.5", "Workflow Run Crate", "0.5"),
    ("https://w3id.org/ro/wfrun/provenance/0.5", "Provenance Run Crate", "0.5"),
    ("https://w3id.org/workflowhub/workflow-ro-crate/1.0", "Workflow RO-Crate", "1.0"),
)
TERMS = "https://w3id.org/ro/terms/cmbagent-batch#"
SECOND = "https://qudt.org/vocab/unit/SEC"
MEGABYTE = "https://qudt.org/vocab/unit/MegaBYTE"
ENGINE = "#cmbagent-batch"
LANGUAGE = "#cmbagent-batch-job-spec"
NO_LICENSE = "#no-license-given"
METADATA = "ro-crate-metadata.json"

_STATUS = {
    TaskState.SUCCEEDED: "CompletedActionStatus",
    TaskState.SKIPPED: "CompletedActionStatus",
    TaskState.PENDING: "PotentialActionStatus",
    TaskState.QUEUED: "PotentialActionStatus",
    TaskState.RUNNING: "ActiveActionStatus",
    TaskState.RETRYING: "ActiveActionStatus",
}


def ref(entity_id: str) -> dict[str, str]:
    """A reference to the entity ``entity_id``."""
    return {"@id": entity_id}


def refs(ids: list[str]) -> list[dict[str, str]] | dict[str, str]:
    """References to ``ids``: one alone is not put in a list (RO-Crate's compact form)."""
    return {"@id": ids[0]} if len(ids) == 1 else [{"@id": i} for i in ids]


def action_status(state: TaskState) -> dict[str, str]:
    """schema.org's status of an action that left a task in ``state``: every state that is not a success,
    not yet begun or still under way is a failure (its ``error`` says which and why)."""
    return ref("http://schema.org/" + _STATUS.get(state, "FailedActionStatus"))


def fragment(*parts: str) -> str:
    """A crate-local identifier, ``#a/b``, each part percent-encoded (a task id may hold any character)."""
    return "#" + "/".join(quote(p, safe="-_.~{}") for p in parts)


def property_value(entity_id: str, name: str, value: Any, unit: str | None = None) -> dict[str, Any]:
    """A PropertyValue whose ``propertyID`` is ``TERMS + name``."""
    pv: dict[str, Any] = {"@id": entity_id, "@type": "PropertyValue", "propertyID": TERMS + name, "name": name,
                          "value": value}
    if unit is not None:
        pv["unitCode"] = unit
    return pv


def profile_entities() -> list[dict[str, Any]]:
    """The CreativeWork of each profile the crate conforms to."""
    return [{"@id": pid, "@type": "CreativeWork", "name": name, "version": version}
            for pid, name, version in PROFILES]
