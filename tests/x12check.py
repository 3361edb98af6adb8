"""pyx12 (an X12 validator nobody here wrote) as the judge of every 837P the tests generate."""

from __future__ import annotations

import io
import logging

import pyx12.params
import pyx12.x12n_document


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def pyx12_errors(text: str) -> list[str]:
    """What pyx12 finds wrong with an interchange against its 005010X222A1 map (empty: valid), and its 999's
    rejection when it writes one."""
    collect = _Collect()
    logger = logging.getLogger("pyx12")
    logger.addHandler(collect)
    ack = io.StringIO()
    try:
        ok = pyx12.x12n_document.x12n_document(pyx12.params.params(), io.StringIO(text), ack, None)
    finally:
        logger.removeHandler(collect)
    errors = list(collect.lines)
    if "IK5*R" in ack.getvalue() or "AK9*R" in ack.getvalue():
        errors.append(f"999 rejects: {ack.getvalue()}")
    if not ok and not errors:
        errors.append("pyx12 found the interchange invalid")
    return errors
