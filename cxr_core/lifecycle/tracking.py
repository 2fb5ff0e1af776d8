"""MLflow tracking through an explicit ``MlflowClient`` (no global run state).

One parent run per pipeline run, one nested run per tuner trial and one for the final
training. Every run uses the same metric names, so runs line up in the UI's compare view.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import cxr_core
from cxr_core.data.manifest import read_manifest
from cxr_core.lifecycle.client import make_client  # noqa: F401 - re-exported for callers
from cxr_core.lifecycle.model_card import MODEL_CARD_ARTIFACT, render_model_card, split_provenance
from cxr_core.lifecycle.registry import log_keras_model

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def git_commit(start: Path | None = None) -> str:
    """The commit of the checkout cxr runs from, or 'unknown' outside git."""
    where = start or Path(cxr_core.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The experiment id, created on first use (a concurrent creator is tolerated).
    ``artifact_location`` matters only without a tracking server."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location,
            tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another process created it first
        if exp is None:
            raise
        return exp.experiment_id


def standard_tags(manifest_hash: str, data_root: str, profile: str) -> dict[str, str]:
    """Tags every cxr run carries: data identity, code identity, profile."""
    return {
        "cxr.manifest_hash": manifest_hash,
        "cxr.dataset_root": data_root,
        "cxr.git_commit": git_commit(),
        "cxr.package_version": cxr_core.__version__,
        "cxr.profile": profile,
    }


def _params(values: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


def start_run(client: Any, experiment_id: str, name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create a run (nested under ``parent_run_id`` if given) and log its params and tags."""
    all_tags = {RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_RUN_ID_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=name)
    run_id = run.info.run_id
    if params:
        items = _params(params)
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log finite metrics in one batch (NaN would break the compare view's charts)."""
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and math.isfinite(float(v))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def log_history(client: Any, run_id: str, history: Mapping[str, Iterable[float]]) -> None:
    """Per-epoch metrics with the epoch as step."""
    for name, values in history.items():
        for step, value in enumerate(values):
            log_metrics(client, run_id, {name: value}, step=step)


def log_trials(client: Any, experiment_id: str, parent_run_id: str, trials: Iterable[Any],
               tags: Mapping[str, str] | None = None) -> list[str]:
    """One nested run per tuner trial: hyperparameters as params, per-epoch metrics, score."""
    run_ids = []
    for trial in trials:
        run_id = start_run(
            client, experiment_id, f"trial-{trial.trial_id}",
            params={f"hp.{k}": v for k, v in trial.hyperparameters.items()},
            tags={**(tags or {}), "cxr.stage": "tuning", "cxr.trial_id": trial.trial_id,
                  "cxr.trial_status": trial.status, "cxr.tuner_id": str(trial.tuner_id)},
            parent_run_id=parent_run_id)
        log_history(client, run_id, trial.metrics)
        if trial.score is not None:
            log_metrics(client, run_id, {"score": trial.score})
        client.set_terminated(run_id, "FINISHED" if trial.status == "COMPLETED" else "FAILED")
        run_ids.append(run_id)
    return run_ids


def log_dict_artifact(client: Any, run_id: str, data: Any, artifact_file: str) -> None:
    """A JSON artifact."""
    client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)


