"""MLflow tracking through an explicit ``MlflowClient`` (no global run state).

One parent run per pipeline run, one nested run per tuner trial and one for the final
training. Every run uses the same metric names, so runs line up in the UI's compare view.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import cxr_core
from cxr_core.data.manifest import read_manifest
from cxr_core.evaluation.external import external_metrics
from cxr_core.lifecycle.client import make_client  # noqa: F401 - re-exported for callers
from cxr_core.lifecycle.model_card import MODEL_CARD_ARTIFACT, render_model_card, split_provenance
from cxr_core.lifecycle.registry import SUMMARY_ARTIFACT, log_keras_model
from cxr_core.settings import temporary_env

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
NOTE_TAG = "mlflow.note.content"  # the run page's description
# A search's trials may run in other processes (distributed workers): they find the pipeline's
# parent run through these variables and log each trial live, as it trains.
TRACKING_URI_ENV = "CXR_LIVE_TRACKING_URI"
PARENT_RUN_ENV = "CXR_LIVE_PARENT_RUN_ID"


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


def _log_pseudo_labels(client: Any, run_id: str, summary: Mapping[str, Any]) -> None:
    """``pseudo_label_*`` metrics: each round's counts at its round number as the step (the
    latest, which MLflow shows, is the last round's), and ``pseudo_label_rounds``."""
    if not summary:
        return
    log_metrics(client, run_id, {"pseudo_label_rounds": summary["rounds"]})
    for step, counts in enumerate(summary.get("per_round") or [summary], start=1):
        log_metrics(client, run_id, {f"pseudo_label_{k}": v for k, v in counts.items()
                                     if k not in ("rounds", "per_round")}, step=step)


def log_history(client: Any, run_id: str, history: Mapping[str, Iterable[float]]) -> None:
    """Per-epoch metrics with the epoch as step."""
    for name, values in history.items():
        for step, value in enumerate(values):
            log_metrics(client, run_id, {name: value}, step=step)


