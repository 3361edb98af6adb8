"""The input's resources, and references resolved the way FHIR defines them, without I/O.

A resource is known by its canonical key `Type/id`. A reference may name it in any form FHIR allows and
still lead to the same key: relative `Type/id`, an absolute URL on a local base (see below), `urn:uuid:`/
`urn:oid:` and other absolute `fullUrl`s of a Bundle (FHIR R4 Bundle, "Resolving references in Bundles"), a
contained `#id`, a versioned `.../_history/n`, a conditional `Type?identifier=system|value`, or a
logical reference by identifier. When the input holds several copies of one resource, the newest version
wins (highest numeric `meta.versionId`, then latest `meta.lastUpdated`), whatever order they were read in.

An absolute URL `BASE/Type/id` is the local `Type/id` only when it is a Bundle entry's `fullUrl` (exactly, a
`/_history/n` aside) or when BASE is a local base: one of `config/input.yaml local_bases` or, online, the
FHIR server's base (compared with scheme and host in lower case, default ports and trailing slashes
dropped). Any other absolute URL names a resource on another server: it resolves to nothing (a patient
`Patient/x` on another hospital's server is not our `Patient/x`). A relative reference inside an entry
whose `fullUrl` is RESTful means `ENTRY_BASE/Type/id` and follows the same rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapter.extraction.modifiers import modifier_findings
from adapter.urls import normalize_base, normalize_bases


@dataclass(frozen=True, slots=True)
class SourcedResource:
    """A resource as read, and where it was read from (`file#entry[2]`, `file:4`). Defined here, where the
    index takes it in, so the sources that make one (adapter.sources) import downward."""

    resource: dict[str, Any]
    origin: str
    full_url: str | None = None
    """`Bundle.entry.fullUrl`: what `urn:uuid:` and absolute references inside the Bundle resolve against."""
    deleted: bool = False
    """A history entry that deletes the resource (`resource` then holds only type, id and versionId)."""
    modifier_free: bool = False
    """The text it was read from holds no `modifierExtension`: nothing in it needs looking for one."""



_TYPE_ID = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
_RESTFUL = re.compile(r"^(?:(?P<base>.*)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
                      r"(?:/_history/(?P<version>[^/]+))?/?$")
_CONDITIONAL = re.compile(r"^(?:.*/)?(?P<type>[A-Z][A-Za-z]+)\?identifier=(?P<value>[^&]+)$")



def local_reference(value: Any, local_bases: frozenset[str]) -> str | None:
    """`Type/id` of a Reference (dict) or reference string that names a resource of the local id space:
    relative, or absolute on one of `local_bases` (normalized, see `normalize_bases`). None for any other
    form (another server, `urn:uuid:`, contained, conditional, logical). For server data without Bundle context."""
    literal = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(literal, str):
        return None
    match = _RESTFUL.match(literal.strip())
    if match is None:
        return None
    base = match.group("base")
    if base and (normalize_base(base) or "") not in local_bases:
        return None
    return f"{match.group('type')}/{match.group('id')}"


def identifier_token(value: Any) -> tuple[str | None, str | None]:
    """(type, `system|value`) of a logical reference `{type, identifier}` or a conditional reference
    `Type?identifier=system|value`; (None, None) for any other Reference."""
    if not isinstance(value, dict):
        return None, None
    literal = value.get("reference")
    if isinstance(literal, str) and literal.strip():
        match = _CONDITIONAL.match(literal.strip())
        if match and "|" in match.group("value"):
            return match.group("type"), match.group("value")
        return None, None
    identifier, kind = value.get("identifier"), value.get("type")
    if isinstance(kind, str) and isinstance(identifier, dict) and identifier.get("value"):
        return kind, f"{identifier.get('system', '')}|{identifier['value']}"
    return None, None


def modifier_extensions(node: Any, path: str, known: frozenset[str]) -> list[str]:
    """`element.modifierExtension url` of every modifierExtension below `node` whose URL is not in `known`."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "modifierExtension" and isinstance(value, list):
                found += [f"{path}.modifierExtension {e.get('url') if isinstance(e, dict) else repr(e)}"
                          for e in value if not (isinstance(e, dict) and e.get("url") in known)]
            elif isinstance(value, dict | list):
                found += modifier_extensions(value, f"{path}.{key}", known)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += modifier_extensions(item, f"{path}[{i}]", known)
    return found


