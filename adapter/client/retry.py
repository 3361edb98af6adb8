"""When and how long to retry a FHIR request.

A request is retried only if repeating it cannot create a second copy of anything: GET, HEAD, PUT
and DELETE always, POST only when the caller says so (a search via POST, a conditional create, a
transaction made of PUT/DELETE/conditional entries -- see :func:`is_idempotent_transaction`).

Retried outcomes: HTTP 429, 502, 503, 504, connection failures and timeouts. A ``Retry-After``
header (delta-seconds or HTTP-date) is honoured, capped at :attr:`RetryPolicy.max_retry_after`;
otherwise the wait is exponential backoff with full jitter. Attempts and total time are bounded.
TLS errors are not retried: a certificate that fails verification will fail again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import tenacity

__all__ = ["IDEMPOTENT_METHODS", "RetryPolicy", "is_idempotent_transaction", "parse_retry_after"]

log = logging.getLogger("adapter.client")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None if absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:  # HTTP-dates are always GMT; a naive one is malformed
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def is_idempotent_transaction(bundle: Mapping[str, Any]) -> bool:
    """True if replaying ``bundle`` cannot duplicate data.

    That holds when every entry's ``request.method`` is GET, HEAD, PUT or DELETE, or is a POST made
    conditional by ``request.ifNoneExist``. An entry without a request makes the answer False.
    """
    for entry in bundle.get("entry") or []:
        request = entry.get("request") if isinstance(entry, Mapping) else None
        if not isinstance(request, Mapping):
            return False
        method = str(request.get("method", "")).upper()
        if method in IDEMPOTENT_METHODS:
            continue
        if method == "POST" and request.get("ifNoneExist"):
            continue
        return False
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries for idempotent requests.

    ``sleep`` is injectable so tests (and callers with their own scheduler) need not really wait.
    ``max_total`` bounds the time spent from the first attempt; no new attempt starts after it.
    """

    attempts: int = 5
    max_total: float = 120.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 60.0
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(attempts=1)

    def wait_seconds(self, state: tenacity.RetryCallState) -> float:
        """Retry-After when the server gave one (capped), else jittered exponential backoff."""
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            response = outcome.result()
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None:
                return min(retry_after, self.max_retry_after)
        backoff = tenacity.wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        return float(backoff(state))

    def _is_retryable_exception(self, exc: BaseException) -> bool:
        return isinstance(exc, _TRANSIENT_ERRORS) and not isinstance(exc, requests.exceptions.SSLError)

    def _is_retryable_response(self, response: requests.Response) -> bool:
        return response.status_code in self.retry_statuses

    def call(
        self,
        send: Callable[[], requests.Response],
        *,
        idempotent: bool,
        describe: str = "request",
    ) -> requests.Response:
        """Run ``send`` until it yields a final response, retrying if ``idempotent``.

        Returns the last response even when it still has a retryable status (the caller maps it to
        an error); re-raises the last transport exception when attempts or time ran out.
        """
        if not idempotent or self.attempts == 1:
            return send()

        def log_retry(state: tenacity.RetryCallState) -> None:
            outcome = state.outcome
            if outcome is None:
                return
            why = type(outcome.exception()).__name__ if outcome.failed else f"HTTP {outcome.result().status_code}"
            wait = state.next_action.sleep if state.next_action else 0.0
            log.info(  # INFO: in an outage every request retries; the caller reports the outage once
                "retrying %s after %s (attempt %d of %d, waiting %.1fs)",
                describe,
                why,
                state.attempt_number + 1,
                self.attempts,
                wait,
            )

        retrying = tenacity.Retrying(
            sleep=self.sleep,
            stop=tenacity.stop_after_attempt(self.attempts) | tenacity.stop_after_delay(self.max_total),
            wait=self.wait_seconds,
            retry=tenacity.retry_if_exception(self._is_retryable_exception)
            | tenacity.retry_if_result(self._is_retryable_response),
            before_sleep=log_retry,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        return retrying(send)
