"""The project's FHIR conformance package: the CPT-modifier extension and the identifier systems it writes.

It ships inside the Python package (`adapter/conformance/package/`, a FHIR NPM package for R4 4.0.1) under
the default canonical base. `export` writes it (re-based onto the configured `urls.canonical_base`) for
validators and IG tooling; `install` puts its resources on a FHIR server, idempotently: unchanged
resources are not written again.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.client import FhirClient
from adapter.config import DEFAULT_CANONICAL_BASE
from adapter.validation import validate_resource

PACKAGE_DIR = Path(__file__).resolve().parent / "package"
IGNORED_ON_COMPARE = ("id", "meta")


def _rebased(text: str, base: str) -> str:
    return text.replace(DEFAULT_CANONICAL_BASE, base.rstrip("/"))


def manifest(base: str = DEFAULT_CANONICAL_BASE) -> dict[str, Any]:
    """package.json, with the canonical base."""
    return json.loads(_rebased((PACKAGE_DIR / "package.json").read_text(encoding="utf-8"), base))


def resources(base: str = DEFAULT_CANONICAL_BASE) -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) of every conformance resource, re-based, each valid R4."""
    out = []
    for path in sorted(PACKAGE_DIR.glob("*.json")):
        if path.name == "package.json" or path.name.startswith("."):
            continue
        resource = json.loads(_rebased(path.read_text(encoding="utf-8"), base))
        validate_resource(resource, f"conformance resource {path.name}")
        out.append((path.name, resource))
    return out


def index_json(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The `.index.json` of an NPM package folder: what each file holds."""
    files = []
    for name, res in entries:
        item = {"filename": name, "resourceType": res["resourceType"], "id": res["id"]}
        for key in ("url", "version", "kind", "type"):
            if key in res:
                item[key] = res[key]
        files.append(item)
    return {"index-version": 1, "files": files}


def export(target: Path, base: str = DEFAULT_CANONICAL_BASE, *, tgz: bool = False) -> Path:
    """Write the package as a folder (package.json, .index.json, resources) or as `name-version.tgz`."""
    entries = resources(base)
    files = {"package.json": manifest(base), ".index.json": index_json(entries), **dict(entries)}
    if not tgz:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (target / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return target
    meta = files["package.json"]
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{meta['name']}-{meta['version']}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class InstallResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def _search_key(resource: dict[str, Any]) -> dict[str, str]:
    if resource["resourceType"] == "NamingSystem":
        return {"value": resource["uniqueId"][0]["value"]}
    return {"url": resource["url"]}


def install(client: FhirClient, base: str = DEFAULT_CANONICAL_BASE) -> InstallResult:
    """Create or update each conformance resource on the server, found by its canonical URL (NamingSystem:
    its unique id); a resource already there with the same content is left alone (no new version)."""
    result = InstallResult()
    for _, resource in resources(base):
        kind = resource["resourceType"]
        params = _search_key(resource)
        found = list(client.search_all(kind, params))
        label = f"{kind}/{resource['id']} ({next(iter(params.values()))})"
        if len(found) == 1 and _same(found[0], resource):
            result.unchanged.append(label)
            continue
        if found:
            body = {**resource, "id": found[0]["id"]}
            client.update(body)
        else:
            client.update(resource)
        result.written.append(label)
    return result


def _same(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k not in IGNORED_ON_COMPARE}  # noqa: E731
    return strip(existing) == strip(wanted)
