"""MLflow tracking through an explicit ``MlflowClient`` (no global run state).

One parent run per pipeline run, one nested run per tuner trial and one for the final
training. Every run uses the same metric names, so runs line up in the UI's compare view.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import cxr_core

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def make_client(tracking_uri: str) -> Any:
    """An MlflowClient bound to ``tracking_uri`` (registry on the same server)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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
