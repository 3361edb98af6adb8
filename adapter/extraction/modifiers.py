"""FHIR R4's core modifier elements on the resources read for a Procedure (docs/input-contract.md, modifier-element).

A modifier element changes what the rest of the resource means, so FHIR forbids processing a resource as if it
were absent. Each one of the types we read is either applied with its meaning where the rule that reads the
resource decides (Procedure.status, Condition's statuses, Coverage/Account/ChargeItemDefinition.status: only
active ones are used; BodyStructure.active false: no lesion), has no effect on a charge by its definition
(Location.status, ServiceRequest.intent, Patient.link other than replaced-by, Patient.deceasedBoolean), or is
listed here: a value we cannot apply sends the Procedure to review `modifier-element`, naming the element.
Pure: reads the resource only.
"""

from __future__ import annotations

from typing import Any

HTEST = ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "HTEST")
"""`meta.security` code marking test data (v3 ActReason HTEST, "test health data")."""

VOID_ENCOUNTER_STATUSES = {"entered-in-error": "was entered in error: the Procedure names a visit record that is void",
                           "cancelled": "was cancelled: the visit did not take place, yet the Procedure says it "
                                        "was done in it"}


def modifier_findings(resource: dict[str, Any], path: str) -> list[str]:
    """Sentences naming every core modifier element of `resource` (at `path`, its key) whose meaning cannot be
    applied to a charge: they hold the Procedure for review. Contained resources are looked at too."""
    found: list[str] = []
    _check(resource, path, found)
    for inner in resource.get("contained") or []:
        if isinstance(inner, dict):
            _check(inner, f"{path}#{inner.get('id', '')}", found)
    return found


def _check(resource: dict[str, Any], path: str, found: list[str]) -> None:
    rules = resource.get("implicitRules")
    if rules is not None:
        found.append(f"{resource.get('resourceType')}.implicitRules {rules} ({path}): rules this adapter does not "
                     "know may change what the resource means")
    kind = resource.get("resourceType")
    if kind == "Encounter":
        status = resource.get("status")
        if status in VOID_ENCOUNTER_STATUSES:
            found.append(f"Encounter.status {status} ({path}): the encounter {VOID_ENCOUNTER_STATUSES[status]}; the "
                         "session is not billed until a coder says which visit it belongs to")
    elif kind in ("Patient", "Organization"):
        if resource.get("active") is False:
            what = "patient record" if kind == "Patient" else "organization"
            found.append(f"{kind}.active false ({path}): the {what} is not in active use and may have been created "
                         "in error")
        if kind == "Patient":
            for i, link in enumerate(resource.get("link") or []):
                if isinstance(link, dict) and link.get("type") == "replaced-by":
                    other = (link.get("other") or {}).get("reference") if isinstance(link.get("other"), dict) else None
                    found.append(f"Patient.link[{i}] replaced-by {other or '(no reference)'} ({path}): the patient "
                                 "was merged into that record; charges belong to the surviving record, never moved "
                                 "silently")
    elif kind == "ServiceRequest":
        if resource.get("status") == "entered-in-error":
            found.append(f"ServiceRequest.status entered-in-error ({path}): the order the Procedure is based on is "
                         "void")
        if resource.get("doNotPerform") is True:
            found.append(f"ServiceRequest.doNotPerform true ({path}): the order says the procedure must not be "
                         "done")


def deceased_before(patient: dict[str, Any] | None, day: str | None) -> str | None:
    """`Patient.deceasedDateTime` when it is before the date of service (`YYYY-MM-DD`): a charge for a service
    after death cannot be right. `deceasedBoolean` true has no effect (the death may be after the service)."""
    when = (patient or {}).get("deceasedDateTime")
    if not isinstance(when, str) or len(when) < 10 or not day:
        return None
    return when if when[:10] < day else None


def is_test_data(resource: dict[str, Any] | None) -> bool:
    """Whether `meta.security` marks the resource as test data (HTEST)."""
    meta = (resource or {}).get("meta")
    labels = meta.get("security") if isinstance(meta, dict) else None
    return any(isinstance(c, dict) and (c.get("system"), c.get("code")) == HTEST for c in labels or [])
