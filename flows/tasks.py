"""Prefect tasks: thin adapters over cxr_core stage functions.

Only tasks that talk to external services (MLflow, S3) retry, and only on transient I/O
errors (cxr_core.errors.is_transient); a rejected data set or gate is never retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cxr_core import stages
from cxr_core.config import ExperimentConfig
from cxr_core.errors import is_transient
from flows.clients import mlflow_client
from flows.run_spec import RunSpec, check_data_unchanged


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=_retry_on_io,
                  cache_policy=NO_CACHE)
COMPUTE = dict(cache_policy=NO_CACHE)


def _validation_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Same files (paths, sizes, mtimes) and same data/validation settings: same verdict."""
    import hashlib

    from cxr_core.data.manifest import listing_fingerprint

    cfg: ExperimentConfig = parameters["cfg"]
    settings = cfg.model_dump_json(include={"seed", "data", "validation"})
    return "validate-" + hashlib.sha256(
        (listing_fingerprint(parameters["data_dir"]) + settings).encode()).hexdigest()


@task(name="validate", cache_key_fn=_validation_cache_key, persist_result=True)
def validate(data_dir: Path, cfg: ExperimentConfig, run_dir: Path) -> stages.ValidatedData:
    """Cached on the data folder's fingerprint and the settings: an unchanged data set is not
    re-validated (a failed validation raises, so it is never cached)."""
    return stages.validate_stage(data_dir, cfg, run_dir)


def validated_data(data_dir: Path, cfg: ExperimentConfig, run_dir: Path) -> stages.ValidatedData:
    """The validation verdict for this run: cached when the data is unchanged (its manifest
    and report copied into ``run_dir``), validated again when the cached run's files are
    gone."""
    validated = validate(data_dir, cfg, run_dir)
    adopted = stages.adopt_validated(validated, run_dir)
    if adopted is None:
        return validate.with_options(refresh_cache=True)(data_dir, cfg, run_dir)
    return adopted


@task(name="balance", **COMPUTE)
def balance(manifest_path: Path, cfg: ExperimentConfig, run_dir: Path) -> Path:
    return stages.balance_stage(manifest_path, cfg, run_dir)


@task(name="tune", **COMPUTE)
def tune(run_dir: Path, cfg: ExperimentConfig,
         live: Any | None = None) -> tuple[list[Any], dict[str, Any]]:
    """``live``: a LiveTracking, so each trial is an MLflow run while it trains."""
    return stages.tune_stage(run_dir, cfg, live=live)


@task(name="train", **COMPUTE)
def train(run_dir: Path, cfg: ExperimentConfig, best_hp: dict[str, Any], live: Any | None = None) -> Any:
    """``live``: a LiveTracking, so the final training is an MLflow run while it trains."""
    return stages.train_stage(run_dir, cfg, best_hp, live=live)


@task(name="evaluate", **COMPUTE)
def evaluate(run_dir: Path, cfg: ExperimentConfig, manifest_path: Path) -> stages.EvaluatedModel:
    return stages.evaluate_stage(run_dir, cfg, manifest_path)


@task(name="start-tracking", **IO_RETRIES)
def start_tracking(tracking_uri: str, experiment: str, cfg: ExperimentConfig, run_dir: Path,
                   data_dir: Path, artifact_location: str | None) -> stages.TrackingRefs:
    return stages.start_tracking(mlflow_client(tracking_uri), experiment, cfg, run_dir, data_dir,
                                  artifact_location)


@task(name="compare-with-champion", **IO_RETRIES)
def compare_with_champion(tracking_uri: str, model_name: str,
                          predictions: Path) -> tuple[Any, str | None]:
    return stages.compare_stage(mlflow_client(tracking_uri), model_name, predictions)


@task(name="gate", **COMPUTE)
def gate(evaluated: stages.EvaluatedModel, cfg: ExperimentConfig, comparisons: Any,
         champion_version: str | None) -> Any:
    return stages.gate_stage(evaluated, cfg, comparisons, champion_version)


