"""The X12 sink end to end: `charge-adapter run` against a real HAPI server writes one 837P interchange per pass
(pyx12-valid), writes nothing again for an unchanged pass, and after the payer answered (a ClaimResponse with
the payer's claim number) a corrected session goes as a replacement (frequency 7, REF*F8 that number) under
the next control number."""

from __future__ import annotations

from pathlib import Path

from adapter.client import FhirClient

from ..x12check import pyx12_errors
from .adapter_process import ONLY_NEW, Adapter
from .helpers import namespaced, patients_of, resources_of, server_now
from .test_lifecycle import claims, with_a_lesion_more


def test_run_writes_interchanges_and_a_replacement_names_the_payers_claim(
        client: FhirClient, hapi_url: str, tmp_path: Path, fhir_ns: str) -> None:
    since = server_now(client)
    bundle = namespaced("02", fhir_ns)  # 10005 + 10006 x2, one Claim
    client.transaction(bundle)
    patients = patients_of(resources_of(bundle))
    outbox = tmp_path / "837"
    runner = Adapter(tmp_path, hapi_url, sinks={"x12": {"enabled": True, "folder": str(outbox)}}, poll=ONLY_NEW)
    runner.start_cursor_at(since)
    first = runner.cmd("run", "--once")
    assert first.returncode == 0, first.stderr + runner.cmd("review", "list").stdout
    assert sorted(p.name for p in outbox.iterdir()) == ["837P-000000001.x12"]
    original = (outbox / "837P-000000001.x12").read_text()
    assert pyx12_errors(original) == [] and ":B:1*" in original and "SV1*HC:10006*412*UN*2" in original

    again = runner.cmd("run", "--once")  # nothing changed: no Claim written, no interchange
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in outbox.iterdir()) == ["837P-000000001.x12"]

    claim = claims(client, patients)[0]
    client.create({"resourceType": "ClaimResponse", "status": "active", "type": claim["type"], "use": "claim",
                   "identifier": [{"system": "http://greatlakes.example.com/icn", "value": "GLH26091500417"}],
                   "patient": claim["patient"], "created": "2026-12-01T00:00:00Z", "insurer": claim["insurer"],
                   "request": {"reference": f"Claim/{claim['id']}"}, "outcome": "complete"})
    with_a_lesion_more(client, bundle, f"{fhir_ns}-s02-fna-1")
    corrected = runner.cmd("run", "--once")
    assert corrected.returncode == 0, corrected.stderr
    assert sorted(p.name for p in outbox.iterdir()) == ["837P-000000001.x12", "837P-000000002.x12"]
    replacement = (outbox / "837P-000000002.x12").read_text()
    assert pyx12_errors(replacement) == []
    assert ":B:7*" in replacement and "REF*F8*GLH26091500417~" in replacement
    assert "SV1*HC:10006*618*UN*3" in replacement
    assert (outbox / "837P-000000001.x12").read_text() == original
