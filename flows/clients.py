"""Clients of external services as the application layer configures them (no Prefect import:
the command line uses these too)."""

from __future__ import annotations

import os
from typing import Any


def short_mlflow_retries() -> None:
    """Keep MLflow's own HTTP retries short (users may override): flow tasks retry with
    backoff themselves, and MLflow's default (7 retries, exponential) hides an outage for
    minutes before a task, or a user at the command line, sees it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def mlflow_client(tracking_uri: str) -> Any:
    """An MlflowClient on ``tracking_uri`` with short HTTP retries."""
    from cxr_core.lifecycle.tracking import make_client

    short_mlflow_retries()
    return make_client(tracking_uri)
