"""Free text of the whole input kept out of stderr, as `FreeText.mask` does in memory, for inputs whose free
text does not fit in memory (names and narratives of millions of resources).

The strings live in the store (`text`, with how many current copies hold each). Only strings no longer than the
longest text to mask can match, so only those are considered (`longest`; narratives never fit in a diagnostic).
When they fit the in-memory bounds they are loaded into an Aho-Corasick automaton and each message is masked in
one pass, as `FreeText.mask` does. Otherwise each message is scanned the same way against the store: from left
to right, at each position the longest collected string that starts there is replaced, and scanning goes on
after it; only positions whose first four characters begin some collected string are looked up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ahocorasick

from adapter.redact import MASK, mask_matches, scrub
from adapter.streaming.store import Store, decode, encode

IN_MEMORY_STRINGS = 1_000_000
IN_MEMORY_CHARS = 4 << 20
"""Up to this many strings (and characters in all) the strings are loaded into an automaton (about 40 bytes a
character at worst, for strings that share no prefix: 160 MiB)."""
_PREFIX = 4
"""`FreeText` collects strings of at least four characters (not counting surrounding space)."""
_PARAMS = 500


class StoredFreeText:
    """`mask(text)`: what `FreeText.of(<every current resource of the input>).mask(text)` gives."""

    def __init__(self, store: Store, in_memory_strings: int = IN_MEMORY_STRINGS,
                 in_memory_chars: int = IN_MEMORY_CHARS, longest: int | None = None) -> None:
        """`longest`: no text to mask is longer than this (None: any length)."""
        self.store = store
        self.longest = longest
        self._where = "n > 0" if longest is None else f"n > 0 AND length <= {int(longest)}"
        count, chars = store.db.execute(
            f"SELECT count(*), coalesce(sum(length), 0) FROM text WHERE {self._where}").fetchone()
        self.inner: Any = None
        """The automaton of the strings when they were loaded (None when there are none, too)."""
        self.loaded = count <= in_memory_strings and chars <= in_memory_chars
        self.lengths: list[int] = []
        self.prefixes: set[str] = set()
        if self.loaded:
            if count:
                self.inner = ahocorasick.Automaton()
                for (s,) in store.db.execute(f"SELECT s FROM text WHERE {self._where}"):
                    word = decode(s)
                    self.inner.add_word(word, len(word))
                self.inner.make_automaton()
            return
        self.lengths = [n for (n,) in store.db.execute(
            f"SELECT DISTINCT length FROM text WHERE {self._where} ORDER BY length DESC")]
        for (s,) in store.db.execute(f"SELECT s FROM text WHERE {self._where}"):
            self.prefixes.add(decode(s)[:_PREFIX])

    def mask(self, text: str) -> str:
        if self.longest is not None and len(text) > self.longest:
            raise ValueError(f"a text of {len(text)} characters, longer than the {self.longest} promised")
        if self.loaded:
            return scrub(mask_matches(text, self.inner.iter(text)) if self.inner is not None else text)
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
                f"SELECT s FROM text WHERE {self._where} AND s IN ({marks})", [encode(c) for c in chunk])}
        return found
