"""Free text of the whole input kept out of stderr, as `FreeText.mask` does in memory, for inputs whose free
text does not fit in memory (names and narratives of millions of resources).

The strings live in the store (`text`, with how many current copies hold each). The texts to mask (the
diagnostics' details) are known before the first is masked, so only strings that can match one are needed:
those no longer than the longest text (narratives never fit in a diagnostic) and, among them, those that occur in
some text. When the strings fit the in-memory bound they are loaded into one Aho-Corasick automaton at once.
Otherwise they are read in pieces of that size; each piece's automaton scans every text once and keeps the
strings found, and the automaton of the strings found masks. A string that occurs in no text never changes a
text, so the result is `FreeText.mask`'s; the cost is linear in the strings and in the texts times the pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ahocorasick

from adapter.redact import mask_matches, scrub
from adapter.streaming.store import Store, decode

IN_MEMORY_CHARS = 16 << 20
"""Characters of strings in one automaton: about 11 bytes a character for names and descriptions that share
prefixes (109 MiB for 9.5 million), at worst 40 (strings with nothing in common)."""


def _automaton(words: Iterable[str]) -> Any:
    automaton = ahocorasick.Automaton()
    for word in words:
        automaton.add_word(word, len(word))
    if len(automaton) == 0:
        return None
    automaton.make_automaton()
    return automaton


class StoredFreeText:
    """`mask(text)`: what `FreeText.of(<every current resource of the input>).mask(text)` gives, for each of
    the texts `texts()` yields (every text that will be masked; it is iterated once per piece of strings)."""

    def __init__(self, store: Store, texts: Callable[[], Iterable[str]], in_memory_chars: int = IN_MEMORY_CHARS
                 ) -> None:
        self.longest = max((len(t) for t in texts()), default=0)
        where = f"n > 0 AND length <= {int(self.longest)}"
        (chars,) = store.db.execute(f"SELECT coalesce(sum(length), 0) FROM text WHERE {where}").fetchone()
        self.loaded = chars <= in_memory_chars
        """Whether the strings were loaded at once (else found piece by piece)."""
        strings = (decode(s) for (s,) in store.db.execute(f"SELECT s FROM text WHERE {where}"))
        if self.loaded:
            self.inner = _automaton(strings)
            return
        found: set[str] = set()
        for piece in _pieces(strings, in_memory_chars):
            automaton = _automaton(piece)
            for text in texts():
                found.update(text[end - length + 1:end + 1] for end, length in automaton.iter(text))
            del automaton
        self.inner = _automaton(found)

    def mask(self, text: str) -> str:
        if len(text) > self.longest:
            raise ValueError(f"a text of {len(text)} characters, longer than any of the texts given")
        return scrub(mask_matches(text, self.inner.iter(text)) if self.inner is not None else text)


def _pieces(strings: Iterator[str], chars: int) -> Iterator[list[str]]:
    """`strings` in lists of about `chars` characters (at least one string each)."""
    piece: list[str] = []
    size = 0
    for s in strings:
        piece.append(s)
        size += len(s)
        if size >= chars:
            yield piece
            piece, size = [], 0
    if piece:
        yield piece
