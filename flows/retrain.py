"""The retraining flow: validate -> balance -> tune -> train -> evaluate -> gate -> register."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cxr_core.config import load_config
from cxr_core.errors import ConfigError, GateRejected
from cxr_core.settings import Settings, get_settings
from cxr_core.stages import new_run_dir
from flows import tasks


def ensure_demo_data(settings: Settings, n_per_class: int, size: int, seed: int) -> Path:
    """The synthetic demo data set under the state home, generated on first use."""
    from cxr_core.data.synth import synthesize_dataset

    root = settings.demo_data_dir / f"n{n_per_class}-s{size}-seed{seed}"
    if not (root / "train").is_dir():
        synthesize_dataset(root, n_per_class=n_per_class, size=size, seed=seed)
    return root


def _summary_markdown(result: dict[str, Any], decision: Any, evaluation: Any) -> str:
    from cxr_core.lifecycle.model_card import metrics_table

    version = result.get("model_version")
    return f"""# cxr retrain: {'registered version ' + version if version else 'not registered'}

- MLflow run: {result['mlflow_run_url']}
- Model: {result.get('model_uri') or 'none (gates rejected the candidate)'}
- Work directory: `{result['run_dir']}`

## Test metrics (at threshold {result['threshold']:.4f}, 95% bootstrap intervals)
{metrics_table(evaluation)}

## Gates
```
{decision.summary()}
```
"""


@flow(name="retrain", log_prints=True)
def retrain_flow(data_dir: str | None = None, profile: str = "quick",
                 config: str | None = None, tuner_workers: int = 0,
                 resume: str | None = None) -> dict[str, Any]:
    """Retrain on ``data_dir`` (default: the synthetic demo set) with a config profile; ends
    Failed with the reason when validation or the gates reject. ``tuner_workers`` > 0 runs the
    search distributed: that many workers as runs of the tuner-worker deployment (e.g. on the
    gpu pool), the chief beside this flow. ``resume`` names an earlier run (its work directory
    under <home>/runs) to continue: completed tuner trials are not rerun."""
    logger = get_run_logger()
    settings = get_settings()
    cfg = load_config(Path(config) if config else None, profile)
    data = Path(data_dir) if data_dir else ensure_demo_data(
        settings, cfg.synth.n_per_class, cfg.synth.size, cfg.seed)
    if resume:
        run_dir = settings.runs_dir / resume
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume {resume!r}: {run_dir} does not exist")
    else:
        run_dir = new_run_dir(settings.runs_dir)
    uri = settings.mlflow_tracking_uri
    logger.info("run dir %s, data %s, profile %s, tracking %s", run_dir, data, cfg.profile, uri)

    refs = tasks.start_tracking(uri, settings.experiment_name, cfg, run_dir, data,
                                settings.artifact_location)
    timings: dict[str, float] = {}
    try:
        with _timed(timings, "validate"):
            validated = tasks.validated_data(data, cfg, run_dir)
        with _timed(timings, "balance"):
            prepared = tasks.balance(validated.manifest_path, cfg, run_dir)
            uploaded = tasks.upload_data_artifacts(run_dir)
        if uploaded:
            logger.info("data artifacts: %d file(s) under %s", len(uploaded),
                        uploaded[0].rsplit("/", 1)[0])
        with _timed(timings, "tune"):
            if tuner_workers > 0:
                trials, best_hp = tasks.distributed_tune(
                    run_dir, cfg, tuner_workers, settings.tuner_worker_deployment,
                    settings.tuner_oracle_host, profile, config)
            else:
                trials, best_hp = tasks.tune(run_dir, cfg)
        logger.info("search: %d trials, best %s", len(trials), best_hp)
        with _timed(timings, "train"):
            trained = tasks.train(run_dir, cfg, best_hp)
        with _timed(timings, "evaluate"):
            evaluated = tasks.evaluate(run_dir, cfg, prepared)
            comparisons, champion = tasks.compare_with_champion(
                uri, settings.registered_model_name, prepared, cfg.data.image_size,
                evaluated.predictions_path)
            decision = tasks.gate(evaluated, cfg, comparisons, champion)
        with _timed(timings, "log_and_register"):
            refs = tasks.log_results(uri, refs, settings.registered_model_name, cfg, run_dir,
                                     validated, trials, trained, evaluated, decision)
            refs = tasks.register(uri, refs, settings.registered_model_name, decision, trained,
                                  evaluated, validated.manifest_hash)
    except BaseException:
        _end_parent_run(uri, refs.parent_run_id)
        raise

    result = {
        "run_dir": str(run_dir),
        "mlflow_run_id": refs.parent_run_id,
        "mlflow_final_run_id": refs.final_run_id,
        "mlflow_run_url": _run_link(uri, refs.experiment_id, refs.parent_run_id),
        "model_version": refs.model_version,
        "model_uri": (f"models:/{settings.registered_model_name}/{refs.model_version}"
                      if refs.model_version else None),
        "threshold": trained.threshold.threshold,
        "gate_passed": decision.passed,
        "data_artifacts": uploaded,
        "test_metrics": evaluated.evaluation.point(),
        "robust_worst": {k.removeprefix("robust_worst_"): v
                         for k, v in evaluated.robustness.items()
                         if k.startswith("robust_worst_")},
        "calibration": trained.calibration,
        "best_hyperparameters": trained.hyperparameters,
        "trials": len(trials),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    logger.info("stage times (s): %s", result["stage_seconds"])
    create_markdown_artifact(key="retrain-summary",
                             markdown=_summary_markdown(result, decision, evaluated.evaluation),
                             description="Test metrics, gate decision and registry outcome")
    create_table_artifact(key="test-metrics", table=[
        {"metric": k, "value": round(iv.value, 4), "ci_low": round(iv.low, 4),
         "ci_high": round(iv.high, 4)} for k, iv in evaluated.evaluation.metrics.items()])
    create_table_artifact(key="tuner-trials", table=[
        {"trial": t.trial_id, "score": t.score, "status": t.status,
         **{k: v for k, v in t.hyperparameters.items() if not k.startswith("tuner/")}}
        for t in trials])
    if not decision.passed:
        raise GateRejected(f"gates rejected the candidate (logged, not registered):\n"
                           f"{decision.summary()}", decision)
    return result


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of a stage (reported in the result and the benchmarks)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A clickable UI link for a tracking server; the store and ids otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{tracking_uri} (experiment {experiment_id}, run {run_id}; open with `mlflow ui`)"


def _end_parent_run(tracking_uri: str, run_id: str) -> None:
    """Mark the pipeline's MLflow run FAILED; best effort (the original error matters)."""
    try:
        from cxr_core.lifecycle.tracking import make_client

        client = make_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001
        pass
