"""Prefect tasks: thin adapters over cxr_core stage functions.

Only tasks that talk to external services (MLflow, S3) retry, and only on transient I/O
errors (cxr_core.errors.is_transient); a rejected data set or gate is never retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
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
    # External sets are scanned by their own task: adding one does not re-validate the data.
    settings = cfg.model_dump_json(include={"seed", "data", "validation"},
                                   exclude={"data": {"external"}})
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
def train(run_dir: Path, cfg: ExperimentConfig, best_hp: dict[str, Any], live: Any | None = None,
          unlabeled_paths: list[str] | None = None) -> Any:
    """``live``: a LiveTracking, so the final training is an MLflow run while it trains;
    ``unlabeled_paths``: site images for the pseudo-label round."""
    return stages.train_stage(run_dir, cfg, best_hp, live=live, unlabeled_paths=unlabeled_paths)


@task(name="evaluate", **COMPUTE)
def evaluate(run_dir: Path, cfg: ExperimentConfig, manifest_path: Path) -> stages.EvaluatedModel:
    return stages.evaluate_stage(run_dir, cfg, manifest_path)


@task(name="scan-external", **COMPUTE)
def scan_external(sets: dict[str, str], calibration: str | None, manifest_path: Path,
                  cfg: ExperimentConfig, run_dir: Path,
                  unlabeled: str | None = None) -> stages.ExternalData:
    """Scan and check the external sets, the calibration sample and the unlabeled site
    images (before any training); every finding (excluded files, images or patients shared
    with the run) is a warning."""
    data = stages.external_scan_stage(sets, calibration, manifest_path, cfg, run_dir, unlabeled)
    for line in data.findings():
        get_run_logger().warning("external data: %s", line)
    return data


@task(name="score-external", **COMPUTE)
def score_external(run_dir: Path, cfg: ExperimentConfig, evaluated: stages.EvaluatedModel,
                   data: stages.ExternalData) -> stages.EvaluatedModel:
    """Score the external sets at the model's threshold; choose the site threshold."""
    return stages.external_stage(run_dir, cfg, evaluated, data)


@task(name="start-tracking", **IO_RETRIES)
def start_tracking(tracking_uri: str, experiment: str, cfg: ExperimentConfig, run_dir: Path,
                   data_dir: Path, artifact_location: str | None) -> stages.TrackingRefs:
    """The parent run, in ``experiment`` unless that one keeps artifacts in a local folder
    while a tracking server is in use (then in one whose artifacts reach the server's store)."""
    from cxr_core.lifecycle.artifact_root import experiment_for_tracking
    from cxr_core.settings import get_settings

    client = mlflow_client(tracking_uri)
    label = "s3" if get_settings().s3_bucket else "server"
    experiment = experiment_for_tracking(client, experiment, tracking_uri, label)
    return stages.start_tracking(client, experiment, cfg, run_dir, data_dir, artifact_location)


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
                decision: Any, external: stages.ExternalData | None = None) -> stages.TrackingRefs:
    return stages.log_results(mlflow_client(tracking_uri), refs, model_name, cfg, run_dir,
                               validated, trials, trained, evaluated, decision, external)


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


@dataclass(frozen=True)
class FanOut:
    """Where and how long: the worker deployment, the oracle's addresses (workers dial
    ``oracle_host``, the chief binds ``bind_host``) and the bounded waits."""

    deployment: str
    oracle_host: str
    bind_host: str
    start_timeout_s: float = 600.0
    join_timeout_s: float = 600.0
    search_timeout_s: float = 24 * 3600.0

    @classmethod
    def from_settings(cls, settings: Any) -> FanOut:
        return cls(settings.tuner_worker_deployment, settings.tuner_oracle_host,
                   settings.oracle_bind_host, settings.tuner_worker_start_timeout_s,
                   settings.tuner_worker_join_timeout_s, settings.tuner_search_timeout_s)


