"""Whether a ChargeItem or Claim on the server is still ours to change, told by the resource itself.

Every resource the adapter writes to a server carries a fingerprint: a hash of its content as written (the
`written-fingerprint` extension of our conformance package). A copy whose content still hashes to its
fingerprint is exactly as we left it; one that does not was changed by someone else since (a coder, a billing
system). The marker travels with the resource, so a stateless `sync`, `backfill --write`, `run` on a fresh
state and a server restored from a backup (whose version numbers repeat) all judge ownership alike. An
extension is content: servers keep it where some drop `meta.tag` or `meta.source`.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from adapter.billing.parties import CONTAINED_PROVIDER
from adapter.building.resources import WRITE_TIME_FIELDS

FINGERPRINT_NAME = "written-fingerprint"
"""The last path segment of the fingerprint extension's URL (`{canonical_base}/StructureDefinition/...`)."""
FINGERPRINT_PREFIX = "sha256:"
SERVER_MANAGED = ("id", "meta", "text")
OURS_TO_SET = {"ChargeItem": frozenset({"billable", "planned"}), "Claim": frozenset({"active", "draft"})}
"""Statuses we may still change: a ChargeItem `billed` (or anything else) has passed to billing."""
VOID_STATUS = {"ChargeItem": "entered-in-error", "Claim": "cancelled"}


class Standing(Enum):
    """Where a resource we once wrote stands now."""

    OURS = "ours"
    """As we wrote it, with a status still ours to set: may be updated or voided in place."""
    VOIDED_BY_US = "voided-by-us"
    """Voided (entered-in-error / cancelled) by us and untouched since: may be brought back in place."""
    PASSED_ON = "passed-on"
    """Billed (ChargeItem `billed`), or answered by a payer (a ClaimResponse refers to the Claim): corrected
    only by a credit (ChargeItem) or a replacement Claim, never changed."""
    VOIDED_BY_OTHERS = "voided-by-others"
    """Set entered-in-error (or cancelled) by someone else: respected until the coding changes."""
    EDITED = "edited"
    """Changed by someone else (content no longer matches its fingerprint): their edit wins."""


def _is_fingerprint(extension: Any) -> bool:
    return isinstance(extension, dict) and str(extension.get("url", "")).endswith("/" + FINGERPRINT_NAME)


def _is_original(extension: Any) -> bool:
    """Claim frequency 1 (original): it says what a Claim without a frequency said before releases wrote one, so
    a Claim written without it is not changed (nor replaced, once answered) just for its arrival."""
    return (isinstance(extension, dict) and str(extension.get("url", "")).endswith("/claim-frequency")
            and (extension.get("valueCoding") or {}).get("code") == "1")


def _normalized(value: Any) -> Any:
    """Numbers as a server may give them back (`150.0` for `150`), so a round trip keeps the hash."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def payload(resource: dict[str, Any]) -> dict[str, Any]:
    """What a resource says, as far as ownership and reconciliation compare: all but the server-managed elements
    (id, meta), the narrative (generated from the rest), the time of writing, the fingerprint itself and an
    original claim's frequency 1."""
    skip = (*SERVER_MANAGED, WRITE_TIME_FIELDS.get(resource.get("resourceType", ""), ""))
    out = {k: v for k, v in resource.items() if k not in skip}
    extensions = out.get("extension")
    if isinstance(extensions, list) and any(_is_fingerprint(e) or _is_original(e) for e in extensions):
        kept = [e for e in extensions if not _is_fingerprint(e) and not _is_original(e)]
        if kept:
            out["extension"] = kept
        else:
            del out["extension"]
    return out


