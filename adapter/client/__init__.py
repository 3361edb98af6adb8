"""FHIR R4 REST client used by the adapter's sinks and sources.

Transport (:mod:`.client`), retry rules (:mod:`.retry`), credentials (:mod:`.auth`) and the error
tree (:mod:`.errors`) live in separate small modules; this package re-exports the public names.
"""

from adapter.client.auth import (
    BasicAuth,
    BearerTokenAuth,
    FhirAuth,
    NoAuth,
    SmartBackendAuth,
    auth_from_settings,
    secret_from,
)
from adapter.client.client import FHIR_JSON, FhirClient, SearchParams
from adapter.client.errors import (
    AuthError,
    FhirBadRequest,
    FhirConflict,
    FhirError,
    FhirGone,
    FhirHttpError,
    FhirNotFound,
    FhirRateLimited,
    FhirServerError,
    FhirTransportError,
    FhirUnauthorized,
    FhirUnprocessable,
    UnsafeLinkError,
    UnsupportedServerError,
)
from adapter.client.retry import RetryPolicy, is_idempotent_transaction, parse_retry_after

__all__ = [
    "FHIR_JSON",
    "AuthError",
    "BasicAuth",
    "BearerTokenAuth",
    "FhirAuth",
    "FhirBadRequest",
    "FhirClient",
    "FhirConflict",
    "FhirError",
    "FhirGone",
    "FhirHttpError",
    "FhirNotFound",
    "FhirRateLimited",
    "FhirServerError",
    "FhirTransportError",
    "FhirUnauthorized",
    "FhirUnprocessable",
    "NoAuth",
    "RetryPolicy",
    "SearchParams",
    "SmartBackendAuth",
    "UnsafeLinkError",
    "UnsupportedServerError",
    "auth_from_settings",
    "is_idempotent_transaction",
    "parse_retry_after",
    "secret_from",
]