@task(name="start-tuner-worker", **IO_RETRIES)
def start_tuner_worker(deployment: str, work_dir: Path, tuner_id: str, oracle_ip: str,
                       oracle_port: int, profile: str, config: str | None,
                       live_tracking: dict[str, str] | None = None) -> Any:
    """Create one worker run of ``deployment`` (e.g. on the gpu pool); returns at once."""
    from prefect.deployments import run_deployment

    return run_deployment(name=deployment, timeout=0, parameters={
        "work_dir": str(work_dir), "tuner_id": tuner_id, "oracle_ip": oracle_ip,
        "oracle_port": oracle_port, "profile": profile, "config": config,
        "live_tracking": live_tracking})


def _start_chief(run_dir: Path, fan: FanOut, port: int, n_workers: int, profile: str,
                 config: str | None, log: Any) -> Any:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "flows.cli", "tune", "chief", "--work-dir", str(run_dir),
           "--oracle-ip", fan.bind_host, "--oracle-port", str(port), "--profile", profile,
           "--workers", str(n_workers), "--join-timeout", str(fan.join_timeout_s)]
    if config:
        cmd += ["--config", config]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _watch_workers(runs: dict[str, Any], run_dir: Path, chief: Any, fan: FanOut) -> None:
    """Until the chief finishes: cancel worker runs no worker picked up within the start
    timeout, and report every worker run that ended (gone) to the chief, which then stops
    waiting for it. Bounded by the search timeout."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    from cxr_core.training.search import mark_worker_gone

    logger = get_run_logger()
    started, gone = time.monotonic(), set()
    with get_client(sync_client=True) as client:
        while chief.poll() is None:
            if time.monotonic() - started > fan.search_timeout_s:
                raise TimeoutError(f"the distributed search ran over {fan.search_timeout_s:.0f} s")
            for tuner_id, run_id in runs.items():
                if tuner_id in gone:
                    continue
                state = client.read_flow_run(run_id).state
                never_started = state is not None and state.type in (StateType.SCHEDULED,
                                                                      StateType.PENDING)
                if never_started and time.monotonic() - started > fan.start_timeout_s:
                    logger.warning("no worker of %s picked up %s within %.0f s: cancelled, "
                                   "the search goes on without it (is a worker polling that "
                                   "pool?)", fan.deployment, tuner_id, fan.start_timeout_s)
                    client.set_flow_run_state(run_id, Cancelled(), force=True)
                elif not (state and state.is_final()):
                    continue
                elif not state.is_completed():
                    logger.warning("tuner worker %s ended %s", tuner_id, state.name)
                mark_worker_gone(run_dir, tuner_id)
                gone.add(tuner_id)
            time.sleep(2)


@task(name="distributed-tune", **COMPUTE)
def distributed_tune(run_dir: Path, cfg: ExperimentConfig, n_workers: int, fan: FanOut,
                     profile: str, config: str | None,
                     live: Any | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Keras Tuner's distributed mode: the chief (oracle) runs here as a subprocess, the
    workers as flow runs of ``fan.deployment``; then the finished search is read back. Every
    wait is bounded: workers that start late are told to stop, workers that never start are
    cancelled, a worker that dies hands its trial to another. With ``live`` (a LiveTracking),
    each worker logs its trials as nested runs of the pipeline's run while they train."""
    from flows.servers import free_port, stop_group

    port = free_port(fan.bind_host if fan.bind_host != "0.0.0.0" else "127.0.0.1")
    log = open(Path(run_dir) / "tuner-chief.log", "wb")  # noqa: SIM115
    chief = _start_chief(run_dir, fan, port, n_workers, profile, config, log)
    try:
        runs = {tid: start_tuner_worker(fan.deployment, run_dir, tid, fan.oracle_host, port,
                                        profile, config, live.env() if live else None).id
                for tid in (f"tuner{i}" for i in range(n_workers))}
        _watch_workers(runs, run_dir, chief, fan)
    finally:
        if chief.poll() is None:
            stop_group(chief.pid, process=chief)
        log.close()
    if chief.returncode != 0:
        tail = (Path(run_dir) / "tuner-chief.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"tuner chief exited with {chief.returncode}:\n{tail}")
    return stages.search_results(run_dir, cfg)


@task(name="check-resume-data", **COMPUTE)
def check_resume_data(spec: RunSpec, cfg: ExperimentConfig, fingerprint: str) -> None:
    """Refuse a resume on data other than the run's (rescans only when the listing changed)."""
    check_data_unchanged(spec, cfg, fingerprint)