def fingerprint(resource: dict[str, Any]) -> str:
    """The hash of what `resource` says (`payload`), stable across key order and number spelling."""
    text = json.dumps(_normalized(payload(resource)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return FINGERPRINT_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def recorded_fingerprint(resource: dict[str, Any]) -> str | None:
    for extension in resource.get("extension") or []:
        if _is_fingerprint(extension) and isinstance(extension.get("valueString"), str):
            return str(extension["valueString"])
    return None


def stamped(resource: dict[str, Any], url: str) -> dict[str, Any]:
    """A copy of `resource` carrying the fingerprint of its content (the last extension; any older one replaced).
    The key order stays: `extension` goes where R4 puts it (after `text`), when the resource had none."""
    mark = {"url": url, "valueString": fingerprint(resource)}
    out: dict[str, Any] = {}
    placed = False
    for key, value in resource.items():
        if key == "extension":
            out[key] = [*(e for e in value if not _is_fingerprint(e)), mark]
            placed = True
        elif key == "identifier" and not placed:
            out["extension"] = [mark]
            out[key] = value
            placed = True
        else:
            out[key] = value
    if not placed:
        out["extension"] = [mark]
    return out


def _contains_provider(claim: dict[str, Any]) -> bool:
    provider = claim.get("provider")
    return isinstance(provider, dict) and provider.get("reference") == f"#{CONTAINED_PROVIDER}"


def without_contained_provider(claim: dict[str, Any]) -> dict[str, Any]:
    """`claim` as releases before the contained billing provider wrote it: Claim.provider the logical reference
    (type, identifier, display) without `#billing-provider`, and that Organization not contained."""
    if not _contains_provider(claim):
        return claim
    out = {k: v for k, v in claim.items() if k != "contained"}
    kept = [c for c in claim.get("contained") or [] if not (isinstance(c, dict) and c.get("id") == CONTAINED_PROVIDER)]
    if kept:
        out["contained"] = kept
    out["provider"] = {k: v for k, v in claim["provider"].items() if k != "reference"}
    return out


def same_content(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Equal but for server-managed elements, the narrative, the time of writing and the fingerprint:
    re-coding the same input is never a change.

    A Claim written before the billing provider was contained in it is compared with the wanted Claim as that
    release wrote it (`without_contained_provider`): its arrival alone neither updates a Claim that is still
    ours nor replaces an answered one; a change of anything else writes the whole new Claim, contained provider
    and all. Once a Claim holds it, the contained Organization is content like any other."""
    said = payload(existing)
    if said == payload(wanted):
        return True
    return (existing.get("resourceType") == "Claim" and _contains_provider(wanted) and not _contains_provider(existing)
            and said == payload(without_contained_provider(wanted)))


def standing(resource: dict[str, Any], answered: frozenset[str] | set[str] = frozenset()) -> Standing:
    """Where `resource` (a copy read from the server) stands. `answered`: `Claim/id` of the Claims a
    ClaimResponse refers to.

    Without a fingerprint (written by a release before fingerprints), the status alone decides: such a resource
    is ours while its status is ours to set, as it always was."""
    kind = resource.get("resourceType", "")
    status = resource.get("status")
    recorded = recorded_fingerprint(resource)
    unchanged = recorded is None or recorded == fingerprint(resource)
    if kind == "Claim" and f"Claim/{resource.get('id')}" in answered:
        return Standing.PASSED_ON
    if kind == "ChargeItem" and status == "billed":
        return Standing.PASSED_ON
    if status in ("entered-in-error", VOID_STATUS.get(kind)):
        return Standing.VOIDED_BY_US if unchanged else Standing.VOIDED_BY_OTHERS
    if status in OURS_TO_SET.get(kind, ()) and unchanged:
        return Standing.OURS
    return Standing.EDITED


_CHAIN = re.compile(r"^(?P<base>.+?)(?:-r(?P<generation>[2-9]|[1-9]\d+))?(?P<credit>-credit)?$")


@dataclass(frozen=True)
class ChainKey:
    """Where an identifier value stands in its line's chain: `base` (the engine's deterministic identifier),
    the generation (1 for the first write, n for the n-th replacement `base-rn`), and whether it is the
    credit of that generation (`...-credit`)."""

    base: str
    generation: int
    credit: bool


def chain_key(value: str) -> ChainKey:
    found = _CHAIN.match(value)
    assert found is not None  # `.+?` matches any non-empty value
    generation = int(found["generation"]) if found["generation"] else 1
    return ChainKey(found["base"], generation, bool(found["credit"]))


def generation_value(base: str, generation: int) -> str:
    return base if generation == 1 else f"{base}-r{generation}"


def credit_value(value: str) -> str:
    return f"{value}-credit"


@dataclass
class Chain:
    """Every resource on the server with one line's (or one session's Claim's) identifier chain."""

    base: str
    generations: dict[int, dict[str, Any]] = field(default_factory=dict)
    credits: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def current_generation(self) -> int:
        return max(self.generations, default=0)

    @property
    def current(self) -> dict[str, Any] | None:
        return self.generations.get(self.current_generation)

    @property
    def credited(self) -> bool:
        """The current generation has been offset by a credit."""
        return self.current_generation in self.credits


def identifier_value(resource: dict[str, Any], system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None
