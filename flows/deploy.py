"""Deployments: a scheduled retrain, promote, batch predict and the tuner worker, on the
`cpu` (process) and `gpu` work pools. Production uses prefect.yaml; this is the same from
the command line against any Prefect server (the local stack included)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str
    pool: str
    cron: str | None = None
    parameters: dict[str, Any] | None = None


def deployment_specs(cron: str | None, data_dir: str | None, profile: str | None,
                     cpu_pool: str, gpu_pool: str) -> list[DeploymentSpec]:
    """What `cxr deploy` creates: the retrain deployment ('scheduled' with a cron, else
    'default', run on demand), promote, batch-predict and the tuner worker. A schedule needs
    a data folder: without one every run would retrain on the synthetic demo set."""
    if cron and not data_dir:
        raise InputError("a scheduled retrain needs a data folder (as the worker sees it): "
                         "give --data-dir, or deploy without a schedule (--no-schedule)")
    retrain_params: dict[str, Any] = {}
    if profile:
        retrain_params["profile"] = profile
    if data_dir:
        retrain_params["data_dir"] = data_dir
    return [
        DeploymentSpec("scheduled" if cron else "default", "flows/retrain.py:retrain_flow",
                       cpu_pool, cron or None, retrain_params),
        DeploymentSpec("default", "flows/promote.py:promote_flow", cpu_pool),
        DeploymentSpec("default", "flows/batch_predict.py:batch_predict_flow", cpu_pool),
        DeploymentSpec(gpu_pool, "flows/tune_worker.py:tune_worker_flow", gpu_pool),
    ]


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool unless it exists; returns True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
        except ObjectAlreadyExists:
            return False
    return True


def deploy_all(specs: list[DeploymentSpec], source: Path = REPO_ROOT) -> list[str]:
    """Register each deployment from this checkout; returns their ids."""
    from prefect import flow

    ids = []
    for spec in specs:
        remote = flow.from_source(source=str(source), entrypoint=spec.entrypoint)
        ids.append(str(remote.deploy(
            name=spec.name, work_pool_name=spec.pool, cron=spec.cron,
            parameters=spec.parameters or {}, build=False, push=False, print_next_steps=False,
        )))
    return ids
