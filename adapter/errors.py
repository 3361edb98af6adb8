"""The adapter's exception tree.

AdapterError
 +-- ConfigError        a code table or setting is wrong (names the file and the entry)
 +-- InputError         an input file cannot be read at all (names the file and why)
 +-- FhirError          talking to a FHIR server failed (see adapter.client.errors)
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error the adapter raises on purpose."""


class ConfigError(AdapterError):
    """A configuration file or one of its entries is invalid."""

    def __init__(self, file: str, entry: str, reason: str) -> None:
        self.file, self.entry, self.reason = file, entry, reason
        where = f"{file}: {entry}" if entry else file
        super().__init__(f"{where}: {reason}")


class InputError(AdapterError):
    """An input file cannot be read at all."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class FhirError(AdapterError):
    """Base of errors met while talking to a FHIR server."""