def live_trial_runs(client: Any, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> run id of the trials already logged live under ``parent_run_id``."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                              "and tags.`cxr.stage` = 'tuning'", max_results=5000)
    return {r.data.tags["cxr.trial_id"]: r.info.run_id for r in runs if "cxr.trial_id" in r.data.tags}


def log_trials(client: Any, experiment_id: str, parent_run_id: str, trials: Iterable[Any],
               tags: Mapping[str, str] | None = None) -> list[str]:
    """One nested run per tuner trial: hyperparameters as params, per-epoch metrics, score.
    A trial that was logged live (:func:`live_run` in the tuner) keeps its run: only its
    score, status and ``tags`` are added, so a trial never gets two runs."""
    live = live_trial_runs(client, experiment_id, parent_run_id)
    run_ids = []
    for trial in trials:
        if trial.trial_id in live:
            run_id = live[trial.trial_id]
            for key, value in {**(tags or {}), "cxr.trial_status": trial.status}.items():
                client.set_tag(run_id, key, value)
            if trial.score is not None:
                log_metrics(client, run_id, {"score": trial.score})
            run_ids.append(run_id)
            continue
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


@dataclass(frozen=True)
class LiveTracking:
    """Where live runs go: the tracking server and the pipeline's parent run. Plain strings,
    so it crosses process boundaries (task arguments, environment variables)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment variables a tuner process reads back with :meth:`from_env`."""
        return {TRACKING_URI_ENV: self.tracking_uri, PARENT_RUN_ENV: self.parent_run_id}

    @classmethod
    def from_env(cls) -> LiveTracking | None:
        """The live tracking this process was given, or None (then trials are logged after
        the search, as before)."""
        uri, parent = os.environ.get(TRACKING_URI_ENV), os.environ.get(PARENT_RUN_ENV)
        if not (uri and parent):
            return None
        run = make_client(uri).get_run(parent)
        inherited = {k: v for k, v in run.data.tags.items()
                     if k in ("cxr.manifest_hash", "cxr.dataset_root", "cxr.profile")}
        return cls(uri, run.info.experiment_id, parent, inherited)


@contextmanager
def tracking_env(live: LiveTracking | None) -> Iterator[None]:
    """Set :meth:`LiveTracking.env` for the duration of a search (restored afterwards)."""
    if live is None:
        yield
        return
    with temporary_env(live.env()):
        yield


def start_system_metrics(run_id: str, tracking_uri: str) -> Any | None:
    """MLflow's CPU, memory, disk and network sampler for ``run_id`` (its interval:
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, default 10 s); None when psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    except ImportError as exc:
        print(f"[mlflow] no system metrics for run {run_id}: {exc}", flush=True)
        return None
    monitor.start()
    return monitor


@contextmanager
def live_run(live: LiveTracking, name: str, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, str] | None = None) -> Iterator[tuple[Any, str]]:
    """A nested run that lives exactly as long as the block: created on entry (so the UI
    shows it running), system metrics sampled meanwhile, FINISHED on exit or FAILED on an
    error. Yields ``(client, run_id)`` for a per-epoch logger
    (:func:`cxr_core.training.callbacks.mlflow_epoch_logger`)."""
    client = make_client(live.tracking_uri)
    run_id = start_run(client, live.experiment_id, name, params,
                       {**live.tags, **(tags or {})}, parent_run_id=live.parent_run_id)
    monitor = start_system_metrics(run_id, live.tracking_uri)
    status = "FAILED"
    try:
        yield client, run_id
        status = "FINISHED"
    finally:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(run_id, status)


def log_dict_artifact(client: Any, run_id: str, data: Any, artifact_file: str) -> None:
    """A JSON artifact."""
    client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)


@dataclass(frozen=True)
class DataInput:
    """A data set a run saw, for the runs table's Dataset column: the manifest rows, its
    digest (the manifest hash), where it came from, and the role it played (``training`` for
    the manifest the model was fitted, tuned and tested on; ``external`` for each external
    set, one more entry per set)."""

    name: str
    manifest: pd.DataFrame
    digest: str
    source: str
    context: str = "training"

    def entity(self) -> Any:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        columns = [c for c in ("relpath", "split", "label", "patient_id", "sha256")
                   if c in self.manifest]
        dataset = mlflow.data.from_pandas(self.manifest[columns], source=self.source,
                                          name=self.name, digest=self.digest[:36],
                                          targets="label" if "label" in columns else None)
        return DatasetInput(dataset._to_mlflow_entity(),
                            tags=[InputTag("mlflow.data.context", self.context)])


def log_data_inputs(client: Any, run_ids: Iterable[str], inputs: Iterable[DataInput]) -> None:
    """Every data set of ``inputs`` as an input of every run of ``run_ids``."""
    entities = [i.entity() for i in inputs]
    if entities:
        for run_id in run_ids:
            client.log_inputs(run_id, datasets=entities)


def log_dataset(client: Any, run_id: str, manifest: pd.DataFrame, name: str, digest: str,
                source: str, context: str = "training") -> None:
    """Dataset lineage (the manifest's hash and schema) as a run input."""
    log_data_inputs(client, [run_id], [DataInput(name, manifest, digest, source, context)])


def _data_summary(cfg: Any, validated: Any, manifest: pd.DataFrame) -> dict[str, Any]:
    """What the model card says about the data."""
    return {
        "data_root": validated.data_root, "manifest_hash": validated.manifest_hash,
        "split_counts": validated.split_counts, "image_size": cfg.data.image_size,
        "split_origins": split_provenance(manifest),
        "balancing": f"{cfg.balance.strategy}, target ratio {cfg.balance.target_ratio}",
        **shortcut_summary(cfg, manifest)}


def shortcut_summary(cfg: Any, manifest: pd.DataFrame) -> dict[str, Any]:
    """The model card's shortcut audit: per score and split AUCs from the manifest's score
    columns, the warning level, and the mitigations the config turned on."""
    from cxr_core.evaluation.shortcuts import score_aucs

    crop = cfg.train.lung_crop
    mask = cfg.train.mask_annotations
    used = [f"annotation mask `{mask}` ({cfg.train.mask_fill} fill)"] if mask != "none" else []
    if any(crop.as_tuple()):
        used.append(f"lung crop (top {crop.top}, bottom {crop.bottom}, sides {crop.sides})")
    if cfg.balance.augment.synthetic_marker_prob:
        used.append(f"synthetic markers on {cfg.balance.augment.synthetic_marker_prob:.0%} of "
                    "training images")
    return {"shortcut_scores": score_aucs(manifest),
            "shortcut_auc_warn": cfg.validation.shortcut_auc_warn,
            "shortcut_mitigations": ", ".join(used) or "none"}


def _model_card(model_name: str, cfg: Any, validated: Any, manifest: pd.DataFrame, trained: Any,
                evaluated: Any, decision: Any) -> str:
    """The card before registration; registration re-logs it naming the version and aliases
    (:func:`cxr_core.lifecycle.registry.refresh_model_card`)."""
    return render_model_card(model_name, None, evaluated.evaluation, trained.threshold, decision,
                             _data_summary(cfg, validated, manifest), trained.hyperparameters,
                             cfg.profile, robustness=evaluated.robustness,
                             external=getattr(evaluated, "external", None),
                             site_threshold=getattr(evaluated, "site_threshold", None))


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
    external_inputs: Iterable[DataInput] = (),
) -> TrackingRefs:
    """Log trials (nested runs) and the final training run: params, per-epoch and test
    metrics, artifacts, dataset inputs, model card and summary (the run's description), and
    the model in the mlflow.keras flavor. Runs logged live (trials in the tuner, the final
    training with ``trained.run_id``) are completed, not duplicated, and keep their real
    start and end times. ``external_inputs``: external sets, logged as inputs beside the
    manifest. Returns refs carrying the final run id. A failed attempt marks the runs it
    created FAILED, so a retry's duplicates are told apart in the UI."""
    tags = standard_tags(validated.manifest_hash, validated.data_root, cfg.profile)
    live_trials = set(live_trial_runs(client, refs.experiment_id, refs.parent_run_id).values())
    created: list[str] = []
    try:
        for key, value in tags.items():
            client.set_tag(refs.parent_run_id, key, value)
        trial_runs = log_trials(client, refs.experiment_id, refs.parent_run_id, trials, tags)
        created += [r for r in trial_runs if r not in live_trials]
        live_final = getattr(trained, "run_id", None)
        final = live_final or start_run(
            client, refs.experiment_id, "final-training",
            params={**cfg.flat(), **{f"hp.{k}": v for k, v in trained.hyperparameters.items()}},
            tags={"cxr.stage": "final"}, parent_run_id=refs.parent_run_id)
        if not live_final:
            created.append(final)
            log_history(client, final, trained.history)
        for key, value in tags.items():
            client.set_tag(final, key, value)
        manifest = read_manifest(validated.manifest_path)
        inputs = [DataInput("chest-xray-manifest", manifest, validated.manifest_hash,
                            validated.data_root), *external_inputs]
        log_data_inputs(client, [refs.parent_run_id, *trial_runs, final], inputs)
        _log_final_metrics(client, refs.parent_run_id, final, trained, evaluated)
        _log_final_artifacts(client, final, Path(run_dir), validated, trials, decision)
        _log_card_and_model(client, final, Path(run_dir), model_name, cfg, validated, manifest,
                            trained, evaluated, decision)
        _set_gate_tags(client, [final, refs.parent_run_id], decision)
        if not live_final:  # a live run ended with its training: keep its duration
            client.set_terminated(final, "FINISHED")
    except BaseException:
        for run_id in created:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
        raise
    return TrackingRefs(refs.experiment_id, refs.parent_run_id, final, None)


def _log_final_metrics(client: Any, parent: str, final: str, trained: Any, evaluated: Any) -> None:
    """Test metrics (with interval bounds), the threshold's validation figures, calibration
    and robustness on the final run; test, robustness, external-set and site-threshold
    metrics on both."""
    test_metrics = {f"test_{k}": v for k, v in evaluated.evaluation.flat().items()}
    t = trained.threshold
    log_metrics(client, final, {**test_metrics, "threshold": t.threshold,
                                "val_recall_at_threshold": t.recall,
                                "val_specificity_at_threshold": t.specificity,
                                "epochs_trained": trained.epochs_trained,
                                **{f"calibration_{k}": v for k, v in
                                   (trained.calibration or {}).items()}})
    _log_pseudo_labels(client, final, getattr(trained, "pseudo_labels", None) or {})
    log_metrics(client, final, evaluated.robustness)
    log_metrics(client, parent, {**test_metrics, **evaluated.robustness})
    # External sets (external_<name>_<metric>, with interval bounds) and the site threshold.
    outside = external_metrics(getattr(evaluated, "external", None) or {})
    site = getattr(evaluated, "site_threshold", None)
    if site is not None:
        outside.update(site.metrics())
    for run_id in (final, parent):
        log_metrics(client, run_id, outside)


def _log_final_artifacts(client: Any, final: str, run_dir: Path, validated: Any,
                         trials: list[Any], decision: Any) -> None:
    """Manifest, validation report, lineage, evaluation figures, gate decision, trials."""
    from cxr_core.lifecycle.model_card import gate_markdown

    client.log_artifact(final, str(validated.manifest_path), "data")
    client.log_artifacts(final, str(validated.report_dir), "data/validation")
    lineage = run_dir / "augmentation_lineage.csv"
    if lineage.is_file():
        client.log_artifact(final, str(lineage), "data")
    client.log_artifacts(final, str(run_dir / "evaluation"), "evaluation")
    log_dict_artifact(client, final, decision.to_dict(), "gate_decision.json")
    client.log_text(final, gate_markdown(decision), "gate_decision.md")
    log_dict_artifact(client, final, [tr.to_dict() for tr in trials], "tuning/trials.json")


def _log_card_and_model(client: Any, final: str, run_dir: Path, model_name: str, cfg: Any,
                        validated: Any, manifest: pd.DataFrame, trained: Any, evaluated: Any,
                        decision: Any) -> None:
    """The model card, its summary (also the run's description, and the registered
    version's once registered) and the model."""
    from cxr_core.lifecycle.model_card import card_summary

    client.log_text(final, _model_card(model_name, cfg, validated, manifest, trained,
                                       evaluated, decision), MODEL_CARD_ARTIFACT)
    summary = card_summary(evaluated.evaluation, decision, _data_summary(cfg, validated, manifest),
                           getattr(evaluated, "external", None))
    client.log_text(final, summary, SUMMARY_ARTIFACT)
    client.set_tag(final, NOTE_TAG, summary)
    log_keras_model(client, final, run_dir / "model", cfg.data.image_size)


def _set_gate_tags(client: Any, run_ids: Iterable[str], decision: Any) -> None:
    """Short, filterable tags (``tags.cxr.gate_passed = 'false'``); the detail lives in
    ``gate_decision.md`` and ``gate_decision.json``."""
    from cxr_core.lifecycle.registry import GATE_FAILED_TAG, GATE_TAG, gate_failed

    for run_id in run_ids:
        client.set_tag(run_id, GATE_TAG, str(bool(decision.passed)).lower())
        client.set_tag(run_id, GATE_FAILED_TAG, gate_failed(decision))
