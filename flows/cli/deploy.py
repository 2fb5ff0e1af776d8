"""``cxr deploy``: work pools and deployments on a Prefect server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxr_core.errors import is_transient
from flows.cli.common import EXIT_BAD_INPUT, fail


def deploy_cmd(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set the scheduled retrain uses, as the cpu worker sees it "
        "(required with a schedule).")] = None,
    cron: Annotated[str, typer.Option(help="Retrain schedule (cron, UTC).")] = "0 3 * * 1",
    no_schedule: Annotated[bool, typer.Option(
        "--no-schedule", help="Deploy the retrain flow without a schedule (retrain/default, "
        "run on demand with a data_dir parameter); --data-dir is then optional.")] = False,
    profile: Annotated[str | None, typer.Option(
        help="Profile of the retrain deployment (default: 'full' with a data folder, "
        "'quick' without).")] = None,
    cpu_pool: Annotated[str, typer.Option(help="Process work pool for CPU flows.")] = "cpu",
    gpu_pool: Annotated[str, typer.Option(help="Work pool of tuner workers.")] = "gpu",
    gpu_pool_type: Annotated[str, typer.Option(
        help="Type used if the gpu pool must be created: 'process' here, 'kubernetes' in "
        "production with infra/k8s/gpu-work-pool.json.")] = "process",
    retrain_on_drift: Annotated[bool, typer.Option(
        "--retrain-on-drift/--no-retrain-on-drift", help="Turn on the retrain-on-drift "
        "automation: a drifted prediction batch (cxr.drift.detected) runs the retrain "
        "deployment. It is created either way, off unless this is given.")] = False,
    prefect_yaml: Annotated[Path | None, typer.Option(
        "--prefect-yaml", help="Deployment definitions (default: ./prefect.yaml, else the "
        "repository's).")] = None,
) -> None:
    """Create the work pools (if missing) and prefect.yaml's deployments: retrain/scheduled
    (weekly on --data-dir by default), promote/promote, batch-predict/batch-predict and
    tune-worker/gpu. Needs a Prefect server (cxr stack up, or CXR_PREFECT_API_URL)."""
    import os

    from cxr_core.settings import get_settings
    from flows.deploy import deploy_all, deployment_specs, ensure_work_pool

    # The folder is the worker's view (e.g. /data in a container): not checked here.
    specs = deployment_specs(None if no_schedule else cron,
                             str(data_dir.resolve()) if data_dir else None, profile,
                             cpu_pool, gpu_pool, prefect_yaml)
    settings = get_settings()
    api = os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
    if not api:
        fail("no Prefect server: run `cxr stack up` or set CXR_PREFECT_API_URL", EXIT_BAD_INPUT)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.drift import AUTOMATION_NAME, ensure_drift_automation

    # The server for this command only, as a settings context: setting os.environ instead was
    # not always read (after a Prefect test harness in the same process, deploy went to a
    # throw-away temporary server), and it leaked into whatever the process ran next.
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            ensure_work_pool(cpu_pool, "process")
            ensure_work_pool(gpu_pool, gpu_pool_type)
            ids = deploy_all(specs)
            retrain_id = next(i for spec, i in zip(specs, ids)
                              if spec.full_name.startswith("retrain/"))
            ensure_drift_automation(retrain_id, enabled=retrain_on_drift)
    except Exception as exc:
        if not is_transient(exc):
            raise
        fail(f"the Prefect server at {api} did not answer: {exc}", EXIT_BAD_INPUT)
    for spec in specs:
        typer.echo(f"deployed {spec.full_name} on pool {spec.pool}"
                   + (f", cron '{spec.cron}'" if spec.cron else "")
                   + (f", concurrency {spec.concurrency_limit}" if spec.concurrency_limit else ""))
    typer.echo(f"automation {AUTOMATION_NAME}: {'on' if retrain_on_drift else 'off'} (runs "
               "retrain on cxr.drift.detected; --retrain-on-drift turns it on)")
    typer.echo(f"start workers: prefect worker start --pool {cpu_pool}  (and --pool {gpu_pool} "
               "on GPU machines)")
