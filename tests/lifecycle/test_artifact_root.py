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
