"""Generate realistic synthetic FNA data: Patients with Coverage, Encounters, BodyStructures, Procedures.

Used by the benchmarks (offline and against HAPI). Deterministic for a given seed and prefix, so runs
compare like with like. Sessions get 1-3 Procedures with 1-4 lesions under mixed modalities.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCT = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
METHODS = [
    (SCT, "61593002", "Ultrasonic guidance procedure"),
    (DCM, "US", "Ultrasound"),
    (SCT, "44491008", "Fluoroscopy"),
    (SCT, "258176004", "Computerized tomography guidance"),
    (DCM, "CT", "Computed Tomography"),
    (SCT, "258177008", "MRI guidance"),
    ("http://fhir-charge-adapter.example.org/fhir/CodeSystem/guidance", "none", "No imaging guidance"),
]
MODALITY = {"61593002": "us", "US": "us", "44491008": "fluoro", "258176004": "ct", "CT": "ct", "258177008": "mr",
            "none": "none"}
MAX_LESIONS = 4
"""Per modality and session: a primary and three add-ons, within config/mue.yaml (realistic sessions never need
review for MUE)."""
SITES = [("69748006", "Thyroid structure"), ("76752008", "Breast structure"), ("39607008", "Lung structure"),
         ("10200004", "Liver structure"), ("59441001", "Lymph node structure")]


def ref(kind: str, rid: str) -> dict[str, str]:
    return {"reference": f"{kind}/{rid}"}


def generate(procedures: int, prefix: str = "g", seed: int = 7, review: bool = False) -> Iterator[dict[str, Any]]:
    """Yield resources (referenced ones before their referrers) until `procedures` Procedures exist.

    `review`: every Procedure waits for review (status `unknown`), and every Patient and BodyStructure carries
    free text of its own (a name, a description) that the diagnostics must mask."""
    rng = random.Random(seed)
    made = 0
    n = 0
    while made < procedures:
        n += 1
        pat, prac, enc, org = f"{prefix}{n}-pat", f"{prefix}{n}-prac", f"{prefix}{n}-enc", f"{prefix}{n}-org"
        day = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        patient: dict[str, Any] = {"resourceType": "Patient", "id": pat, "gender": rng.choice(["female", "male"]),
                                   "birthDate": f"{rng.randint(1940, 2000)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"}
        if review:
            patient["name"] = [{"family": f"Family{prefix}{n}", "given": [f"Given{n}"]}]
        yield patient
        yield {"resourceType": "Practitioner", "id": prac,
               "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"{1000000000 + n}"}]}
        yield {"resourceType": "Organization", "id": org, "name": "Synthetic Payer"}
        yield {"resourceType": "Coverage", "id": f"{prefix}{n}-cov", "status": "active",
               "beneficiary": ref("Patient", pat), "payor": [ref("Organization", org)]}
        yield {"resourceType": "Encounter", "id": enc, "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
               "subject": ref("Patient", pat), "period": {"start": f"{day}T08:00:00Z", "end": f"{day}T17:00:00Z"}}
        used: dict[str, int] = {}
        for p in range(rng.randint(1, 3)):
            if made >= procedures:
                break
            made += 1
            pid = f"{prefix}{n}-fna-{p + 1}"
            system, code, display = rng.choice(METHODS)
            if used.get(MODALITY[code], 0) >= MAX_LESIONS:
                system, code, display = next(m for m in METHODS if used.get(MODALITY[m[1]], 0) < MAX_LESIONS)
            room = MAX_LESIONS - used.get(MODALITY[code], 0)
            extensions: list[dict[str, Any]] = [{
                "url": "http://hl7.org/fhir/StructureDefinition/procedure-method",
                "valueCodeableConcept": {"coding": [{"system": system, "code": code, "display": display}]}}]
            count = min(rng.randint(1, 3 if code != "none" else 1), room)
            used[MODALITY[code]] = used.get(MODALITY[code], 0) + count
            for lesion in range(count):
                bs = f"{pid}-bs-{lesion + 1}"
                site = rng.choice(SITES)
                body: dict[str, Any] = {
                    "resourceType": "BodyStructure", "id": bs, "patient": ref("Patient", pat),
                    "morphology": {"coding": [{"system": SCT, "code": "27925004", "display": "Nodule"}]},
                    "location": {"coding": [{"system": SCT, "code": site[0], "display": site[1]}]}}
                if review:
                    body["description"] = f"{site[1]} nodule {rng.randint(4, 40)} mm ({pid} #{lesion + 1})"
                yield body
                extensions.append({"url": "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure",
                                   "valueReference": ref("BodyStructure", bs)})
            yield {"resourceType": "Procedure", "id": pid, "extension": extensions,
                   "status": "unknown" if review else "completed",
                   "code": {"coding": [{"system": SCT, "code": "48635004", "display": "Fine needle biopsy"}]},
                   "subject": ref("Patient", pat), "encounter": ref("Encounter", enc),
                   "performedDateTime": f"{day}T{9 + p:02d}:{rng.randint(0, 59):02d}:00Z",
                   "performer": [{"actor": ref("Practitioner", prac)}],
                   "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R59.0"}]}]}


def put_all(client: Any, resources: list[dict[str, Any]], batch: int = 400) -> None:
    """Load resources into a FHIR server with client-assigned ids, `batch` per transaction."""
    for start in range(0, len(resources), batch):
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources[start:start + batch]]})


def write_ndjson(path: Path, procedures: int, prefix: str = "g", seed: int = 7, review: bool = False) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for resource in generate(procedures, prefix, seed, review):
            out.write(json.dumps(resource, separators=(",", ":")) + "\n")
            count += 1
    return count


def write_bundle(path: Path, procedures: int, prefix: str = "g", seed: int = 7, review: bool = False) -> int:
    """The same resources as one collection Bundle (written entry by entry: it never sits in memory)."""
    count = 0
    with path.open("w", encoding="utf-8") as out:
        out.write('{"resourceType": "Bundle", "type": "collection", "entry": [')
        for resource in generate(procedures, prefix, seed, review):
            out.write((",\n" if count else "\n") + json.dumps({"resource": resource}, separators=(",", ":")))
            count += 1
        out.write("\n]}\n")
    return count


if __name__ == "__main__":
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "generated.ndjson")
    print(write_ndjson(target, int(sys.argv[1]) if len(sys.argv) > 1 else 10000), "resources ->", target)
