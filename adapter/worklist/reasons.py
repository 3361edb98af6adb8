"""Every review reason the adapter emits: what it means, the element to look at, and what would fix it.

One table for the CLI (`review show`), the FHIR Task mirrored for each review item and the worklist page, and
the source of the `review-reason` CodeSystem in the conformance package (its codes are these reason names).
The texts are ours: they never carry data of a patient, so they can go on a Task as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasonHelp:
    display: str
    """What is wrong, in a few words (Task.businessStatus.text, the CodeSystem's display)."""
    element: str
    """Where to look (Task.input): a FHIR element path or the adapter's table."""
    fix: str
    """What would fix it (Task.statusReason.text): the change to make, then replay."""


def _r(display: str, element: str, fix: str) -> ReasonHelp:
    return ReasonHelp(display, element, fix)


REASONS: dict[str, ReasonHelp] = {
    # -- extraction and coding (engine findings) ------------------------------------------------------------
    "unresolved-reference": _r(
        "A reference points at nothing usable", "Procedure (the reference named in the detail)",
        "Make the reference resolve: create the missing resource on the server or correct the reference, then "
        "replay."),
    "version-conflict": _r(
        "Two different copies carry the same version", "Procedure.meta.versionId",
        "Keep one copy per version: resend the Procedure so each version has one content (or a new versionId), "
        "then replay."),
    "missing-performer": _r(
        "No rendering provider", "Procedure.performer.actor",
        "Add the Practitioner who performed the biopsy as Procedure.performer.actor (or give the Encounter a "
        "participant), then replay."),
    "ambiguous-performer": _r(
        "Several people could be the rendering provider", "Procedure.performer",
        "Leave one eligible performer.actor (mark the others with a function such as assistant), then replay."),
    "invalid-resource": _r(
        "The resource breaks the input contract", "Procedure (the element named in the detail)",
        "Correct the element named in the detail (id, subject, status or a date precise to the day), then "
        "replay."),
    "missing-performed-date": _r(
        "No date of service", "Procedure.performedDateTime",
        "Set Procedure.performedDateTime (or performedPeriod.start) to the day of the biopsy, then replay."),
    "session-ambiguous": _r(
        "The Procedure fits more than one session", "Procedure.encounter",
        "Set Procedure.encounter so it names one visit, then replay."),
    "duplicate-conflict": _r(
        "Copies of one procedure disagree", "Procedure.identifier",
        "Correct or enter-in-error the copy that is wrong so the copies agree, then replay."),
    "bilateral-site": _r(
        "A bilateral site is two lesions", "Procedure.bodySite",
        "Record each side as its own lesion (one bodySite or BodyStructure per side), then replay."),
    "core-biopsy-same-lesion": _r(
        "Core biopsy of the same lesion on the same day", "Procedure.bodySite",
        "A coder decides: if the FNA sample was inadequate, dismiss with that note and bill by hand; if the "
        "lesions differ, correct the bodySite, then replay."),
    "other-patient": _r(
        "A referenced resource belongs to another patient", "Procedure (the reference named in the detail)",
        "Point the reference at this patient's resource, then replay."),
    "unknown-modifier-extension": _r(
        "An unknown modifierExtension", "Procedure.modifierExtension",
        "Remove the modifierExtension, or add its URL to the known modifier extensions in config/input.yaml if "
        "it does not change the meaning for billing, then replay."),
    "modality-conflict": _r(
        "The guidance evidence disagrees", "Procedure.extension:procedure-method, Procedure.code",
        "Make the guidance agree: correct the procedure-method coding or the Procedure.code so both name one "
        "modality (ultrasound, fluoroscopy, CT, MR or none), then replay."),
    "modality-missing": _r(
        "No guidance modality", "Procedure.extension:procedure-method, Procedure.code",
        "Record the imaging guidance: a procedure-method coding or a Procedure.code that names the modality "
        "(or the project code `none` for palpation-guided), then replay."),
    "lesion-modality-conflict": _r(
        "One lesion sampled under two modalities", "Procedure.bodySite",
        "Correct the modality or the lesion of one of the Procedures so a lesion has one modality, then replay."),
    "status-needs-review": _r(
        "The Procedure's status leaves it open whether a lesion was sampled", "Procedure.status",
        "Set Procedure.status to completed when a sample was taken, or not-done/entered-in-error, then replay."),
    "mue-exceeded": _r(
        "More units than the MUE allows", "ChargeItem.quantity",
        "Check the lesions counted: merge duplicates (one BodyStructure per lesion); if they are right, dismiss "
        "with a note and bill the excess with documentation by hand."),
    "session-held": _r(
        "Held with its session", "Procedure (another Procedure of the session)",
        "Fix the review item of the other Procedure in the same session; this one is coded with it on replay."),
    # -- what a Claim needs ------------------------------------------------------------------------------------
    "missing-payer": _r(
        "No payer", "Coverage.payor",
        "Give the patient's Coverage a payor Organization, then replay."),
    "missing-billing-provider": _r(
        "No billing provider", "PractitionerRole.organization",
        "Give the performer a PractitionerRole with an organization (or performer.onBehalfOf), or add a row to "
        "config/billing-providers.yaml, then replay."),
    "missing-place-of-service": _r(
        "No place of service", "Encounter.class",
        "Map the Encounter's class or location type in config/place-of-service.yaml (or set its default), then "
        "replay."),
    "missing-diagnosis": _r(
        "No ICD-10-CM diagnosis", "Procedure.reasonCode, Procedure.reasonReference",
        "Add an ICD-10-CM reasonCode (or a Condition in reasonReference), or map the code in "
        "config/diagnosis-map.yaml, then replay."),
    "missing-price": _r(
        "No price", "ChargeItemDefinition",
        "Add a ChargeItemDefinition for the code, or a row to config/chargemaster.yaml, then replay."),
    "modifier-element": _r(
        "A modifier element changes what the record means", "the element named in the detail",
        "Correct the record on the server (the void Encounter, implicitRules, the inactive or merged Patient, "
        "the order not to perform) or link the right one, then replay."),
    "unmapped-local-code": _r(
        "A local procedure code nobody mapped", "Procedure.code, config/local-codes.json",
        "Map the site's code to SNOMED CT or CPT in config/local-codes.json (or code the Procedure with a "
        "standard code), then replay."),
    "no-row-for-date": _r(
        "No code table row for the date of service", "Procedure.performed[x], config/ (the table named)",
        "Check the date of service; if it is right, add a table row whose effective period covers it, then "
        "replay."),
    "time-zone-conflict": _r(
        "The facility's time zones give different dates", "Location/Organization timezone extension",
        "Make the Location's and Organization's timezone extensions agree (or write the time with its local "
        "offset), then replay."),
    "included-fna-distinct-site": _r(
        "An including procedure of the session names another site", "Procedure.partOf, BodyStructure",
        "Decide whether the FNA was part of the endoscopic procedure: link it by partOf or give it its own "
        "site, then replay."),
    "invalid-output": _r(
        "The charge built would not be valid FHIR", "ChargeItem, Claim",
        "A bug or a table error: check config/ for the value named in the detail, then replay; report it if "
        "the tables are right."),
    # -- writing and the lifecycle -------------------------------------------------------------------------
    "write-rejected": _r(
        "The FHIR server refused the charges", "ChargeItem, Claim (the server's OperationOutcome)",
        "Fix what the server's answer names (a profile, a reference, a code system), then replay."),
    "write-failed": _r(
        "Writing failed (recorded by adapters before 0.2)", "ChargeItem, Claim",
        "Replay: the write is retried as it is today."),
    "processing-failed": _r(
        "Processing failed repeatedly (a bug)", "the adapter's log",
        "Look for the error in the adapter's log, fix the cause (or report the bug), then replay."),
    "changed-on-server": _r(
        "Someone else changed a charge we wrote", "ChargeItem, Claim",
        "A coder decides which coding is right: correct the charge on the server by hand, or set it "
        "entered-in-error so the coding is written beside it (then replay); dismiss to keep the server's "
        "version. The adapter never overwrites another's change."),
    "x12-missing-element": _r(
        "The Claim lacks what an X12 837P requires", "Claim, Coverage, Patient, config/billing-providers.yaml",
        "Add the element the detail names (e.g. Coverage.relationship, the patient's street, the billing "
        "provider's address), then replay."),
    # -- HL7 v2 sink -------------------------------------------------------------------------------------------
    "hl7v2-missing-mrn": _r(
        "No MRN for PID-3", "Patient.identifier",
        "Give the Patient an identifier of the MRN type (or a system listed in config/hl7v2.yaml mrn), then "
        "replay."),
    "hl7v2-missing-patient-name": _r(
        "No patient name for PID-5", "Patient.name",
        "Give the Patient a name on the server, then replay."),
    "hl7v2-missing-visit-number": _r(
        "No visit number for PV1-19", "Procedure.encounter, Encounter.identifier",
        "Set Procedure.encounter, and give the Encounter an identifier of the visit-number type "
        "(config/hl7v2.yaml visit_number), then replay."),
    "hl7v2-missing-patient-class": _r(
        "No patient class for PV1-2", "Encounter.class",
        "Map the Encounter's class in config/hl7v2.yaml patient_class, then replay."),
    "hl7v2-missing-npi": _r(
        "No NPI for FT1-20", "Practitioner.identifier",
        "Give the performing Practitioner an NPI identifier (http://hl7.org/fhir/sid/us-npi), then replay."),
    "hl7v2-missing-diagnosis": _r(
        "No ICD-10-CM diagnosis for FT1-19", "Procedure.reasonCode, Procedure.reasonReference",
        "Add an ICD-10-CM reasonCode, or map the code in config/diagnosis-map.yaml, then replay."),
    "hl7v2-invalid-message": _r(
        "The HL7 v2 message built would not be valid", "config/hl7v2.yaml",
        "Check config/hl7v2.yaml for the field named in the detail, then replay; report it if the table is "
        "right."),
    "hl7v2-rejected": _r(
        "The HL7 v2 receiver refused the message", "the receiver's ACK (MSA/ERR)",
        "Fix what the receiver's acknowledgement names; replay lifts the patient's hold and sends again."),
    "hl7v2-unreachable": _r(
        "The HL7 v2 receiver could not be reached", "sinks.hl7v2 settings",
        "Bring the receiver back (or correct sinks.hl7v2 host and port), then replay."),
    "hl7v2-deferred": _r(
        "HL7 v2 charges wait behind an earlier refusal", "the patient's earlier HL7 v2 review item",
        "Fix and replay the patient's hl7v2-rejected item first; these follow."),
}

UNKNOWN = ReasonHelp("Needs review", "see the detail", "Read the detail, fix the data it names, then replay.")


def help_for(reason: str) -> ReasonHelp:
    """The table's row for `reason` (a generic row for a reason written by another version of the adapter)."""
    return REASONS.get(reason, UNKNOWN)


TASK_STATUSES: dict[str, tuple[str, str]] = {
    "waiting": ("Waits for a fix", "Set by the adapter while the review item is open."),
    "replay": ("Replay requested", "Set by a coder: the adapter replays the item on its next turn (then the Task "
                                   "is completed, or back to waiting with the reason that is left)."),
    "coded": ("Coded", "Set by the adapter with status completed: a replay or a re-code of fixed data coded it."),
    "dismissed": ("Dismissed", "Set by the adapter with status cancelled: an analyst or a coder dismissed it."),
}
"""Task.businessStatus codes (CodeSystem review-task-status). `replay` is the one a coder sets."""

TASK_INPUTS: dict[str, tuple[str, str]] = {
    "element": ("Element to change", "The FHIR element (or adapter table) the fix is made in."),
}


def codesystem(name: str, title: str, description: str, concepts: list[tuple[str, str, str]],
               base: str, version: str, day: str) -> dict[str, object]:
    """A complete CodeSystem of the conformance package (`concepts`: code, display, definition)."""
    pascal = "".join(part.capitalize() for part in name.split("-"))
    return {
        "resourceType": "CodeSystem", "id": name,
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{title}: '
                                             f"{len(concepts)} codes.</p></div>"},
        "url": f"{base}/CodeSystem/{name}", "version": version, "name": pascal, "title": title,
        "status": "active", "date": day, "publisher": "fhir-charge-adapter", "description": description,
        "caseSensitive": True, "content": "complete", "count": len(concepts),
        "concept": [{"code": c, "display": d, "definition": f} for c, d, f in concepts],
    }


def package_codesystems(base: str, version: str, day: str) -> dict[str, dict[str, object]]:
    """The worklist's CodeSystems by file name, as `scripts`/tests write them into adapter/conformance/package."""
    return {
        "CodeSystem-review-reason.json": codesystem(
            "review-reason", "Review reason", "Why the adapter could not code or write a Procedure's charges "
            "(Task.code of a review item); the definition says what would fix it.",
            [(k, v.display, v.fix) for k, v in REASONS.items()], base, version, day),
        "CodeSystem-review-task-status.json": codesystem(
            "review-task-status", "Review task business status", "Task.businessStatus of a review item: where "
            "it stands, and `replay`, the value a coder sets to have it replayed.",
            [(k, d, f) for k, (d, f) in TASK_STATUSES.items()], base, version, day),
        "CodeSystem-review-task-input.json": codesystem(
            "review-task-input", "Review task input", "Task.input types of a review item.",
            [(k, d, f) for k, (d, f) in TASK_INPUTS.items()], base, version, day),
    }
