"""The local stack: MLflow server, Prefect server and (optionally) an S3 endpoint on
127.0.0.1 as background process groups, with pid files and logs under <home>/stack."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.settings import Settings
from flows.servers import free_port, spawn_detached, start_mlflow_server, stop_group, wait_healthy

STATE_FILE = "stack.json"
DEV_S3_BUCKET = "cxr"
# moto's S3 accepts any credentials; these are placeholders, not secrets.
DEV_S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Service:
    name: str
    pid: int
    url: str
    health: str
    log: str


def stack_dir(settings: Settings) -> Path:
    return settings.home / "stack"


def read_state(settings: Settings) -> dict[str, Any]:
    path = stack_dir(settings) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    d = stack_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE_FILE).write_text(json.dumps(state, indent=2))
    for name, svc in state.get("services", {}).items():
        (d / f"{name}.pid").write_text(str(svc["pid"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _healthy(url: str) -> bool:
    try:
        wait_healthy(url, timeout=3)
        return True
    except (TimeoutError, RuntimeError):
        return False


def status(settings: Settings) -> list[tuple[Service, bool, bool]]:
    """(service, process alive, health check answered) for each recorded service."""
    out = []
    for name, svc in read_state(settings).get("services", {}).items():
        s = Service(name=name, **svc)
        alive = _alive(s.pid)
        out.append((s, alive, alive and _healthy(s.health)))
    return out


def _client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a process needs to use the stack (workers pass it on to their flow runs)."""
    services = state["services"]
    env = {"CXR_TRACKING_URI": services["mlflow"]["url"],
           "CXR_PREFECT_API_URL": services["prefect"]["url"],
           "PREFECT_API_URL": services["prefect"]["url"]}
    if state.get("s3"):
        env.update({"CXR_S3_ENDPOINT_URL": state["s3"]["endpoint_url"],
                    "CXR_S3_BUCKET": state["s3"]["bucket"], **DEV_S3_KEYS})
    return env