def parse_reference(reference: str) -> tuple[str, str] | None:
    """(type, id) of a relative, absolute or versioned literal reference; None when it is not one."""
    match = _TYPE_ID.search(reference.strip())
    return (match.group(1), match.group(2)) if match else None


def normalize_reference(reference: str) -> str:
    """`http://x/fhir/Patient/1/_history/2` -> `Patient/1`; other forms are returned unchanged."""
    parsed = parse_reference(reference)
    return f"{parsed[0]}/{parsed[1]}" if parsed else reference.strip()


def version_of(resource: dict[str, Any]) -> str:
    """`meta.versionId` as text ("" when the resource has none)."""
    return str((resource.get("meta") or {}).get("versionId", ""))


def seen_version(resource: dict[str, Any]) -> str:
    """What the poller's "seen" check keys a Procedure version on: `meta.versionId` and a hash of the content.

    A versionId alone is not enough: a server restored from a backup hands out the same version numbers
    again for other content. Re-delivered identical content still matches (and writes nothing); "" when the
    resource has no versionId (it is never recorded as seen)."""
    version = version_of(resource)
    if not version:
        return ""
    content = {k: v for k, v in resource.items() if k != "meta"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    return f"{version}#{digest[:20]}"


def reference_of(value: Any) -> str | None:
    """The target of a FHIR Reference dict without any context (literal, or logical by identifier).

    For server data, where every reference is `Type/id`. Input files go through `ResourceIndex.resolve`,
    which also understands `urn:uuid:`, contained and conditional references."""
    if not isinstance(value, dict):
        return None
    literal = value.get("reference")
    if isinstance(literal, str) and literal.strip():
        return normalize_reference(literal)
    identifier = value.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        kind = value.get("type", "")
        return f"{kind}?identifier={identifier.get('system', '')}|{identifier['value']}"
    return None


def _instant(value: Any) -> float:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return float("-inf")
    return float("-inf")


def version_rank(resource: dict[str, Any]) -> tuple[int, float]:
    """Orders copies of one resource: numeric `meta.versionId` first, then `meta.lastUpdated`."""
    meta = resource.get("meta") or {}
    version = str(meta.get("versionId", "")) if isinstance(meta, dict) else ""
    return (int(version) if version.isdigit() else -1,
            _instant(meta.get("lastUpdated")) if isinstance(meta, dict) else float("-inf"))


@dataclass(slots=True, eq=False)
class Entry:
    """One resource of the input with what its references resolve against."""

    key: str
    resource: dict[str, Any]
    origin: str
    full_url: str | None = None
    container: Entry | None = None
    """For a contained resource: the resource that contains it (its `#id` references resolve there)."""
    deleted: bool = False
    modifier_free: bool = False
    base: str | None = field(default=None, init=False)
    _unknown: tuple[frozenset[str], list[str]] | None = field(default=None, init=False, repr=False)
    """The server base of a RESTful `fullUrl` (relative references inside resolve against it)."""
    _modifiers: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        match = _RESTFUL.match(self.full_url) if self.full_url else None
        self.base = match.group("base") if match and match.group("base") else None

    def modifier_elements(self) -> list[str]:
        """The core modifier elements of the resource whose meaning cannot be applied (adapter.extraction.modifiers),
        computed once per entry; none for a delete."""
        if self.deleted:
            return []
        if self._modifiers is None:
            self._modifiers = modifier_findings(self.resource, self.key)
        return self._modifiers

    @property
    def root(self) -> Entry:
        return self.container.root if self.container else self

    def unknown_modifiers(self, known: frozenset[str]) -> list[str]:
        """`element url` of every modifierExtension in the resource whose URL is not in `known` (computed once
        per entry: many Procedures read one Encounter or Patient; none when its text held no modifierExtension)."""
        if self.modifier_free or self.deleted:
            return []
        if self._unknown is None or self._unknown[0] is not known:
            self._unknown = (known, modifier_extensions(self.resource, self.key, known))
        return self._unknown[1]


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a reference points at: `key` is the canonical identity (None when it has none),
    `entry` the target when the input holds it, `problem` why it could not be resolved."""

    written: str
    key: str | None
    entry: Entry | None = None
    problem: str = ""
    how: str = ""
    """How a form other than a plain relative `Type/id` was resolved (for `explain`); "" for a plain one."""

    @property
    def resource(self) -> dict[str, Any] | None:
        return self.entry.resource if self.entry and not self.entry.deleted else None

    @property
    def type(self) -> str | None:
        if self.entry is not None:
            return str(self.entry.resource.get("resourceType"))
        if self.key and "/" in self.key:
            return self.key.split("/", 1)[0].split("?", 1)[0]
        if self.key and "?" in self.key:
            return self.key.split("?", 1)[0] or None
        return None


@dataclass
class ResourceIndex:
    """The newest copy of every resource by key, and the means to resolve references between them."""

    entries: dict[str, Entry] = field(default_factory=dict)
    by_ref: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    """(reference, origin kept, origin not used) for each repeated copy of a resource."""
    superseded: dict[str, list[Entry]] = field(default_factory=dict)
    """Older versions, kept for version-specific references."""
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    """Keys with copies that differ but carry no version to tell which is newer: their origins."""
    without_id: list[SourcedResource] = field(default_factory=list)
    local_bases: frozenset[str] = frozenset()
    """Normalized bases whose absolute references are local `Type/id` (config local_bases; online, the server)."""
    _full_urls: dict[str, str] = field(default_factory=dict, repr=False)
    _contained: dict[str, Entry] = field(default_factory=dict, repr=False)
    _identifiers: dict[tuple[str, str, str], list[str]] | None = field(default=None, repr=False)
    _plain: dict[str, Resolved] = field(default_factory=dict, repr=False)
    """Resolutions of plain `Type/id` references outside any RESTful base (the common case), until the next add."""
    _coverages: dict[str, list[tuple[str, dict[str, Any]]]] | None = field(default=None, repr=False)
    _accounts: dict[str, list[str]] | None = field(default=None, repr=False)
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, resources: Iterable[SourcedResource], local_bases: Iterable[str] = ()) -> ResourceIndex:
        """The index of `resources`; absolute references on one of `local_bases` (base URLs) are local."""
        index = cls(local_bases=normalize_bases(local_bases))
        for item in resources:
            index.add(item)
        return index

    def add(self, item: SourcedResource) -> None:
        resource = item.resource
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            self.without_id.append(item)
            if item.full_url:  # still reachable by its fullUrl (its key is then the fullUrl itself)
                self._keep(Entry(item.full_url, resource, item.origin, item.full_url,
                                 modifier_free=item.modifier_free))
            return
        key = f"{resource['resourceType']}/{rid}"
        self._keep(Entry(key, resource, item.origin, item.full_url, deleted=item.deleted,
                         modifier_free=item.modifier_free))

    def _keep(self, entry: Entry) -> None:
        key = entry.key
        if entry.full_url:
            self._full_urls[_without_version(entry.full_url)] = key
        old = self.entries.get(key)
        self._identifiers = None
        self._plain.clear()
        self._coverages = None
        self._accounts = None
        self._memo.clear()
        if old is None:
            self._set(entry)
            return
        new_rank, old_rank = version_rank(entry.resource), version_rank(old.resource)
        if new_rank == old_rank and old.deleted == entry.deleted and old.resource == entry.resource:
            self.duplicates.append((key, old.origin, entry.origin))
            return
        if new_rank == old_rank:
            if old.deleted != entry.deleted:
                newer = entry.deleted  # at equal rank a delete wins: never bill what may be gone
            else:  # two different copies, nothing says which is newer: deterministic, and reported
                self.conflicts.setdefault(key, [old.origin]).append(entry.origin)
                newer = _canonical(entry.resource) > _canonical(old.resource)
        else:
            newer = new_rank > old_rank
        kept, dropped = (entry, old) if newer else (old, entry)
        self.duplicates.append((key, kept.origin, dropped.origin))
        self.superseded.setdefault(key, []).append(dropped)
        if newer:
            self._set(entry)

    def _set(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.origins[entry.key] = entry.origin
        if entry.deleted:
            self.by_ref.pop(entry.key, None)
        else:
            self.by_ref[entry.key] = entry.resource

    # ------------------------------------------------------------------------------------------ lookups
    def get(self, reference: str | None) -> dict[str, Any] | None:
        """The current resource of a canonical key (`Type/id`)."""
        return self.by_ref.get(reference) if reference else None

    def entry(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def key_of(self, value: Any, referrer: str | None = None) -> str | None:
        """The canonical key of a Reference written inside the resource `referrer` (a key), in any form."""
        return self.resolve(value, self.entries.get(referrer) if referrer else None).key

    def of_type(self, resource_type: str) -> list[tuple[str, dict[str, Any]]]:
        prefix = resource_type + "/"
        return [(ref, res) for ref, res in self.by_ref.items() if ref.startswith(prefix)]

    def resolve(self, value: Any, referrer: Entry | None = None) -> Resolved:
        """Resolve a Reference (dict) or a reference string written inside `referrer`."""
        if isinstance(value, dict) and isinstance(value.get("reference"), str):  # fast path: seen before
            hit = self._plain.get(value["reference"])
            if hit is not None and (referrer is None or referrer.root.base is None):
                return hit
        if isinstance(value, str):
            return self._literal(value.strip(), referrer, None)
        if not isinstance(value, dict):
            return Resolved("", None, problem="is not a Reference")
        literal = value.get("reference")
        kind = value.get("type") if isinstance(value.get("type"), str) else None
        if isinstance(literal, str) and literal.strip():
            return self._literal(literal.strip(), referrer, kind)
        identifier = value.get("identifier")
        if isinstance(identifier, dict) and identifier.get("value"):
            return self._by_identifier(kind, str(identifier.get("system", "")), str(identifier["value"]))
        return Resolved("", None, problem="has neither a reference nor an identifier")

    def _literal(self, text: str, referrer: Entry | None, kind: str | None) -> Resolved:
        plain = referrer is None or referrer.root.base is None  # the answer does not depend on the referrer
        if plain and text in self._plain:
            return self._plain[text]
        found = self._resolve_literal(text, referrer)
        if plain and found.key is not None and not text.startswith("#") and "/_history/" not in text:
            self._plain[text] = found
        return found

    def _resolve_literal(self, text: str, referrer: Entry | None) -> Resolved:
        if text.startswith("#"):
            return self._contained_target(text, referrer)
        if "?" in text:
            match = _CONDITIONAL.match(text)
            if not match or "|" not in match.group("value"):
                return Resolved(text, None, problem=f"conditional reference {text} cannot be resolved: only "
                                                    "Type?identifier=system|value is understood")
            system, value = match.group("value").split("|", 1)
            return self._by_identifier(match.group("type"), system, value)
        match = _RESTFUL.match(text)
        if match is None:  # urn:uuid:, urn:oid: or another absolute URI: only a fullUrl can match it
            key = self._full_urls.get(text)
            if key is None:
                return Resolved(text, None, problem=f"{text} matches no Bundle entry fullUrl in the input")
            return Resolved(text, key, self.entries.get(key), how="the fullUrl of a Bundle entry")
        key = f"{match.group('type')}/{match.group('id')}"
        base = match.group("base")
        how = ""
        if base and "://" in base:
            found = self._full_urls.get(_without_version(text))
            if found is not None:
                key, how = found, "the fullUrl of a Bundle entry"
            elif self.is_local(base):
                how = f"on the local base {normalize_base(base)}"
            else:
                return Resolved(text, None, problem=self._elsewhere(base))
        elif referrer is not None and referrer.root.base:
            entry_base = referrer.root.base
            found = self._full_urls.get(f"{entry_base}/{key}")
            if found is not None:
                key, how = found, f"relative to its entry's fullUrl base {entry_base}"
            elif "://" in entry_base and not self.is_local(entry_base):
                return Resolved(text, None, problem=f"relative to the fullUrl of {referrer.root.key}, it means "
                                                    f"{entry_base}/{key}, " + self._elsewhere(entry_base))
        entry = self.entries.get(key)
        version = match.group("version")
        if version:
            how = f"version {version}" + (f", {how}" if how else "")
            if entry is not None and version_of(entry.resource) not in ("", version):
                entry = next((e for e in self.superseded.get(key, []) if version_of(e.resource) == version), entry)
        return Resolved(text, key, entry, how=how)

    def is_local(self, base: str) -> bool:
        """Whether an absolute reference on `base` names the local resource of the same `Type/id`."""
        normalized = normalize_base(base)
        return normalized is not None and normalized in self.local_bases

    def _elsewhere(self, base: str) -> str:
        bases = ", ".join(sorted(self.local_bases)) or "none"
        return (f"on another server ({base}): no Bundle entry has it as fullUrl and that base is not local "
                f"(config/input.yaml local_bases and, online, the FHIR server's: {bases}); it may be another "
                "patient's or provider's resource")

    def _contained_target(self, text: str, referrer: Entry | None) -> Resolved:
        if referrer is None:
            return Resolved(text, None, problem=f"contained reference {text} outside a resource")
        container = referrer.root
        wanted = text[1:]
        if not wanted:  # "#" is the containing resource itself
            return Resolved(text, container.key, container, how="the resource that contains it")
        key = f"{container.key}#{wanted}"
        found = self._contained.get(key)
        if found is None:
            for res in container.resource.get("contained") or []:
                if isinstance(res, dict) and res.get("id") == wanted:
                    found = Entry(key, res, container.origin, None, container, modifier_free=container.modifier_free)
                    self._contained[key] = found
                    break
        if found is None:
            return Resolved(text, None, problem=f"{text} names no contained resource of {container.key}")
        return Resolved(text, key, found, how=f"contained in {container.key}")

    def _by_identifier(self, kind: str | None, system: str, value: str) -> Resolved:
        written = f"{kind or ''}?identifier={system}|{value}"
        found = self._identifier_matches(kind, system, value)
        if len(found) == 1:
            return Resolved(written, found[0], self.entries[found[0]], how="the one resource with that identifier")
        if len(found) > 1:
            return Resolved(written, None, problem=f"{written} matches {len(found)} resources: "
                                                   f"{', '.join(sorted(found))}")
        # not in the input: the logical reference itself is the identity (a server may still resolve it)
        return Resolved(written, written if kind else None,
                        problem=f"no resource with identifier {system}|{value} in the input",
                        how="a logical reference: no resource of the input has that identifier")

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per key until the next resource is added (what many Procedures derive alike)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def accounts_of(self, patient: str) -> list[str]:
        """The active Accounts whose `subject` names the patient (any reference form), sorted."""
        if self._accounts is None:
            grouped: dict[str, set[str]] = {}
            for ref, account in self.of_type("Account"):
                if account.get("status") != "active":
                    continue
                for subject in account.get("subject") or []:
                    owner = self.resolve(subject, self.entries[ref]).key
                    if owner:
                        grouped.setdefault(owner, set()).add(ref)
            self._accounts = {owner: sorted(refs) for owner, refs in grouped.items()}
        return self._accounts.get(patient, [])

    def _identifier_matches(self, kind: str | None, system: str, value: str) -> list[str]:
        """Keys of the current resources carrying the identifier (once per matching element, for a `kind`)."""
        if self._identifiers is None:
            self._identifiers = {}
            for key, entry in self.entries.items():
                if not entry.deleted:
                    for triple in identifier_triples(entry.resource):
                        self._identifiers.setdefault(triple, []).append(key)
        if kind:
            return self._identifiers.get((kind, system, value), [])
        return sorted({k for (_, s, v), keys in self._identifiers.items() if (s, v) == (system, value) for k in keys})

    def active_coverages(self, patient: str) -> list[tuple[str, dict[str, Any]]]:
        """The patient's active Coverages (beneficiary in any reference form), in claim order."""
        if self._coverages is None:
            self._coverages = self.coverages_by_beneficiary(self.of_type("Coverage"))
        return self._coverages.get(patient, [])

    def coverages_by_beneficiary(self, coverages: Iterable[tuple[str, dict[str, Any]]]
                                 ) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Active Coverages by resolved beneficiary, each list in claim order (`order`, then key)."""
        grouped: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for ref, cov in coverages:
            beneficiary = self.resolve(cov.get("beneficiary"), self.entries[ref]).key
            if cov.get("status") == "active" and beneficiary:
                grouped.setdefault(beneficiary, []).append((ref, cov))
        for found in grouped.values():
            found.sort(key=lambda rc: (rc[1].get("order", 1 << 30), rc[0]))
        return grouped


def identifier_triples(resource: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(resourceType, system, value) of each identifier element with a value: what logical references match."""
    kind = str(resource.get("resourceType"))
    return [(kind, str(ident.get("system", "")), str(ident["value"]))
            for ident in resource.get("identifier") or [] if isinstance(ident, dict) and ident.get("value")]


def _without_version(url: str) -> str:
    return url.split("/_history/", 1)[0]


def _canonical(resource: dict[str, Any]) -> str:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"))
