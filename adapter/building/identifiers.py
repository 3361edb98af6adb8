"""Deterministic identities: the same session and line always get the same identifier.

This is what makes writes idempotent (a conditional update on the identifier finds the earlier write)
and output byte-identical between runs.
"""

from __future__ import annotations

import hashlib
import uuid

from adapter.extraction.procedures import SessionKey

_NAMESPACE = uuid.UUID("6f1d2c1e-9a4b-5c3d-8e7f-0a1b2c3d4e5f")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def line_identifier(session: SessionKey, code: str, modifiers: tuple[str, ...]) -> str:
    return "fna-" + _digest(f"{session.text()}|{code}|{'-'.join(modifiers)}")


def claim_identifier(session: SessionKey) -> str:
    return "fna-claim-" + _digest(session.text())


_NAMESPACE_BYTES = _NAMESPACE.bytes


def uuid5(name: str) -> str:
    """`str(uuid.uuid5(_NAMESPACE, name))` (RFC 4122 name-based, SHA-1) without building a UUID object, which
    cost more than the hash in a run writing tens of thousands of entries."""
    raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def full_url(system: str, value: str) -> str:
    """A stable `urn:uuid:` for a transaction entry, derived from its business identifier."""
    return f"urn:uuid:{uuid5(f'{system}|{value}')}"
