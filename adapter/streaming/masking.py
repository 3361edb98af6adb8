"""Free text of the whole input kept out of stderr, as `FreeText.mask` does in memory, for inputs whose free
text does not fit in memory (names and narratives of millions of resources).

The strings live in the store (`text`, with how many current copies hold each). When they are few they are
loaded into a `FreeText` and masked with its own pattern. Otherwise each message is scanned the way that
pattern matches: from left to right, at each position the longest collected string that starts there is
replaced, and scanning goes on after it; only positions whose first four characters begin some collected
string are looked up.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapter.redact import MASK, FreeText, scrub
from adapter.streaming.store import Store, decode, encode

IN_MEMORY_STRINGS = 100_000
IN_MEMORY_CHARS = 16 << 20
"""Up to this many strings (and characters in all) the strings are loaded into a `FreeText`."""
_PREFIX = 4
"""`FreeText` collects strings of at least four characters (not counting surrounding space)."""
_PARAMS = 500


class StoredFreeText:
    """`mask(text)`: what `FreeText.of(<every current resource of the input>).mask(text)` gives."""

    def __init__(self, store: Store, in_memory_strings: int = IN_MEMORY_STRINGS,
                 in_memory_chars: int = IN_MEMORY_CHARS) -> None:
        self.store = store
        count, chars = store.db.execute("SELECT count(*), coalesce(sum(length), 0) FROM text WHERE n > 0").fetchone()
        self.inner: FreeText | None = None
        self.lengths: list[int] = []
        self.prefixes: set[str] = set()
        if count <= in_memory_strings and chars <= in_memory_chars:
            self.inner = FreeText(decode(s) for (s,) in store.db.execute("SELECT s FROM text WHERE n > 0"))
            return
        self.lengths = [n for (n,) in store.db.execute(
            "SELECT DISTINCT length FROM text WHERE n > 0 ORDER BY length DESC")]
        for (s,) in store.db.execute("SELECT s FROM text WHERE n > 0"):
            self.prefixes.add(decode(s)[:_PREFIX])

    def mask(self, text: str) -> str:
        if self.inner is not None:
            return self.inner.mask(text)
        out: list[str] = []
        i, size = 0, len(text)
        while i < size:
            hit = self._longest_at(text, i) if text[i:i + _PREFIX] in self.prefixes else None
            if hit:
                out.append(MASK)
                i += hit
            else:
                out.append(text[i])
                i += 1
        return scrub("".join(out))

    def _longest_at(self, text: str, i: int) -> int | None:
        candidates = [text[i:i + n] for n in self.lengths if i + n <= len(text)]
        found = self._present(candidates)
        return next((len(c) for c in candidates if c in found), None)

    def _present(self, candidates: Iterable[str]) -> set[str]:
        wanted = list(candidates)
        found: set[str] = set()
        for start in range(0, len(wanted), _PARAMS):
            chunk = wanted[start:start + _PARAMS]
            marks = ", ".join("?" * len(chunk))
            found |= {decode(s) for (s,) in self.store.db.execute(
                f"SELECT s FROM text WHERE n > 0 AND s IN ({marks})", [encode(c) for c in chunk])}
        return found
