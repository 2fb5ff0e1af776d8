"""An experiment made by a local demo (local artifact folder) is not reused through a tracking
server whose artifacts go to S3: artifacts would silently bypass S3."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cxr_core.errors import ConfigError
from cxr_core.lifecycle.artifact_root import experiment_for_tracking, is_local_root


class _Client:
    def __init__(self, roots: dict[str, str]) -> None:
        self.roots = roots

    def get_experiment_by_name(self, name: str):
        root = self.roots.get(name)
        return None if root is None else SimpleNamespace(artifact_location=root)


def test_local_roots_are_recognised() -> None:
    assert is_local_root("file:///home/u/.cxr/mlartifacts") and is_local_root("/tmp/x")
    assert not is_local_root("mlflow-artifacts:/1") and not is_local_root("s3://cxr/mlflow/1")


def test_a_local_root_behind_a_server_is_replaced() -> None:
    client = _Client({"cxr": "file:///home/u/.cxr/mlartifacts"})
    assert experiment_for_tracking(client, "cxr", "http://127.0.0.1:5000", "s3") == "cxr-s3"
    # Without a server the local root is right; a server-made experiment is kept.
    assert experiment_for_tracking(client, "cxr", "sqlite:////tmp/m.db") == "cxr"
    ok = _Client({"cxr": "mlflow-artifacts:/1"})
    assert experiment_for_tracking(ok, "cxr", "http://127.0.0.1:5000", "s3") == "cxr"


def test_no_fitting_experiment_fails_with_the_fix() -> None:
    client = _Client({"cxr": "/a", "cxr-s3": "/b"})
    with pytest.raises(ConfigError, match="CXR_EXPERIMENT_NAME"):
        experiment_for_tracking(client, "cxr", "http://127.0.0.1:5000", "s3")


@pytest.mark.integration
def test_after_a_local_demo_a_server_with_s3_puts_new_artifacts_in_s3(tmp_path, monkeypatch) -> None:
    """Item 7 of issue 14, live: the demo's experiment (sqlite, local artifact folder), then a
    tracking server on the same database proxying artifacts to S3 (`cxr stack up --s3`): the
    pipeline's experiment choice sends new artifacts to the bucket, not the old folder."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cxr_core.lifecycle.tracking import ensure_experiment
    from flows.servers import start_mlflow_server
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local_root = (tmp_path / "mlartifacts").as_uri()
    MlflowClient(db).create_experiment("cxr-pneumonia", artifact_location=local_root)
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    host, port = s3.get_host_and_port()
    bucket = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="k", aws_secret_access_key="s")
    bucket.create_bucket(Bucket="cxr")
    server = start_mlflow_server(db, "s3://cxr/mlflow", tmp_path / "mlflow.log",
                                 env={**keys, "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"})
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        client = MlflowClient(server.url)
        name = experiment_for_tracking(client, "cxr-pneumonia", server.url, "s3")
        assert name == "cxr-pneumonia-s3"
        run = client.create_run(ensure_experiment(client, name))
        client.log_text(run.info.run_id, "through the server", "note.txt")
        stored = [o["Key"] for o in bucket.list_objects_v2(Bucket="cxr").get("Contents", [])]
        assert any(k.startswith("mlflow/") and k.endswith("/note.txt") for k in stored), stored
        assert not (tmp_path / "mlartifacts").exists()  # nothing went to the demo's folder
    finally:
        server.stop()
        s3.stop()
