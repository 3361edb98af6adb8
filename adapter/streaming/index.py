"""A `ResourceIndex` that reads the store instead of holding the input: the engine codes a batch of patients
against it exactly as it codes a whole input against the in-memory index.

Only lookups by key change where the answer comes from; reference resolution is `ResourceIndex`'s own code.
The few places that list resources of a type are scoped to the batch: the Coverages and Accounts of its
patients, every ChargeItemDefinition. Any other listing raises, so a new rule that scans the whole input
cannot silently see less here than in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adapter.extraction.index import Entry, ResourceIndex
from adapter.streaming.store import Store, Versions

SCOPED_TYPES = ("Coverage", "Account")
"""Types the engine lists by owner (Coverage.beneficiary, Account.subject): a batch sees its patients' ones."""


class _Entries:
    """`ResourceIndex.entries` read from the store, each key loaded once per batch."""

    def __init__(self, index: StoredIndex) -> None:
        self.index = index

    def get(self, key: str | None, default: Any = None) -> Entry | None:
        if key is None:
            return default
        found = self.index.load(key)
        return default if found is None else found.entry

    def __getitem__(self, key: str) -> Entry:
        found = self.get(key)
        if found is None and not self.index.keys_only:  # keys only: a match by identifier needs no entry
            raise KeyError(key)
        return found  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def items(self) -> Any:
        raise NotImplementedError("the streaming index cannot list every resource of the input")


class _PerKey:
    """`ResourceIndex.superseded` / `.conflicts` read from the store: one field of a key's stored `Versions`
    (older copies; origins of copies that differ at the same version), present only where it is not empty."""

    def __init__(self, index: StoredIndex, field: str) -> None:
        self.index = index
        self.field = field

    def get(self, key: str, default: Any = None) -> Any:
        found = self.index.load(key)
        value = getattr(found, self.field) if found is not None else None
        return value if value else default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.get(key))

    def __getitem__(self, key: str) -> Any:
        found = self.get(key)
        if not found:
            raise KeyError(key)
        return found

    def items(self) -> Any:
        raise NotImplementedError(f"the streaming index cannot list every key's {self.field} (the run reports them)")


class _Origins:
    def __init__(self, index: StoredIndex) -> None:
        self.index = index

    def get(self, key: str, default: Any = None) -> str | Any:
        found = self.index.load(key)
        return found.entry.origin if found is not None else default


class _FullUrls:
    """`ResourceIndex._full_urls`: fullUrl (without `_history`) -> key of the last copy read with it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[str, str | None] = {}

    def get(self, url: str, default: Any = None) -> str | Any:
        if url not in self.cache:
            self.cache[url] = self.store.key_of_url(url)
        found = self.cache[url]
        return default if found is None else found


class StoredIndex(ResourceIndex):
    """The store seen as one batch's index. `owners` are the batch's patients (the keys their Procedures'
    subjects resolve to): Coverages and Accounts are listed for them. `keys_only` answers every entry lookup
    with None: enough to learn the key a reference resolves to, without reading its target."""

    def __init__(self, store: Store, owned: dict[str, list[str]] | None = None, *, keys_only: bool = False,
                 definitions: list[tuple[str, dict[str, Any]]] | None = None,
                 local_bases: frozenset[str] = frozenset()) -> None:
        super().__init__(local_bases=local_bases)
        self.store = store
        self.keys_only = keys_only
        self._owned = owned or {}
        self._definitions = definitions
        self._loaded: dict[str, Versions | None] = {}
        self.entries = _Entries(self)  # type: ignore[assignment]
        self.superseded = _PerKey(self, "superseded")  # type: ignore[assignment]
        self.conflicts = _PerKey(self, "conflicts")  # type: ignore[assignment]
        self.origins = _Origins(self)  # type: ignore[assignment]
        self._full_urls = _FullUrls(store)  # type: ignore[assignment]

    def load(self, key: str) -> Versions | None:
        """The entry of a key with its older copies, read once per batch (the same objects every time, as
        the engine compares entries by identity)."""
        if self.keys_only:
            return None
        if key not in self._loaded:
            found = self.store.current(key)
            if found is None:
                self._loaded[key] = None
            else:
                copy, copies = found
                entry = copy.entry()
                assert entry is not None
                self._loaded[key] = self.store.versions(key) if copies > 1 else Versions(entry, [], None)
        return self._loaded[key]

    def preload(self, entries: Iterable[Versions]) -> None:
        for found in entries:
            self._loaded[found.entry.key] = found

    def forget(self) -> None:
        """Drop what lookups cached (the owner pass resolves millions of references with one index)."""
        self._plain.clear()
        self._contained.clear()
        self._full_urls.cache.clear()  # type: ignore[attr-defined]
        self._loaded.clear()

    def get(self, reference: str | None) -> dict[str, Any] | None:
        entry = self.entries.get(reference) if reference else None
        return entry.resource if entry is not None and not entry.deleted else None

    def of_type(self, resource_type: str) -> list[tuple[str, dict[str, Any]]]:
        if resource_type == "ChargeItemDefinition":
            if self._definitions is None:
                self._definitions = [(c.key, c.resource) for c in self.store.listed("ChargeItemDefinition/")
                                     if c.key]
            return self._definitions
        if resource_type in SCOPED_TYPES:  # each once, as the in-memory index lists it
            found: list[tuple[str, dict[str, Any]]] = []
            for key in dict.fromkeys(self._owned.get(resource_type, [])):
                resource = self.get(key)
                if resource is not None:
                    found.append((key, resource))
            return found
        raise NotImplementedError(f"the streaming index does not list every {resource_type} of the input")

    def _identifier_matches(self, kind: str | None, system: str, value: str) -> list[str]:
        return self.store.identifier_keys(kind, system, value)
