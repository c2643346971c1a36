"""Which object-store failures deserve another attempt, and the tenacity policy that makes them.

botocore's own retries are switched off for our clients so that exactly one
layer retries, with one backoff policy, and every retry is counted in the
store's metrics (exported to Prometheus by the daemon).  A retry is worth it
only when the same request can succeed later: throttling, server errors,
timeouts and broken connections.  Anything that says "you are wrong" (bad
credentials, missing bucket, invalid argument) fails on the first attempt,
so a misconfiguration is reported in milliseconds rather than after a minute
of backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from zfsbackd.objectstore.base import ObjectStoreMetrics

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Backoff: attempt n waits a uniformly random time in [0, min(RETRY_WAIT_MAX, RETRY_WAIT_BASE * 2**(n-1))]
#: ("full jitter"), so many clients throttled at once do not come back in step.  Module-level so tests
#: that exhaust the attempts on purpose can shorten them.
RETRY_WAIT_BASE = 0.2
RETRY_WAIT_MAX = 10.0

#: Error codes that mean "the same request may succeed later", whatever the HTTP status says.
RETRYABLE_CODES = frozenset({
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    # AWS: a concurrent conditional write to the same key is in flight; AWS says to retry, and the
    # retry then sees 412 (the other writer won) or succeeds (it failed) — never a false "exists".
    "ConditionalRequestConflict",
})


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ("403" for bodiless HEAD answers), else ""."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a ClientError, else None."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def is_certificate_error(exc: BaseException) -> bool:
    """A TLS failure that no retry can fix (untrusted or mismatched certificate)."""
    text = str(exc)
    return isinstance(exc, SSLError) and ("CERTIFICATE_VERIFY_FAILED" in text or "certificate verify" in text)


def is_retryable(exc: BaseException) -> bool:
    """True for throttling, 5xx (except 501 Not Implemented), timeouts and broken connections."""
    if isinstance(exc, ClientError):
        status = http_status(exc) or 0
        if error_code(exc) in RETRYABLE_CODES or status in (408, 429):
            return True
        return status >= 500 and status != 501
    if is_certificate_error(exc):
        return False
    # ConnectionError: refused, DNS, connect timeout; HTTPClientError: reset, read timeout, broken body;
    # IncompleteReadError: a body shorter than its Content-Length; a checksum mismatch is a damaged transfer.
    return isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError | FlexibleChecksumError)


def describe_failure(exc: BaseException) -> str:
    """A short, secret-free reason for logs: "503 SlowDown" or "ReadTimeoutError"."""
    if isinstance(exc, ClientError):
        return f"{http_status(exc)} {error_code(exc)}"
    if isinstance(exc, BotoCoreError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def call_with_retries(
    attempt: Callable[[], T],
    *,
    operation: str,
    metrics: ObjectStoreMetrics,
    max_attempts: int,
    context: dict[str, object],
) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or ``max_attempts`` are used up.

    The last exception is re-raised unchanged (the caller turns it into a
    message); each retry is counted in ``metrics.retries[operation]`` and
    logged with ``context`` (region, object key — never credentials).
    """

    def before_sleep(state: RetryCallState) -> None:
        metrics.count_retry(operation)
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "object_store_retry",
            operation=operation,
            attempt=state.attempt_number,
            max_attempts=max_attempts,
            wait_seconds=round(state.upcoming_sleep, 3),
            error=describe_failure(exc) if exc else None,
            **context,
        )

    retrying = Retrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait_random_exponential(multiplier=RETRY_WAIT_BASE, max=RETRY_WAIT_MAX),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
