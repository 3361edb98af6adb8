"""The Bulk Data $export client against an in-process fake server, for what HAPI cannot be made to do on demand:
a status or file URL on another host, a 500 while polling, a Retry-After of our choosing, a server without
$export. The real export (kick-off, polling, downloads from HAPI's Binary resources) is tested against HAPI in
tests/integration/test_backfill.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter.cli import cli
from adapter.client import FhirClient
from adapter.client.errors import UnsafeLinkError
from adapter.client.retry import RetryPolicy
from adapter.sources.bulk import BulkExport, ExportFailed, ExportRequest, ExportUnsupported

from .fault_server import FaultServer, Reply, Seen, outcome

NDJSON = "application/fhir+ndjson"


def capabilities(export: bool = True) -> dict[str, Any]:
    rest: dict[str, Any] = {"mode": "server", "resource": [{"type": "Patient"}]}
    if export:
        rest["operation"] = [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]
    return {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": [rest]}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.on("GET", "/fhir/metadata", Reply(body=capabilities()))
        s.on("DELETE", "/fhir/$export-poll-status", Reply(202))
        yield s


def client_of(server: FaultServer) -> FhirClient:
    return FhirClient(server.url, retry=RetryPolicy(attempts=2, sleep=lambda _: None))


def exporting(server: FaultServer, status: list[Reply], **options: Any) -> tuple[BulkExport, list[float]]:
    status_url = f"{server.url}/$export-poll-status?_jobId=7"
    server.on("GET", "/fhir/$export", Reply(202, headers={"Content-Location": status_url}))
    server.on("GET", "/fhir/$export-poll-status", *status)
    sleeps: list[float] = []
    return BulkExport(client_of(server), ExportRequest(types=("Patient", "Procedure")), sleep=sleeps.append,
                      **options), sleeps


def manifest(server: FaultServer, *urls: str, errors: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"transactionTime": "2026-04-01T12:00:00Z", "requiresAccessToken": True,
            "output": [{"type": "Patient", "url": url} for url in urls],
            "error": [{"type": "OperationOutcome", "url": url} for url in errors]}


def test_kick_off_poll_and_download(server: FaultServer, tmp_path: Path) -> None:
    """The kick-off asks for an async NDJSON export of the types; polling waits what Retry-After says (else
    doubling from 1 s); every file is downloaded in manifest order; the job is released with DELETE."""
    files = {"a": '{"resourceType":"Patient","id":"p1"}\n', "b": '{"resourceType":"Patient","id":"p2"}\n'}
    for name, text in files.items():
        server.on("GET", f"/fhir/Binary/{name}", Reply(body=text, content_type=NDJSON))
    issue = {"resourceType": "OperationOutcome",
             "issue": [{"severity": "error", "code": "processing", "diagnostics": "Patient/p9 could not be read"}]}
    server.on("GET", "/fhir/Binary/e", Reply(body=json.dumps(issue) + "\n", content_type=NDJSON))
    export, sleeps = exporting(server, [
        Reply(202, headers={"Retry-After": "3", "X-Progress": "50% done"}),
        Reply(202),
        Reply(body=manifest(server, f"{server.url}/Binary/a", f"{server.url}/Binary/b",
                            errors=(f"{server.url}/Binary/e",)), content_type="application/json"),
    ])
    seen_progress: list[str] = []
    export.progress = seen_progress.append
    result = export.run(tmp_path)
    kick = server.seen("GET", "/fhir/$export")[0]
    assert kick.headers["Prefer"] == "respond-async" and kick.headers["Accept"] == "application/fhir+json"
    assert kick.query == {"_outputFormat": [NDJSON], "_type": ["Patient,Procedure"]}
    assert sleeps == [3.0, 2.0] and seen_progress == ["50% done"]
    assert [p.read_text() for p in result.files] == [files["a"], files["b"]]
    assert [p.name for p in result.files] == ["0000-Patient.ndjson", "0001-Patient.ndjson"]
    assert result.errors == ["Patient/*** could not be read"]
    assert server.seen("GET", "/fhir/Binary/a")[0].headers["Accept"] == NDJSON
    assert len(server.seen("DELETE", "/fhir/$export-poll-status")) == 1


def test_a_long_retry_after_is_cut_to_the_longest_wait(server: FaultServer, tmp_path: Path) -> None:
    export, sleeps = exporting(server, [Reply(202, headers={"Retry-After": "120"}),
                                        Reply(body=manifest(server), content_type="application/json")], max_wait=5)
    export.run(tmp_path)
    assert sleeps == [5.0]


def test_a_status_url_on_another_server_is_refused(server: FaultServer, tmp_path: Path) -> None:
    server.on("GET", "/fhir/$export", Reply(202, headers={"Content-Location": "http://elsewhere.example:8080/fhir/s?x=1"}))
    export = BulkExport(client_of(server), sleep=lambda _: None)
    with pytest.raises(UnsafeLinkError, match=r"status URL on another server \(http://elsewhere.example:8080/fhir/s\)"):
        export.run(tmp_path)
    assert [r.path for r in server.requests] == ["/fhir/metadata", "/fhir/$export"]


def test_a_file_url_on_another_server_is_refused_and_the_export_released(server: FaultServer, tmp_path: Path) -> None:
    export, _ = exporting(server, [Reply(body=manifest(server, "https://cdn.example/file.ndjson"),
                                         content_type="application/json")])
    with pytest.raises(UnsafeLinkError, match="export file on another server"):
        export.run(tmp_path)
    assert len(server.seen("DELETE", "/fhir/$export-poll-status")) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_500_while_polling_fails_the_export_with_the_servers_reason(server: FaultServer, tmp_path: Path) -> None:
    export, _ = exporting(server, [Reply(202), Reply(500, outcome("job store unavailable"))])
    with pytest.raises(ExportFailed, match=r"the export failed \(status answered HTTP 500: job store unavailable\)"):
        export.run(tmp_path)
    assert len(server.seen("DELETE", "/fhir/$export-poll-status")) == 1


def test_an_export_that_takes_too_long_is_cancelled(server: FaultServer, tmp_path: Path) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    export, _ = exporting(server, [Reply(202, headers={"Retry-After": "30", "X-Progress": "queued"})],
                          timeout=100, clock=lambda: now[0])
    export.sleep = sleep
    with pytest.raises(ExportFailed, match=r"did not finish within 100 s \(last progress: queued\)"):
        export.run(tmp_path)
    assert len(server.seen("DELETE", "/fhir/$export-poll-status")) >= 1


def test_a_server_without_export_is_named_with_what_to_do_instead(tmp_path: Path) -> None:
    with FaultServer() as server:
        server.on("GET", "/fhir/metadata", Reply(body=capabilities(export=False)))
        with pytest.raises(ExportUnsupported) as caught:
            BulkExport(client_of(server)).run(tmp_path)
        assert str(caught.value).startswith(f"FHIR server at {server.url} does not support Bulk Data $export")
        assert "backfill PATH" in str(caught.value)
        assert not server.seen("GET", "/fhir/$export")


def test_a_kick_off_refused_with_4xx_is_reported_as_unsupported(server: FaultServer, tmp_path: Path) -> None:
    server.on("GET", "/fhir/$export", Reply(403, outcome("bulk export is not enabled for this client")))
    with pytest.raises(ExportUnsupported, match="kick-off answered HTTP 403: bulk export is not enabled"):
        BulkExport(client_of(server)).run(tmp_path)


def test_backfill_from_a_server_without_export_exits_2_naming_the_server() -> None:
    with FaultServer() as server:
        server.on("GET", "/fhir/metadata", Reply(body=capabilities(export=False)))
        result = CliRunner().invoke(cli, ["backfill", "--server", server.url])
    assert result.exit_code == 2
    assert f"error: FHIR server at {server.url} does not support Bulk Data $export" in result.stderr
    assert "charge-adapter backfill PATH" in result.stderr


def test_patient_level_export_needs_the_operation_on_patient(server: FaultServer, tmp_path: Path) -> None:
    def kicked(request: Seen) -> Reply:
        raise AssertionError("no kick-off without the operation")

    server.on("GET", "/fhir/Patient/$export", kicked)
    with pytest.raises(ExportUnsupported, match="no export operation at Patient"):
        BulkExport(client_of(server), ExportRequest(level="patient")).run(tmp_path)