@task(name="log-results", **IO_RETRIES)
def log_results(tracking_uri: str, refs: stages.TrackingRefs, model_name: str,
                cfg: ExperimentConfig, run_dir: Path, validated: stages.ValidatedData,
                trials: list[Any], trained: Any, evaluated: stages.EvaluatedModel,
                decision: Any) -> stages.TrackingRefs:
    return stages.log_results(mlflow_client(tracking_uri), refs, model_name, cfg, run_dir,
                               validated, trials, trained, evaluated, decision)


@task(name="register", **IO_RETRIES)
def register(tracking_uri: str, refs: stages.TrackingRefs, model_name: str, decision: Any,
             trained: Any, evaluated: stages.EvaluatedModel,
             manifest_hash: str) -> stages.TrackingRefs:
    return stages.register_stage(mlflow_client(tracking_uri), refs, model_name, decision, trained,
                                  evaluated, manifest_hash)


@task(name="upload-data-artifacts", **IO_RETRIES)
def upload_data_artifacts(run_dir: Path) -> list[str]:
    """Manifest, validation report and lineage to the configured bucket (when one is set)."""
    from cxr_core.lifecycle.storage import client_from_settings, upload_run_data
    from cxr_core.settings import get_settings

    settings = get_settings()
    if not settings.s3_bucket:
        return []
    return upload_run_data(client_from_settings(settings), settings.s3_bucket,
                           settings.s3_prefix, run_dir)


@task(name="run-tuner-worker", **COMPUTE)
def run_tuner_worker(deployment: str, work_dir: Path, tuner_id: str, oracle_ip: str,
                     oracle_port: int, profile: str, config: str | None) -> str:
    """Start one tuner worker as a run of ``deployment`` (e.g. on the gpu pool) and wait."""
    from prefect.deployments import run_deployment

    run = run_deployment(name=deployment, parameters={
        "work_dir": str(work_dir), "tuner_id": tuner_id, "oracle_ip": oracle_ip,
        "oracle_port": oracle_port, "profile": profile, "config": config})
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"tuner worker {tuner_id} ended {run.state.name if run.state else '?'}")
    return tuner_id


@task(name="distributed-tune", **COMPUTE)
def distributed_tune(run_dir: Path, cfg: ExperimentConfig, n_workers: int, deployment: str,
                     oracle_host: str, profile: str, config: str | None) -> tuple[list[Any], dict[str, Any]]:
    """Keras Tuner's distributed mode: the chief (oracle) runs here as a subprocess, the
    workers as flow runs of ``deployment``; then the finished search is read back."""
    import subprocess
    import sys

    from flows.servers import free_port, stop_group

    port = free_port()
    log = open(Path(run_dir) / "tuner-chief.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "flows.cli", "tune", "chief", "--work-dir", str(run_dir),
           "--oracle-ip", "0.0.0.0" if oracle_host not in ("127.0.0.1", "localhost") else oracle_host,
           "--oracle-port", str(port), "--profile", profile]
    if config:
        cmd += ["--config", config]
    chief = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        futures = run_tuner_worker.map(deployment, run_dir, [f"tuner{i}" for i in range(n_workers)],
                                       oracle_host, port, profile, config)
        futures.result()
        chief.wait(timeout=600)
    finally:
        if chief.poll() is None:
            stop_group(chief.pid)
        log.close()
    if chief.returncode != 0:
        tail = (Path(run_dir) / "tuner-chief.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"tuner chief exited with {chief.returncode}:\n{tail}")
    return stages.search_results(run_dir, cfg)


@task(name="check-resume-data", **COMPUTE)
def check_resume_data(spec: RunSpec, cfg: ExperimentConfig, fingerprint: str) -> None:
    """Refuse a resume on data other than the run's (rescans only when the listing changed)."""
    check_data_unchanged(spec, cfg, fingerprint)
