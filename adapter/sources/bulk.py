"""FHIR Bulk Data `$export` from the configured server: kick-off, status polling, NDJSON downloads to a folder.

The asynchronous request pattern of the Bulk Data Access IG: `GET [base]/$export` (or `Patient/$export`) with
`Prefer: respond-async` answers 202 with a status URL in `Content-Location`; polling it answers 202 (with
`X-Progress` and `Retry-After`) until the export is done, then 200 with a JSON manifest listing NDJSON files.
Every request goes through `FhirClient` (its retries, credentials and TLS settings), and the status URL and the
file URLs must point at the configured server, or they are refused: credentials are never sent elsewhere.
Files are streamed to disk, so an export of any size costs no memory.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from adapter import redact
from adapter.client import FhirClient
from adapter.client.errors import FhirHttpError, UnsafeLinkError, http_error, outcome_text, safe_url
from adapter.client.retry import parse_retry_after
from adapter.errors import FhirError

log = logging.getLogger("adapter.bulk")

NDJSON = "application/fhir+ndjson"
EXPORT_TYPES = ("Patient", "Procedure", "Encounter", "BodyStructure", "Condition", "Coverage", "Account",
                "Practitioner", "PractitionerRole", "Organization", "Location", "ServiceRequest",
                "ChargeItemDefinition")
"""What the engine reads (docs/input-contract.md, section 1): the default `_type` of an export."""


class ExportUnsupported(FhirError):
    """The server does not offer `$export` (not in its CapabilityStatement, or refused at kick-off)."""


class ExportFailed(FhirError):
    """The server accepted the export but did not finish it (an error status, or it took too long)."""


@dataclass(frozen=True)
class ExportRequest:
    level: str = "system"
    """`system` (`[base]/$export`: every resource, shared ones such as Practitioners included) or `patient`
    (`[base]/Patient/$export`: the Patient compartment only)."""
    types: Sequence[str] = EXPORT_TYPES
    since: str | None = None
    type_filters: Sequence[str] = ()

    def params(self) -> list[tuple[str, str]]:
        found = [("_outputFormat", NDJSON)]
        if self.types:
            found.append(("_type", ",".join(self.types)))
        if self.since:
            found.append(("_since", self.since))
        found += [("_typeFilter", f) for f in self.type_filters]
        return found


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    """The NDJSON files of `output`, in manifest order (their names sort in that order)."""
    errors: list[str] = field(default_factory=list)
    """Issues from the manifest's `error` files (OperationOutcomes), patient references scrubbed."""
    transaction_time: str | None = None
    resources: int = 0
    bytes: int = 0


_PROGRESS_LIMIT = 200


