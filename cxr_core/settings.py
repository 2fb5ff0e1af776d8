"""Infrastructure settings: one pydantic-settings object, environment prefix ``CXR_``.

Experiment parameters do not live here (see ``cxr_core.config``); this object says *where*
things run and are stored. Building it does no work: no directory is created, no URI is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where cxr keeps state and which services it talks to."""

    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    home: Path = Field(default=Path(".cxr"), description="State home: runs, reports, demo data.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: sqlite under the home."
    )
    experiment_name: str = "cxr-pneumonia"
    registered_model_name: str = "cxr-pneumonia"
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint URL.")
    s3_bucket: str | None = None
    s3_prefix: str = "cxr"
    # Credentials normally come from the standard AWS_* variables; these exist so a secret
    # manager can inject them under the CXR_ prefix. SecretStr keeps them out of reprs/logs.
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    prefect_api_url: str | None = None
    # Salt of the pseudonymous patient ids taken from DICOM PatientID (HMAC-SHA256). Unset:
    # a random salt is created under <home>/secrets/ on first use. Never in the repository.
    pseudonym_salt: SecretStr | None = None
    # Distributed tuning. Two addresses: the one tuner workers dial to reach the chief's
    # oracle (this machine's name/address on the workers' network, e.g. worker-cpu in compose)
    # and the one the chief binds (default: that same address, so the port is reachable on
    # that interface only, never on every interface unless asked for with 0.0.0.0).
    tuner_oracle_host: str = Field(default="127.0.0.1",
                                   description="Address workers dial to reach the oracle.")
    tuner_oracle_bind_host: str | None = Field(
        default=None, description="Address the chief binds; default: tuner_oracle_host.")
    tuner_worker_deployment: str = "tune-worker/gpu"
    # Bounded waits of a distributed search: a worker run that no worker picks up within
    # start_timeout is cancelled (the search goes on without it); the chief waits join_timeout
    # for workers that have not connected yet before finishing without them.
    tuner_worker_start_timeout_s: float = 600.0
    tuner_worker_join_timeout_s: float = 600.0
    tuner_search_timeout_s: float = 24 * 3600.0

    @property
    def oracle_bind_host(self) -> str:
        """The address the chief's oracle binds."""
        return self.tuner_oracle_bind_host or self.tuner_oracle_host

    @model_validator(mode="after")
    def _absolute_home(self) -> Settings:
        # An absolute home keeps every derived path (and the sqlite URI) independent of the
        # working directory of whichever process reads it later.
        self.home = self.home.expanduser().resolve()
        return self

    @property
    def mlflow_tracking_uri(self) -> str:
        """The tracking URI in force: the configured one or an absolute sqlite file URI."""
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Where new experiments keep artifacts when cxr writes to a database directly
        (sqlite default): under the home, never ``./mlruns`` of whatever the working directory
        is. None for a tracking server, which decides (proxied artifacts, e.g. S3)."""
        if self.mlflow_tracking_uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.home / "mlartifacts").as_uri()

    @property
    def runs_dir(self) -> Path:
        """Work directories of pipeline runs."""
        return self.home / "runs"

    @property
    def demo_data_dir(self) -> Path:
        """Where the synthetic demo data set is written."""
        return self.home / "demo-data"


def get_settings() -> Settings:
    """Read settings from the environment (a fresh object each call, nothing cached)."""
    return Settings()


@contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a ``with`` block and give the previous values back
    afterwards (libraries such as Keras Tuner read their role from the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
