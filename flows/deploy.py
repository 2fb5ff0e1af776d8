"""Deployments: a scheduled retrain, promote, batch predict and the tuner worker, on the
`cpu` (process) and `gpu` work pools.

One definition: prefect.yaml. ``prefect deploy --all`` registers it in production; ``cxr
deploy`` reads the same file and registers the same deployments (names, pools, schedules,
concurrency limits) against any Prefect server, so using both never gives two sets. The
entrypoints are module paths (``flows.retrain:retrain_flow``) with no pull step: a worker
imports the cxr package installed where it runs (the trainer images, or a host install), never
this machine's checkout path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = "prefect.yaml"
RETRAIN = "scheduled"  # the retrain deployment's name: retrain/scheduled


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # module path: flows.<module>:<flow function>
    pool: str
    cron: str | None = None
    parameters: dict[str, Any] | None = None
    concurrency_limit: int | None = None
    job_variables: dict[str, Any] | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def flow_name(self) -> str:
        """The flow's name as Prefect shows it (retrain_flow -> retrain)."""
        return self.entrypoint.split(":")[1].removesuffix("_flow").replace("_", "-")

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def find_prefect_yaml(path: Path | None = None) -> Path:
    """prefect.yaml: the given one, the working directory's, or the repository's."""
    for candidate in ([path] if path else [Path.cwd() / PREFECT_YAML, REPO_ROOT / PREFECT_YAML]):
        if candidate.is_file():
            return candidate
    raise InputError(f"no {PREFECT_YAML} found (give --prefect-yaml, or run from the repository "
                     "root / the image's /opt/cxr)")


def load_specs(path: Path | None = None) -> list[DeploymentSpec]:
    """The deployments prefect.yaml defines, as they would be registered."""
    import yaml

    doc = yaml.safe_load(find_prefect_yaml(path).read_text())
    specs = []
    for d in doc["deployments"]:
        crons = [s["cron"] for s in d.get("schedules") or [] if s.get("active", True) and "cron" in s]
        specs.append(DeploymentSpec(
            name=d["name"], entrypoint=d["entrypoint"], pool=d["work_pool"]["name"],
            cron=crons[0] if crons else None, parameters=dict(d.get("parameters") or {}),
            concurrency_limit=d.get("concurrency_limit"),
            job_variables=dict(d["work_pool"].get("job_variables") or {}),
            description=d.get("description"), tags=tuple(d.get("tags") or ())))
    return specs


def deployment_specs(cron: str | None, data_dir: str | None, profile: str | None,
                     cpu_pool: str = "cpu", gpu_pool: str = "gpu",
                     path: Path | None = None) -> list[DeploymentSpec]:
    """prefect.yaml's deployments with this machine's choices applied: the retrain schedule
    (None: on demand), its data folder and profile, and the pool names. Deployment names never
    change. A schedule needs a data folder: without one every run would retrain on the
    synthetic demo set."""
    if cron and not data_dir:
        raise InputError("a scheduled retrain needs a data folder (as the worker sees it): "
                         "give --data-dir, or deploy without a schedule (--no-schedule)")
    pools = {"cpu": cpu_pool, "gpu": gpu_pool}
    out = []
    for spec in load_specs(path):
        params = copy.deepcopy(spec.parameters or {})
        spec_cron = spec.cron
        if spec.name == RETRAIN:
            params.pop("data_dir", None)
            params = {k: v for k, v in params.items() if v is not None}
            params.pop("profile", None)
            if profile:
                params["profile"] = profile
            if data_dir:
                params["data_dir"] = data_dir
            spec_cron = cron or None
        out.append(DeploymentSpec(
            spec.name, spec.entrypoint, pools.get(spec.pool, spec.pool), spec_cron, params,
            spec.concurrency_limit, spec.job_variables, spec.description, spec.tags))
    return out


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


def deploy_all(specs: list[DeploymentSpec]) -> list[str]:
    """Register each deployment (module entrypoint, no pull step); returns their ids. A
    deployment without a cron loses any schedule an earlier deploy gave it."""
    from prefect.deployments.runner import RunnerDeployment

    ids = []
    for spec in specs:
        deployment = RunnerDeployment.from_entrypoint(
            spec.entrypoint, name=spec.name, work_pool_name=spec.pool, cron=spec.cron,
            parameters=spec.parameters or {}, concurrency_limit=spec.concurrency_limit,
            job_variables=spec.job_variables or {}, description=spec.description,
            tags=list(spec.tags))
        deployment._path = None  # type: ignore[assignment]  # never this machine's checkout
        ids.append(str(deployment.apply()))
    return ids
