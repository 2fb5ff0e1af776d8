"""Real local servers for integration tests: mlflow server (sqlite or PostgreSQL backend)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.servers import ServerProcess, start_mlflow_server

POSTGRES_ENV = "CXR_TEST_POSTGRES_URL"


@contextmanager
def fresh_postgres_database(base_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``base_url``; dropped afterwards."""
    import psycopg

    name = f"cxr_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg.connect(base_url, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield base_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextmanager
def mlflow_server(tmp: Path, backend: str, env: dict[str, str] | None = None,
                  artifacts_destination: str | None = None) -> Iterator[ServerProcess]:
    """``mlflow server`` on 127.0.0.1 with a sqlite or PostgreSQL backend."""
    artifacts = artifacts_destination or (tmp / "artifacts").as_uri()
    if backend == "sqlite":
        with _running(f"sqlite:///{tmp / 'mlflow.db'}", artifacts, tmp, env) as server:
            yield server
    elif backend == "postgres":
        with fresh_postgres_database(os.environ[POSTGRES_ENV]) as url:
            # Name the driver: SQLAlchemy 2.0 (pinned for Prefect) reads a bare postgresql://
            # as psycopg2, which is not installed; cxr uses psycopg 3, as production does.
            backend_uri = url.replace("postgresql://", "postgresql+psycopg://", 1)
            with _running(backend_uri, artifacts, tmp, env) as server:
                yield server
    else:
        raise ValueError(backend)


@contextmanager
def _running(backend_uri: str, artifacts: str, tmp: Path,
             env: dict[str, str] | None) -> Iterator[ServerProcess]:
    server = start_mlflow_server(backend_uri, artifacts, tmp / "mlflow-server.log", env=env)
    try:
        yield server
    finally:
        server.stop()