class BulkExport:
    """One export from `client`'s server. `max_wait` caps one wait between polls (a server's `Retry-After` is
    honoured up to it: HAPI says 120 s whatever the job's size); `timeout` bounds the whole export."""

    def __init__(self, client: FhirClient, request: ExportRequest | None = None, *, max_wait: float = 60.0,
                 timeout: float = 6 * 3600.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 progress: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.request = request or ExportRequest()
        self.max_wait = max_wait
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock
        self.progress = progress

    @property
    def server(self) -> str:
        return safe_url(self.client.base_url)

    def _unsupported(self, why: str) -> ExportUnsupported:
        return ExportUnsupported(f"FHIR server at {self.server} does not support Bulk Data $export ({why}); "
                                 "export the data another way and run `charge-adapter backfill PATH...` on the "
                                 "NDJSON files")

    def check_supported(self) -> None:
        """The CapabilityStatement must name the `export` operation at the chosen level."""
        statement = self.client.capabilities()
        rests = [r for r in statement.get("rest") or [] if isinstance(r, dict)]
        if self.request.level == "system":
            names = {o.get("name") for r in rests for o in r.get("operation") or [] if isinstance(o, dict)}
        else:
            names = {o.get("name") for r in rests for res in r.get("resource") or []
                     if isinstance(res, dict) and res.get("type") == "Patient"
                     for o in res.get("operation") or [] if isinstance(o, dict)}
        if "export" not in names:
            where = "the system level" if self.request.level == "system" else "Patient"
            raise self._unsupported(f"its CapabilityStatement names no export operation at {where}")

    def kick_off(self) -> str:
        """Start the export; returns its status URL."""
        path = "$export" if self.request.level == "system" else "Patient/$export"
        response = self.client.request("GET", path, params=self.request.params(),
                                       headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        with response:
            if 400 <= response.status_code < 500:
                reason = outcome_text(_json(response)) or response.reason or ""
                raise self._unsupported(f"kick-off answered HTTP {response.status_code}"
                                        + (f": {redact.scrub(reason)}" if reason else ""))
            if response.status_code != 202:
                raise self._error(response, "kick-off")
            location = response.headers.get("Content-Location")
        if not location:
            raise ExportFailed(f"FHIR server at {self.server}: the export kick-off answered 202 without a "
                               "Content-Location (status URL)")
        try:
            return self.client.check_link(location)
        except UnsafeLinkError:
            raise UnsafeLinkError(f"FHIR server at {self.server} gave an export status URL on another server "
                                  f"({safe_url(location)}); not followed") from None

    def wait(self, status_url: str) -> dict[str, Any]:
        """Poll until the export is done; returns its manifest."""
        started = self.clock()
        delay = 1.0
        while True:
            response = self.client.request("GET", status_url, headers={"Accept": "application/json"})
            with response:
                if response.status_code == 200:
                    manifest = _json(response)
                    if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                        raise ExportFailed(f"FHIR server at {self.server}: the finished export's status answer "
                                           "is not a Bulk Data manifest (no output list)")
                    return manifest
                if response.status_code != 202:
                    raise self._error(response, "status")
                progress = (response.headers.get("X-Progress") or "").strip()[:_PROGRESS_LIMIT]
                told = parse_retry_after(response.headers.get("Retry-After"))
            if progress and self.progress is not None:
                self.progress(redact.scrub(progress))
            wait = min(self.max_wait, told if told is not None else delay)
            delay = min(self.max_wait, delay * 2)
            if self.clock() - started + wait > self.timeout:
                self._cancel(status_url)
                raise ExportFailed(f"FHIR server at {self.server}: the export did not finish within "
                                   f"{self.timeout:.0f} s (last progress: {progress or 'none given'}); it was "
                                   "cancelled")
            self.sleep(max(wait, 0.0))

    def download(self, manifest: dict[str, Any], folder: Path) -> ExportResult:
        """Every output file to `folder` (`NNNN-Type.ndjson`, manifest order), then the error files' issues."""
        folder.mkdir(parents=True, exist_ok=True)
        result = ExportResult(transaction_time=manifest.get("transactionTime"))
        outputs = [o for o in manifest.get("output") or [] if isinstance(o, dict) and o.get("url")]
        for n, item in enumerate(outputs):
            kind = re.sub(r"[^A-Za-z]", "", str(item.get("type") or "unknown")) or "unknown"
            target = folder / f"{n:04d}-{kind}.ndjson"
            result.bytes += self._fetch(str(item["url"]), target)
            result.files.append(target)
            if isinstance(item.get("count"), int):
                result.resources += item["count"]
        for n, item in enumerate(o for o in manifest.get("error") or [] if isinstance(o, dict) and o.get("url")):
            target = folder / f"errors-{n:04d}.ndjson"
            self._fetch(str(item["url"]), target)
            result.errors += _issues(target)
        return result

    def _fetch(self, url: str, target: Path) -> int:
        try:
            return self.client.download(url, target, accept=NDJSON)
        except UnsafeLinkError:
            raise UnsafeLinkError(f"FHIR server at {self.server} listed an export file on another server "
                                  f"({safe_url(url)}); not downloaded") from None

    def run(self, folder: Path) -> ExportResult:
        """Check, kick off, wait, download; the export is cancelled on the server when this fails half way."""
        self.check_supported()
        status_url = self.kick_off()
        log.info("export started on %s", self.server)
        try:
            manifest = self.wait(status_url)
            result = self.download(manifest, folder)
        except BaseException:
            self._cancel(status_url)
            raise
        self._cancel(status_url)  # done: the server may drop the files now
        return result

    def _cancel(self, status_url: str) -> None:
        """DELETE on the status URL: cancels a running export, or lets the server clean up a finished one."""
        try:
            self.client.request("DELETE", status_url).close()
        except (FhirError, requests.RequestException) as exc:
            log.info("could not release the export on %s: %s", self.server, redact.scrub(str(exc)))

    def _error(self, response: requests.Response, step: str) -> FhirError:
        body = _json(response)
        outcome = body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
        error = http_error(response.status_code, response.url or self.client.base_url, "GET", outcome,
                           fallback_text=response.reason or "")
        if isinstance(error, FhirHttpError) and step == "status":
            return ExportFailed(f"FHIR server at {self.server}: the export failed (status answered HTTP "
                                f"{response.status_code}" + (f": {redact.scrub(error.outcome_text)}"
                                                             if error.outcome_text else "") + ")")
        return error


def _json(response: requests.Response) -> Any:
    try:
        return json.loads(response.content) if response.content else None
    except ValueError:
        return None


def _issues(path: Path) -> list[str]:
    found: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                outcome = json.loads(line)
            except ValueError:
                continue
            text = outcome_text(outcome)
            if text:
                found.append(redact.scrub(text))
    return found
