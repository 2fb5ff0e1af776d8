"""Exception types: expected rejections are distinct from transient I/O failures.

Orchestration retries only ``TransientIOError``; a ``Rejection`` is a verdict, not a fault,
and retrying it would give the same answer.
"""

from __future__ import annotations


class CxrError(Exception):
    """Base class of every error cxr raises on purpose."""


class Rejection(CxrError):
    """An expected verdict that stops the pipeline (never retried)."""


class DataLayoutError(Rejection):
    """The data folder does not have a usable chest-xray layout."""


class DataValidationError(Rejection):
    """The data set failed one or more error-severity expectations."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class ConfigError(Rejection):
    """The experiment configuration is invalid (unknown profile, bad value)."""


class TransientIOError(CxrError):
    """A failure of an external service or store that may succeed when retried."""


def is_transient(exc: BaseException) -> bool:
    """True for failures of an external service or store that a retry may fix (connection
    refused/reset, timeouts, 5xx and throttling answers), False for verdicts and bugs."""
    if isinstance(exc, Rejection):
        return False
    if isinstance(exc, (TransientIOError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError",
                "MaxRetryError", "NewConnectionError", "ProtocolError",
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}:
        return True
    code = getattr(exc, "error_code", None)  # MlflowException
    if code in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"}:
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


class GateRejected(Rejection):
    """The candidate model failed its evaluation gates (it stays a logged, unregistered run)."""

    def __init__(self, message: str, decision: object | None = None) -> None:
        super().__init__(message)
        self.decision = decision
