"""The one way cxr talks to MLflow: an explicit client on a tracking URI (no global state)."""

from __future__ import annotations

from typing import Any


def make_client(tracking_uri: str) -> Any:
    """An MlflowClient bound to ``tracking_uri`` (registry on the same server)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
