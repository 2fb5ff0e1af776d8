"""What infra/docker-compose.yml describes, as real processes on 127.0.0.1: PostgreSQL as the
backend of MLflow (with basic auth, through mlflow/entrypoint.sh) and of Prefect, a moto S3
endpoint for artifacts, and process workers of the `cpu` and `gpu` pools."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.servers import free_port, spawn_detached, stop_group, wait_healthy
from support.servers import POSTGRES_ENV, fresh_postgres_database

REPO = Path(__file__).resolve().parents[2]
BUCKET = "cxr"
ADMIN_PASSWORD = "rehearsal-admin-password"  # test-only server, 12+ characters
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Production:
    """URLs, the environment every client and worker uses, and the started processes."""

    tmp: Path
    s3_url: str = ""
    mlflow_url: str = ""
    prefect_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "PREFECT_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "GX_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def _spawn(prod: Production, stack: ExitStack, name: str, cmd: list[str],
           env: dict[str, str], health: str, timeout: float = 150) -> None:
    proc = spawn_detached(name, cmd, prod.tmp / f"{name}.log", env)
    prod.pids[name] = proc.pid
    stack.callback(stop_group, proc.pid, process=proc)
    wait_healthy(health, proc, timeout, prod.tmp / f"{name}.log")


def _start_s3(prod: Production, stack: ExitStack) -> None:
    from cxr_core.lifecycle.storage import ensure_bucket, s3_client

    port = free_port()
    prod.s3_url = f"http://127.0.0.1:{port}"
    _spawn(prod, stack, "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], _base_env(), f"{prod.s3_url}/moto-api/", 60)
    ensure_bucket(s3_client(prod.s3_url, "testing", "testing"), BUCKET)


def _start_mlflow(prod: Production, stack: ExitStack, db: str, auth_db: str) -> None:
    """The compose service's configuration, through the image's entrypoint script."""
    port = free_port()
    prod.mlflow_url = f"http://127.0.0.1:{port}"
    env = {**_base_env(), **S3_KEYS,
           "MLFLOW_BACKEND_STORE_URI": db, "MLFLOW_AUTH_DATABASE_URI": auth_db,
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
           "MLFLOW_S3_ENDPOINT_URL": prod.s3_url, "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "rehearsal-secret",
           "MLFLOW_AUTH_CONFIG_TEMPLATE": str(REPO / "mlflow" / "basic_auth.ini"),
           "PYTHON": sys.executable}
    _spawn(prod, stack, "mlflow", ["bash", str(REPO / "mlflow" / "entrypoint.sh")], env,
           f"{prod.mlflow_url}/health")


def _start_prefect(prod: Production, stack: ExitStack, db: str) -> None:
    port = free_port()
    prod.prefect_url = f"http://127.0.0.1:{port}/api"
    env = {**_base_env(), "PREFECT_API_DATABASE_CONNECTION_URL": db,
           "PREFECT_HOME": str(prod.tmp / "prefect-home")}
    _spawn(prod, stack, "prefect", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                    "127.0.0.1", "--port", str(port)], env,
           f"{prod.prefect_url}/health", 180)


def start_worker(prod: Production, stack: ExitStack, pool: str, limit: int) -> None:
    """A process worker of ``pool``, as worker-cpu / worker-gpu in compose."""
    port = free_port()
    # Polls every 2 s (default 10): the rehearsal waits on each pickup (retrain, tuner runs).
    env = {**prod.env, "PREFECT_WORKER_WEBSERVER_PORT": str(port),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    _spawn(prod, stack, f"worker-{pool}", [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
        "--limit", str(limit), "--with-healthcheck"], env, f"http://127.0.0.1:{port}/health")


def _db_url(url: str, driver: str) -> str:
    return driver + "://" + url.split("://", 1)[1]


@contextmanager
def production_stack(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[Production]:
    """Every server of the compose stack (no workers yet: see :func:`start_worker`)."""
    base = os.environ[POSTGRES_ENV]
    prod = Production(tmp)
    with ExitStack() as stack:
        mlflow_db, auth_db, prefect_db = (stack.enter_context(fresh_postgres_database(base))
                                          for _ in range(3))
        # Servers stop before their databases are dropped (ExitStack unwinds in reverse).
        _start_s3(prod, stack)
        _start_mlflow(prod, stack, _db_url(mlflow_db, "postgresql+psycopg"),
                      _db_url(auth_db, "postgresql+psycopg"))
        _start_prefect(prod, stack, _db_url(prefect_db, "postgresql+asyncpg"))
        prod.env = {**_base_env(), **S3_KEYS, **(extra_env or {}),
                    "PREFECT_API_URL": prod.prefect_url, "CXR_PREFECT_API_URL": prod.prefect_url,
                    "CXR_HOME": str(tmp / "home"), "CXR_TRACKING_URI": prod.mlflow_url,
                    "MLFLOW_TRACKING_USERNAME": "admin",
                    "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
                    "CXR_S3_ENDPOINT_URL": prod.s3_url, "CXR_S3_BUCKET": BUCKET}
        yield prod


def s3_keys(prod: Production, prefix: str) -> list[str]:
    from cxr_core.lifecycle.storage import s3_client

    client = s3_client(prod.s3_url, "testing", "testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def mlflow_client(prod: Production, monkeypatch: Any) -> Any:
    """A client of the rehearsal's server, as admin (credentials set for this test only)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return MlflowClient(prod.mlflow_url, registry_uri=prod.mlflow_url)
