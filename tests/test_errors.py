"""The error hierarchy (bad input is not a rejection) and the one transient-error
classification, by exception type, that flow retries and S3 uploads share."""

from __future__ import annotations

import pytest

from cxr_core.errors import (
    ConfigError,
    CxrError,
    DataLayoutError,
    DataValidationError,
    GateRejected,
    InputError,
    Rejection,
    TransientIOError,
    is_transient,
)


def test_bad_input_is_not_a_rejection() -> None:
    for exc in (ConfigError("x"), DataLayoutError("x")):
        assert isinstance(exc, InputError) and not isinstance(exc, Rejection)
    for exc in (DataValidationError("x"), GateRejected("x")):
        assert isinstance(exc, Rejection) and not isinstance(exc, InputError)
    err = GateRejected("gates", decision="d")
    err.details["run_dir"] = "/r"
    assert str(err) == "gates" and err.decision == "d" and err.details == {"run_dir": "/r"}
    assert CxrError("m").details == {}


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _mlflow_wrapping(cause: BaseException):
    """What MLflow raises when its HTTP request fails: its own exception, the cause chained."""
    from mlflow.exceptions import MlflowException

    try:
        raise cause
    except type(cause):
        try:
            raise MlflowException("API request to http://h/api failed")
        except MlflowException as exc:
            return exc


def _transient_instances() -> list[BaseException]:
    import botocore.exceptions as bc
    import httpx
    import requests.exceptions as rq
    import urllib3.exceptions as u3
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    pool = HTTPConnectionPool("127.0.0.1", 1)
    refused = u3.NewConnectionError(HTTPConnection("127.0.0.1", 1), "Connection refused")
    return [
        rq.ConnectionError("refused"), rq.ConnectTimeout("slow"), rq.ReadTimeout("slow"),
        rq.ChunkedEncodingError("cut"),
        refused, u3.MaxRetryError(pool, "/x", refused), u3.ReadTimeoutError(pool, "/x", "slow"),
        u3.ProtocolError("reset"),
        bc.EndpointConnectionError(endpoint_url="http://s3"),
        bc.ConnectTimeoutError(endpoint_url="http://s3"),
        bc.ReadTimeoutError(endpoint_url="http://s3"),
        bc.ConnectionClosedError(endpoint_url="http://s3"),
        _client_error("SlowDown", 503), _client_error("InternalError", 500),
        httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
        ConnectionRefusedError(111, "refused"), TimeoutError("slow"), TransientIOError("s3"),
        _mlflow_wrapping(rq.ConnectionError("refused")),
    ]


@pytest.mark.parametrize("exc", _transient_instances(), ids=lambda e: type(e).__name__)
def test_library_transport_errors_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


def _not_transient() -> list[BaseException]:
    import botocore.exceptions as bc
    import requests.exceptions as rq
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class ConnectTimeout(Exception):  # the name of a transient type, not the type
        pass

    gate = GateRejected("gates said no")
    gate.__cause__ = ConnectionRefusedError()
    return [
        ValueError("bad"), PermissionError(13, "Permission denied", "/x"),
        FileNotFoundError(2, "No such file", "/x"), ConnectTimeout("impostor"),
        _client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404),
        rq.SSLError("certificate verify failed"), bc.SSLError(endpoint_url="https://s3", error="cert"),
        MlflowException("Model Version not found", error_code=RESOURCE_DOES_NOT_EXIST),
        ConfigError("bad config"), DataLayoutError("no train/"), gate,
    ]


@pytest.mark.parametrize("exc", _not_transient(), ids=lambda e: type(e).__name__)
def test_verdicts_bad_input_and_bugs_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


class _FailingS3:
    """An S3 client whose calls raise the given botocore error (the real exception type)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def head_bucket(self, **_):
        raise self.exc

    def upload_file(self, *_):
        raise self.exc


def test_storage_uses_the_shared_classification(tmp_path) -> None:
    """S3 errors are retried when is_transient says so (TransientIOError), and only then."""
    import botocore.exceptions as bc

    from cxr_core.lifecycle.storage import ensure_bucket, upload_files

    f = tmp_path / "m.parquet"
    f.write_bytes(b"x")
    for exc in (bc.ConnectionClosedError(endpoint_url="http://s3"), _client_error("SlowDown", 503)):
        with pytest.raises(TransientIOError):
            upload_files(_FailingS3(exc), "b", "p", tmp_path, [f])
        with pytest.raises(TransientIOError):
            ensure_bucket(_FailingS3(exc), "b")
    denied = _client_error("AccessDenied", 403)
    with pytest.raises(bc.ClientError):
        upload_files(_FailingS3(denied), "b", "p", tmp_path, [f])
