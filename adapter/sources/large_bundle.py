"""One large JSON Bundle read entry by entry, so a file of any size is never held (or parsed) whole.

`read_bundle` scans the text piece by piece: the top-level members before `entry` are parsed as they come, then
each element of `entry` is parsed on its own by the json module's own decoder (`JSONDecoder.raw_decode`, the C
scanner `json.loads` uses, so every value is exactly what `json.loads` of the whole file gives) and handed to
`files.flatten` through a Bundle whose `entry` is read lazily; the streaming path spills each resource as it
comes. Memory is one piece of text (grown only for an entry larger than a piece) and one entry.

Whatever this scan does not expect (bytes that are not UTF-8, JSON that is not valid, `resourceType` after
`entry`, a member after `entry`, a top level that is not a Bundle) makes it take back what it added and
answer False: the caller then reads the file whole, as for small files, with the same errors and results.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STREAM_BYTES = 32 << 20
"""JSON files larger than this are scanned entry by entry (smaller ones are read whole: it is faster)."""
PIECE_CHARS = 1 << 20
"""Characters decoded at a time."""
_MODIFIER = b"modifierExtension"
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Irregular(Exception):
    """Something this scan leaves to the whole-file read."""


_NUMBER_TAIL = re.compile(r"[0-9.eE+\-]+")
"""What may follow a number's prefix inside the same number."""


class _Text:
    """The file's text, decoded piece by piece, with a read position."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("rb")
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.eof = False

    def close(self) -> None:
        self.handle.close()

    def _more(self, chars: int = 0) -> None:
        if self.eof:
            raise _Irregular("unexpected end")
        if self.pos > PIECE_CHARS:  # drop what was consumed (one copy per piece, not per entry)
            self.buf, self.pos = self.buf[self.pos:], 0
        block = self.handle.read(chars or PIECE_CHARS)
        try:
            self.buf += self.decoder.decode(block, final=not block)
        except UnicodeDecodeError:
            raise _Irregular("not UTF-8") from None
        self.eof = not block

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self._more()

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Irregular(f"expected {char!r}")
        self.pos += 1

    def value(self) -> Any:
        """The JSON value at the read position. A value that ends where the text read so far ends may go on
        (a number, or text cut inside it): it is parsed again with more text."""
        self.peek()
        grow = PIECE_CHARS
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.eof:
                    raise _Irregular("not valid JSON") from None
                self._more(grow)
                grow *= 2  # an entry larger than a piece is parsed about twice, not once per piece
                continue
            cut = (isinstance(value, int | float) and not isinstance(value, bool)
                   and _NUMBER_TAIL.fullmatch(self.buf, end))  # "0." or "1e" at the end: the number may go on
            if (end < len(self.buf) and not cut) or self.eof:
                self.pos = end
                return value
            self._more(grow)
            grow *= 2


def _holds_modifier(path: Path) -> bool:
    """Whether the file's bytes hold `modifierExtension` anywhere (what the whole-file read tells flatten)."""
    tail = b""
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            if _MODIFIER in tail + block[:len(_MODIFIER)] or _MODIFIER in block:
                return True
            tail = block[-len(_MODIFIER):]
    return False


class _LazyEntries(list):  # type: ignore[type-arg]
    """`Bundle.entry` for `flatten`: a list that yields the elements as they are parsed."""

    def __init__(self, text: _Text) -> None:
        super().__init__()
        self.text = text

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        text = self.text
        if text.peek() == "]":
            text.pos += 1
            return
        while True:
            yield text.value()
            if text.peek() == "]":
                text.pos += 1
                return
            text.expect(",")


Flatten = Callable[[dict[str, Any], str, Any, bool], None]
"""`adapter.sources.files.flatten`, handed in by its caller (files imports this module, not the other way)."""


def read_bundle(path: Path, result: Any, flatten: Flatten) -> bool:
    """Add the resources of the Bundle in `path` to `result` entry by entry; False (having added nothing) when
    the file is not such a Bundle or not as expected, for the whole-file read to deal with."""
    mark = result.mark()
    try:
        modifier_free = not _holds_modifier(path)
        text = _Text(path)
    except OSError:
        return False
    try:
        _scan(text, path, result, modifier_free, flatten)
        return True
    except (_Irregular, RecursionError):
        result.discard(mark)
        return False
    finally:
        text.close()


def _scan(text: _Text, path: Path, result: Any, modifier_free: bool, flatten: Flatten) -> None:
    text.expect("{")
    bundle: dict[str, Any] = {}
    while True:
        if text.peek() != '"':
            raise _Irregular("no entry member")
        key = text.value()
        text.expect(":")
        if key != "entry":
            bundle[key] = text.value()
        else:
            if bundle.get("resourceType") != "Bundle" or text.peek() != "[":
                raise _Irregular("not a Bundle with a list of entries, as far as read")
            if bundle.get("type") == "message":  # its header and focus are checked across entries: read whole
                raise _Irregular("a message Bundle")
            text.pos += 1
            bundle["entry"] = _LazyEntries(text)
            flatten(bundle, str(path), result, modifier_free)
            text.expect("}")
            if text.peek() != "":
                raise _Irregular("something after the Bundle")
            return
        if text.peek() == "}":
            raise _Irregular("no entry member")
        text.expect(",")
