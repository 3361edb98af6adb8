"""Where log lines go and in what shape: stderr, as text for people or as one JSON object per line for an engine
that ships logs (`logging.format: json`).

The shape is all this module decides: what a line says (and what it leaves out: no free text, patient
references only as `adapter.redact` allows) is decided where it is logged, so both formats carry the same,
already redacted, message.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s"
FORMATS = ("text", "json")


def formatter(kind: str) -> logging.Formatter:
    """The formatter of `logging.format`: `text` (the default) or `json` (keys time, level, logger, thread,
    message; an exception's traceback under exc_info)."""
    if kind == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                                                         "threadName": "thread"},
                             datefmt="%Y-%m-%dT%H:%M:%S%z", json_ensure_ascii=False)
    return logging.Formatter(TEXT_FORMAT)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever `sys.stderr` is when a line is written (click's test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure(verbose: int, kind: str = "text") -> None:
    """WARNING, or INFO at -v, DEBUG at -vv, to stderr; like `logging.basicConfig`, the handler is added only
    when the root logger has none (an embedding program's or a test's handlers are left alone)."""
    root = logging.getLogger()
    root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])
    if not root.handlers:
        handler = _Stderr()
        handler.setFormatter(formatter(kind))
        root.addHandler(handler)


def use_format(kind: str) -> None:
    """Switch our stderr handler to `kind`, once the config file (which names it) has been read."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Stderr):
            handler.setFormatter(formatter(kind))
