"""Exception types: expected rejections, bad input and transient I/O failures are distinct.

Orchestration retries only transient failures (``is_transient``); a ``Rejection`` is a
verdict, not a fault, and retrying it would give the same answer; an ``InputError`` needs
the user to change what they asked for. The command line maps them to exit codes: 1 for a
rejection, 2 for bad usage or input.
"""

from __future__ import annotations

from functools import cache
from typing import Any


class CxrError(Exception):
    """Base class of every error cxr raises on purpose.

    ``details`` carries context for reports (e.g. the run's work directory), filled in by
    whoever knows it as the error travels up."""

    def __init__(self, message: str = "", *args: Any) -> None:
        super().__init__(message, *args)
        self.details: dict[str, Any] = {}


class Rejection(CxrError):
    """An expected verdict that stops the pipeline (never retried)."""


class InputError(CxrError):
    """Bad usage or input: a missing or unusable file or folder, an unknown run or model
    version, an invalid configuration. Not a verdict on the data or the model."""


class DataLayoutError(InputError):
    """The data folder does not have a usable chest-xray layout."""


class ConfigError(InputError):
    """The experiment configuration is invalid (unknown profile, bad value, unreadable)."""


class DataValidationError(Rejection):
    """The data set failed one or more error-severity expectations."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class GateRejected(Rejection):
    """The candidate model failed its evaluation gates (it stays a logged, unregistered run)."""

    def __init__(self, message: str, decision: object | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class TransientIOError(CxrError):
    """A failure of an external service or store that may succeed when retried."""


# MLflow's error codes for answers a retry may change (HTTP 5xx, 503, 429).
_TRANSIENT_MLFLOW_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR",
                                     "REQUEST_LIMIT_EXCEEDED"})
# S3 error codes a retry may fix (besides any HTTP 5xx answer).
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                                 "ServiceUnavailable", "InternalError", "Throttling"})


@cache
def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient transport exception types, exceptions to them) of the HTTP stacks cxr talks
    through: requests and urllib3 (MLflow), botocore (S3), httpx (Prefect). Each library is
    optional here; a missing one simply contributes no type."""
    transient: list[type[BaseException]] = [TransientIOError, ConnectionError, TimeoutError]
    never: list[type[BaseException]] = []
    try:
        import requests.exceptions as rq

        transient += [rq.ConnectionError, rq.Timeout, rq.ChunkedEncodingError]
        never.append(rq.SSLError)  # a certificate problem does not fix itself
    except ImportError:
        pass
    try:
        import urllib3.exceptions as u3

        transient += [u3.MaxRetryError, u3.TimeoutError, u3.ProtocolError]
        never.append(u3.SSLError)
    except ImportError:
        pass
    try:
        import botocore.exceptions as bc

        transient += [bc.ConnectionError, bc.HTTPClientError]
        never.append(bc.SSLError)
    except ImportError:
        pass
    try:
        import httpx

        transient += [httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError]
    except ImportError:
        pass
    return tuple(transient), tuple(never)


def _transient_answer(exc: BaseException) -> bool:
    """A service's own answer that says "try again": HTTP 5xx or 429, S3 throttling codes,
    MLflow's temporarily-unavailable codes."""
    try:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status == 429 or \
                exc.response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES
    except ImportError:
        pass
    try:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            return exc.error_code in _TRANSIENT_MLFLOW_CODES
    except ImportError:
        pass
    status = _http_status(exc)
    return status is not None and (status >= 500 or status == 429)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a requests or httpx status error, else None."""
    try:
        import requests

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return exc.response.status_code
    except ImportError:
        pass
    try:
        import httpx

        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code
    except ImportError:
        pass
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures of an external service or store that a retry may fix (connection
    refused/reset, timeouts, 5xx and throttling answers), False for verdicts, bad input and
    bugs. Decided by exception type (requests, urllib3, botocore, httpx, MLflow), following
    the chain of causes: MLflow wraps a refused connection in its own exception."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (Rejection, InputError)):
            return False
        transient, never = _transport_errors()
        if isinstance(current, never):
            return False
        if isinstance(current, transient) or _transient_answer(current):
            return True
        current = current.__cause__ or current.__context__
    return False