def start_worker(settings: Settings, state: dict[str, Any], pool: str, limit: int) -> None:
    """A process worker of ``pool`` (created if missing), recorded as service worker-<pool>.
    Without one, scheduled runs fire into an empty pool."""
    d = stack_dir(settings)
    log = d / f"worker-{pool}.log"
    port = free_port()
    env = {**_client_env(state), "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
    proc = spawn_detached(f"worker-{pool}", [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
        "--limit", str(limit), "--with-healthcheck"], log, env)
    url = f"http://127.0.0.1:{port}"
    state["services"][f"worker-{pool}"] = {"pid": proc.pid, "url": f"pool {pool}",
                                           "health": f"{url}/health", "log": str(log)}
    wait_healthy(f"{url}/health", proc, 120, log)


def up(settings: Settings, with_s3: bool = False, mlflow_port: int = 5000,
       prefect_port: int = 4200, gpu_worker: bool = False,
       workers: bool = True) -> dict[str, Any]:
    """Start the services that are not already running; returns the state."""
    if any(alive for _, alive, _ in status(settings)):
        raise RuntimeError("the stack is already (partly) running: `cxr stack down` first")
    d = stack_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    services: dict[str, Any] = {}
    env: dict[str, str] = {}
    state: dict[str, Any] = {"services": services}
    try:
        artifacts = (settings.home / "mlartifacts").as_uri()
        if with_s3:
            port = free_port()
            log = d / "s3.log"
            proc = spawn_detached("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], log, None)
            url = f"http://127.0.0.1:{port}"
            services["s3"] = {"pid": proc.pid, "url": url, "health": f"{url}/moto-api/",
                              "log": str(log)}
            wait_healthy(f"{url}/moto-api/", proc, 60, log)
            from cxr_core.lifecycle.storage import ensure_bucket, s3_client

            ensure_bucket(s3_client(url, DEV_S3_KEYS["AWS_ACCESS_KEY_ID"],
                                    DEV_S3_KEYS["AWS_SECRET_ACCESS_KEY"]), DEV_S3_BUCKET)
            env = {"MLFLOW_S3_ENDPOINT_URL": url, **DEV_S3_KEYS}
            artifacts = f"s3://{DEV_S3_BUCKET}/mlflow"
            state["s3"] = {"endpoint_url": url, "bucket": DEV_S3_BUCKET}
        settings.home.mkdir(parents=True, exist_ok=True)
        mlflow = start_mlflow_server(f"sqlite:///{settings.home / 'mlflow.db'}", artifacts,
                                     d / "mlflow.log", port=mlflow_port, env=env)
        services["mlflow"] = {"pid": mlflow.pid, "url": mlflow.url,
                              "health": f"{mlflow.url}/health", "log": str(mlflow.log_path)}
        log = d / "prefect.log"
        prefect_home = settings.home / "prefect"
        proc = spawn_detached("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                  "127.0.0.1", "--port", str(prefect_port)], log,
                      {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        url = f"http://127.0.0.1:{prefect_port}/api"
        services["prefect"] = {"pid": proc.pid, "url": url, "health": f"{url}/health",
                               "log": str(log)}
        wait_healthy(f"{url}/health", proc, 120, log)
        if workers:
            start_worker(settings, state, "cpu", 2)
        if gpu_worker:
            # Two tuner workers at once, as `cxr run --tuner-workers 2` starts them.
            start_worker(settings, state, "gpu", 2)
    except BaseException:
        for svc in services.values():
            stop_group(svc["pid"])
        raise
    _write_state(settings, state)
    return state


def schedule_status(api_url: str) -> dict[str, Any]:
    """Workers per work pool (name, status, last heartbeat) and the next scheduled flow run,
    from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    os.environ["PREFECT_API_URL"] = api_url
    with get_client(sync_client=True) as client:
        pools = {p.name: [(w.name, str(w.status.value if w.status else "?"), w.last_heartbeat_time)
                          for w in client.read_workers_for_work_pool(p.name)]
                 for p in client.read_work_pools()}
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
        nxt = None
        if runs:
            dep = client.read_deployment(runs[0].deployment_id) if runs[0].deployment_id else None
            flow = client.read_flow(runs[0].flow_id)
            nxt = {"deployment": f"{flow.name}/{dep.name}" if dep else flow.name,
                   "at": runs[0].expected_start_time}
    return {"pools": pools, "next": nxt}


def down(settings: Settings) -> list[str]:
    """Stop every recorded service (and its children); returns their names."""
    stopped = []
    # Workers first: they would otherwise log errors about the servers going away.
    services = read_state(settings).get("services", {})
    for name, svc in sorted(services.items(), key=lambda kv: not kv[0].startswith("worker")):
        stop_group(int(svc["pid"]))
        stopped.append(name)
        (stack_dir(settings) / f"{name}.pid").unlink(missing_ok=True)
    state_file = stack_dir(settings) / STATE_FILE
    state_file.unlink(missing_ok=True)
    return stopped


def apply_stack_env(settings: Settings) -> bool:
    """When the stack is up, point this process at it (explicit CXR_* settings win)."""
    state = read_state(settings)
    services = state.get("services", {})
    mlflow = services.get("mlflow")
    if not mlflow or not _alive(int(mlflow["pid"])):
        return False
    os.environ.setdefault("CXR_TRACKING_URI", mlflow["url"])
    prefect = services.get("prefect")
    if prefect and _alive(int(prefect["pid"])):
        os.environ.setdefault("CXR_PREFECT_API_URL", prefect["url"])
        os.environ.setdefault("PREFECT_API_URL", os.environ["CXR_PREFECT_API_URL"])
    s3 = state.get("s3")
    if s3 and "s3" in services and _alive(int(services["s3"]["pid"])):
        os.environ.setdefault("CXR_S3_ENDPOINT_URL", s3["endpoint_url"])
        os.environ.setdefault("CXR_S3_BUCKET", s3["bucket"])
        for key, value in DEV_S3_KEYS.items():
            os.environ.setdefault(key, value)
    return True
