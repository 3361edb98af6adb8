"""The adapter's exception tree and the one table that turns an exception into an exit code.

AdapterError
 +-- ConfigError            a code table or setting is wrong (names the file and the key)       exit 3
 +-- InputError             an input file cannot be read at all (names the file and why)        exit 2
 +-- FhirError              talking to a FHIR server failed (tree in adapter.client.errors)     exit 2
 +-- StateError             the state (cursor, queue, reviews, audit) cannot be used            exit 2
 |    +-- StateUnavailable  locked, disk full, read-only, I/O error, unreachable: may pass by itself
 |    +-- StateCorrupt      the state's storage is damaged: restore a backup or move it aside
 |    +-- StateSchemaError  not an adapter state at all, or one of a newer adapter               exit 3
 |    +-- InstanceLocked    another `run`/`serve` already works on this state
 |    +-- LeadLost          another replica took over a role (polling) this process held: its pass is not
 |                          recorded, the new holder redoes it
 +-- ReceiverError          the notification receiver
 |    +-- ReceiveError      one request refused (carries the HTTP status; never leaves the receiver)
 |    +-- ListenError       the receiver cannot listen on its address (port in use ...)
 +-- OutputError            something the adapter built
      +-- InvalidOutputError  (adapter.validation) a resource failed FHIR R4 validation

Driver errors (sqlite3 today, a PostgreSQL driver later) never leave the state package: each backend
translates them at its boundary. The CLI maps exceptions to exit codes with `exit_code_for`, nowhere else.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `charge-adapter` exits with."""

    OK = 0
    """Every FNA Procedure was coded or is non-billable by rule."""
    REVIEW = 1
    """Something needs an analyst (review entries, a write the server rejected)."""
    UNAVAILABLE = 2
    """An input, the FHIR server or the state could not be used (the environment, not the config)."""
    CONFIG = 3
    """The configuration is wrong: the message names the file and the key."""


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


class StateError(AdapterError):
    """The adapter's state cannot be used; `location` names the file (or, later, the database)."""

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"state {location}: {reason}")


class StateUnavailable(StateError):
    """The state cannot be read or written right now (locked, full, read-only, I/O error); retrying may help."""


class StateCorrupt(StateError):
    """The state's storage is damaged."""


class StateSchemaError(StateError):
    """The location holds something that is not this adapter's state, or a newer adapter's."""


class InstanceLocked(StateError):
    """Another `run` or `serve` already works on this state."""


class LeadLost(StateError):
    """A pass that needed a role (`PassRecord.lead`) found another replica holding it; nothing was recorded."""


# the old name, still importable
InstanceLockedError = InstanceLocked


class ReceiverError(AdapterError):
    """Base of the notification receiver's errors."""


class ReceiveError(ReceiverError):
    """A request the receiver refuses; `status` is the HTTP status, `code` a FHIR issue-type code.

    `message` becomes the OperationOutcome's diagnostics: it must never contain body content or credentials.
    `headers` are extra response headers (e.g. a WWW-Authenticate challenge).
    """

    def __init__(self, status: int, code: str, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status, self.code, self.message, self.headers = status, code, message, headers
        super().__init__(f"{status} {code}: {message}")


class ListenError(ReceiverError):
    """The receiver (or the health endpoint of `run`) cannot listen on its address."""


class OutputError(AdapterError):
    """Something the adapter built is wrong (a bug or a bad code table); it is never sent."""


EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (ConfigError, ExitCode.CONFIG),
    (StateSchemaError, ExitCode.CONFIG),
    (StateError, ExitCode.UNAVAILABLE),
    (FhirError, ExitCode.UNAVAILABLE),
    (InputError, ExitCode.UNAVAILABLE),
    (ReceiverError, ExitCode.UNAVAILABLE),
    (OutputError, ExitCode.REVIEW),
    (AdapterError, ExitCode.UNAVAILABLE),
)
"""First match wins: the one place where an exception becomes an exit code."""


def exit_code_for(exc: BaseException) -> ExitCode:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return ExitCode.UNAVAILABLE


def check_keys(mapping: dict[str, object], known: tuple[str, ...] | frozenset[str], file: object, entry: str) -> None:
    """A table entry holds only the keys its reader knows: a typo'd key is named as unknown (not reported as the
    right key missing or of the wrong type)."""
    for key in mapping:
        if key not in known:
            where = f"{entry}.{key}" if entry else str(key)
            raise ConfigError(str(file), where, f"unknown key (known: {', '.join(sorted(known))})")