def log_dataset(client: Any, run_id: str, manifest: pd.DataFrame, name: str, digest: str,
                source: str, context: str = "training") -> None:
    """Dataset lineage (the manifest's hash and schema) as a run input."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    columns = [c for c in ("relpath", "split", "label", "patient_id", "sha256") if c in manifest]
    dataset = mlflow.data.from_pandas(manifest[columns], source=source, name=name,
                                      digest=digest[:36], targets="label")
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


def _model_card(model_name: str, cfg: Any, validated: Any, manifest: pd.DataFrame, trained: Any,
                evaluated: Any, decision: Any) -> str:
    """The card before registration; registration re-logs it naming the version and aliases
    (:func:`cxr_core.lifecycle.registry.refresh_model_card`)."""
    data_summary = {
        "data_root": validated.data_root, "manifest_hash": validated.manifest_hash,
        "split_counts": validated.split_counts, "image_size": cfg.data.image_size,
        "split_origins": split_provenance(manifest),
        "balancing": f"{cfg.balance.strategy}, target ratio {cfg.balance.target_ratio}"}
    return render_model_card(model_name, None, evaluated.evaluation, trained.threshold, decision,
                             data_summary, trained.hyperparameters, cfg.profile,
                             robustness=evaluated.robustness)


@dataclass
class TrackingRefs:
    """Where a pipeline run lives in MLflow."""

    experiment_id: str
    parent_run_id: str
    final_run_id: str | None = None
    model_version: str | None = None


def start_pipeline_run(client: Any, experiment_name: str, cfg: Any, run_dir: Path,
                   data_dir: Path, artifact_location: str | None = None) -> TrackingRefs:
    """The parent run of this pipeline run, with the full config as params."""
    exp_id = ensure_experiment(client, experiment_name, artifact_location)
    parent = start_run(client, exp_id, f"retrain-{Path(run_dir).name}", params=cfg.flat(),
                       tags={"cxr.stage": "pipeline", "cxr.run_dir": str(run_dir),
                             "cxr.dataset_root": str(data_dir), "cxr.profile": cfg.profile})
    return TrackingRefs(exp_id, parent)


def log_pipeline_results(
    client: Any,
    refs: TrackingRefs,
    model_name: str,
    cfg: Any,
    run_dir: Path,
    validated: Any,
    trials: list[Any],
    trained: Any,
    evaluated: Any,
    decision: Any,
) -> TrackingRefs:
    """Log trials (nested runs) and the final training run: params, per-epoch and test
    metrics, artifacts, dataset lineage, model card, and the model in the mlflow.keras flavor.
    Returns new refs carrying the final run id. A failed attempt marks its runs FAILED, so a
    retry's duplicates are told apart in the UI."""
    run_dir = Path(run_dir)
    tags = standard_tags(validated.manifest_hash, validated.data_root, cfg.profile)
    created: list[str] = []
    try:
        for key, value in tags.items():
            client.set_tag(refs.parent_run_id, key, value)
        created += log_trials(client, refs.experiment_id, refs.parent_run_id, trials, tags)
        final = start_run(client, refs.experiment_id, "final-training",
                          params={**cfg.flat(), **{f"hp.{k}": v for k, v in
                                                   trained.hyperparameters.items()}},
                          tags={**tags, "cxr.stage": "final"}, parent_run_id=refs.parent_run_id)
        created.append(final)
        log_history(client, final, trained.history)
        test_metrics = {f"test_{k}": v for k, v in evaluated.evaluation.flat().items()}
        t = trained.threshold
        log_metrics(client, final, {**test_metrics, "threshold": t.threshold,
                                    "val_recall_at_threshold": t.recall,
                                    "val_specificity_at_threshold": t.specificity,
                                    "epochs_trained": trained.epochs_trained,
                                    **{f"calibration_{k}": v for k, v in
                                       (trained.calibration or {}).items()}})
        log_metrics(client, final, evaluated.robustness)
        log_metrics(client, refs.parent_run_id, {**test_metrics, **evaluated.robustness})
        manifest = read_manifest(validated.manifest_path)
        log_dataset(client, final, manifest, "chest-xray-manifest", validated.manifest_hash,
                    validated.data_root)
        client.log_artifact(final, str(validated.manifest_path), "data")
        client.log_artifacts(final, str(validated.report_dir), "data/validation")
        lineage = run_dir / "augmentation_lineage.csv"
        if lineage.is_file():
            client.log_artifact(final, str(lineage), "data")
        client.log_artifacts(final, str(run_dir / "evaluation"), "evaluation")
        log_dict_artifact(client, final, decision.to_dict(), "gate_decision.json")
        log_dict_artifact(client, final, [tr.to_dict() for tr in trials], "tuning/trials.json")
        client.log_text(final, _model_card(model_name, cfg, validated, manifest, trained,
                                           evaluated, decision), MODEL_CARD_ARTIFACT)
        log_keras_model(client, final, run_dir / "model", cfg.data.image_size)
        client.set_tag(final, "cxr.gate_passed", str(bool(decision.passed)).lower())
        client.set_tag(final, "cxr.gate_decision", json.dumps(decision.to_dict())[:5000])
        client.set_tag(refs.parent_run_id, "cxr.gate_passed", str(decision.passed).lower())
        client.set_terminated(final, "FINISHED")
    except BaseException:
        for run_id in created:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
        raise
    return TrackingRefs(refs.experiment_id, refs.parent_run_id, final, None)
