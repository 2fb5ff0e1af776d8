"""The retraining pipeline as plain functions, one per stage:

validate -> balance -> tune -> train -> evaluate -> gate -> track & register.

Each takes and returns plain values (paths, dataclasses), so the orchestrator (flows/) wraps
each in a task, and tests or notebooks can call them directly. State lives in the run's work
directory, so a rerun of the same run resumes (the tuner skips completed trials).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.config import ExperimentConfig
from cxr_core.errors import DataValidationError


def new_run_dir(runs_dir: Path) -> Path:
    """A fresh, sortable work directory for one pipeline run."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(runs_dir) / f"{stamp}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


@dataclass
class ValidatedData:
    manifest_path: Path
    report_dir: Path
    manifest_hash: str
    data_root: str
    split_counts: dict[str, dict[str, int]]
    passed: bool
    summary: str


def validate_stage(data_dir: Path, cfg: ExperimentConfig, run_dir: Path) -> ValidatedData:
    """Scan, split and validate; raises DataValidationError (with the summary naming every
    offending file) when an error-severity check fails."""
    from cxr_core.dataset import validate_dataset
    from cxr_core.manifest import write_manifest

    report_dir = Path(run_dir) / "validation"
    scan, report = validate_dataset(data_dir, cfg.data, cfg.validation, cfg.seed, report_dir)
    manifest_path = write_manifest(scan.manifest, Path(run_dir) / "manifest.parquet")
    if not report.passed:
        raise DataValidationError(report.summary_text(), report)
    return ValidatedData(manifest_path, report_dir, report.manifest_hash, report.data_root,
                         report.split_counts, report.passed, report.summary_text())


def adopt_validated(validated: ValidatedData, run_dir: Path) -> ValidatedData | None:
    """A verdict cached from an earlier run, with its manifest and report copied into
    ``run_dir`` so this run's artifacts do not depend on the earlier run's folder. None
    when the earlier run's files are gone (removed runs, another state home): validate
    again rather than fail on a missing file."""
    import dataclasses
    import shutil

    run_dir = Path(run_dir)
    manifest, report = run_dir / "manifest.parquet", run_dir / "validation"
    if Path(validated.manifest_path) == manifest:
        return validated
    if not (Path(validated.manifest_path).is_file() and Path(validated.report_dir).is_dir()):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(validated.manifest_path, manifest)
    shutil.copytree(validated.report_dir, report, dirs_exist_ok=True)
    return dataclasses.replace(validated, manifest_path=manifest, report_dir=report)


def balance_stage(manifest_path: Path, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Balance the train split; writes and returns the prepared manifest every tuner reads."""
    from cxr_core.manifest import read_manifest, write_manifest
    from cxr_core.training import PREPARED_MANIFEST, balance_train_split

    out = Path(run_dir) / PREPARED_MANIFEST
    if out.is_file():
        return out
    balanced = balance_train_split(read_manifest(manifest_path), cfg, run_dir)
    tmp = out.with_suffix(".tmp.parquet")
    write_manifest(balanced.manifest, tmp)
    tmp.replace(out)
    return out


def tune_stage(run_dir: Path, cfg: ExperimentConfig, verbose: int = 0) -> tuple[list[Any], dict[str, Any]]:
    """Search (or resume) over the prepared manifest: (trial results, best hyperparameters)."""
    from cxr_core.training import tune_from_manifest
    from cxr_core.tune import best_hyperparameters

    tuner, trials = tune_from_manifest(run_dir, cfg, verbose=verbose)
    best = best_hyperparameters(tuner)
    (Path(run_dir) / "best_hyperparameters.json").write_text(json.dumps(best, indent=2))
    return trials, best


def search_results(run_dir: Path, cfg: ExperimentConfig) -> tuple[list[Any], dict[str, Any]]:
    """Read a finished search (e.g. a distributed one) back from ``run_dir/tuner``."""
    from cxr_core.training import hypermodel_for
    from cxr_core.tune import best_hyperparameters, collect_trials, make_tuner

    tuner = make_tuner(
        hypermodel_for(cfg),
        Path(run_dir) / "tuner", algorithm=cfg.tune.algorithm, objective_name=cfg.tune.objective,
        max_trials=cfg.tune.max_trials, max_epochs=cfg.tune.max_epochs, seed=cfg.seed)
    best = best_hyperparameters(tuner)
    (Path(run_dir) / "best_hyperparameters.json").write_text(json.dumps(best, indent=2))
    return collect_trials(tuner), best


def train_stage(run_dir: Path, cfg: ExperimentConfig, best_hp: dict[str, Any], verbose: int = 0) -> Any:
    """Final training of the best hyperparameters; model + threshold under run_dir/model."""
    from cxr_core.manifest import read_manifest
    from cxr_core.pipeline import configure_tensorflow
    from cxr_core.training import PREPARED_MANIFEST, BalancedTrainSet, _class_weight_for, make_datasets, train_best

    configure_tensorflow(cfg.data.intra_op_threads, cfg.data.inter_op_threads)
    manifest = read_manifest(Path(run_dir) / PREPARED_MANIFEST)
    datasets = make_datasets(BalancedTrainSet(manifest, None, _class_weight_for(manifest, cfg)), cfg)
    return train_best(best_hp, datasets, cfg, run_dir, verbose=verbose)


@dataclass
class EvaluatedModel:
    evaluation: Any
    predictions_path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    robustness: dict[str, float] = field(default_factory=dict)  # robust_* metrics


def test_split(manifest_path: Path) -> pd.DataFrame:
    """Readable, labelled rows of the test split (the images that judge every model)."""
    from cxr_core.manifest import LABELS, read_manifest

    m = read_manifest(manifest_path)
    return m[(m["split"] == "test") & m["readable"].astype(bool)
             & m["label"].isin(LABELS)].sort_values("path").reset_index(drop=True)


def score_test_split(model: Any, threshold: float, image_size: int, test: pd.DataFrame,
                     batch_size: int = 64) -> pd.DataFrame:
    """One row per test image: path, sha256, label (0/1), probability, prediction."""
    from cxr_core.pipeline import SplitData, make_dataset

    labels = (test["label"] == "PNEUMONIA").to_numpy(np.int32)
    ds = make_dataset(SplitData(test["path"].tolist(), labels), image_size, batch_size,
                      shuffle=False, seed=0, cache=False)
    probs = np.asarray(model.predict(ds.map(lambda x, y: x), verbose=0), np.float64).ravel()
    return pd.DataFrame({"path": test["path"].to_numpy(), "sha256": test["sha256"].to_numpy(),
                         "label": labels, "probability": probs,
                         "prediction": (probs >= threshold).astype(int)})


def evaluate_stage(run_dir: Path, cfg: ExperimentConfig, manifest_path: Path,
                   with_figures: bool = True) -> EvaluatedModel:
    """Score the test split at the model's threshold: metrics with bootstrap intervals,
    per-image predictions (for champion comparisons) and figures."""
    from cxr_core.evaluate import evaluate_predictions, write_figures
    from cxr_core.pipeline import load_images
    from cxr_core.train import load_model

    model_dir = Path(run_dir) / "model"
    model, choice = load_model(model_dir)
    test = test_split(manifest_path)
    if test.empty:
        raise DataValidationError("the test split is empty: nothing to evaluate on")
    preds = score_test_split(model, choice.threshold, cfg.data.image_size, test)
    out_dir = Path(run_dir) / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / "test_predictions.csv"
    preds.to_csv(predictions_path, index=False)
    evaluation = evaluate_predictions(preds["label"].to_numpy(), preds["probability"].to_numpy(),
                                      choice.threshold, seed=cfg.seed)
    (out_dir / "metrics.json").write_text(json.dumps(evaluation.to_dict(), indent=2))
    robustness = robustness_stage(model, choice.threshold, cfg, preds, out_dir)
    figures: dict[str, Path] = {}
    if with_figures:
        # Figures need pixels: decode at most a few hundred test images for the image grids.
        rng = np.random.default_rng(cfg.seed)
        pick = np.sort(rng.choice(len(preds), size=min(len(preds), 256), replace=False))
        sample = preds.iloc[pick]
        images = load_images(sample["path"].tolist(), cfg.data.image_size)
        figures = write_figures(out_dir / "figures", sample["label"].to_numpy(),
                                sample["probability"].to_numpy(), choice.threshold,
                                sample["path"].tolist(), images=images, model=model,
                                seed=cfg.seed)
        # The curves belong to the whole test split, not the sample.
        figures.update(write_figures(out_dir / "figures", preds["label"].to_numpy(),
                                     preds["probability"].to_numpy(), choice.threshold,
                                     preds["path"].tolist()))
    return EvaluatedModel(evaluation, predictions_path, figures, robustness)


def robustness_stage(model: Any, threshold: float, cfg: ExperimentConfig, preds: pd.DataFrame,
                     out_dir: Path, max_images: int = 1000) -> dict[str, float]:
    """Score (up to ``max_images`` of) the test split again under acquisition shifts; writes
    ``robustness.csv`` and returns the robust_* metrics."""
    from cxr_core.pipeline import load_images
    from cxr_core.robustness import robustness_report

    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(preds), size=min(len(preds), max_images), replace=False))
    sample = preds.iloc[pick]
    images = load_images(sample["path"].tolist(), cfg.data.image_size)
    report = robustness_report(
        lambda x: np.asarray(model.predict(x, batch_size=128, verbose=0), np.float64).ravel(),
        images, sample["label"].to_numpy(), threshold, seed=cfg.seed)
    pd.DataFrame(report.rows()).to_csv(Path(out_dir) / "robustness.csv", index=False)
    return report.flat()


def champion_comparisons(client: Any, model_name: str, manifest_path: Path, image_size: int,
                         candidate_predictions: Path) -> tuple[list[Any] | None, str | None]:
    """Score the current champion on this run's test images and compare (McNemar). Returns
    (None, None) when there is no champion."""
    from cxr_core.gates import paired_comparison
    from cxr_core.predict import load_model
    from cxr_core.registry import CHAMPION, _alias_version

    champion = _alias_version(client, model_name, CHAMPION)
    if champion is None:
        return None, None
    loaded = load_model(f"models:/{model_name}@{CHAMPION}", client.tracking_uri)
    test = test_split(manifest_path)
    champ = score_test_split(loaded.model, loaded.threshold, loaded.image_size, test)
    cand = pd.read_csv(candidate_predictions)
    y = cand["label"].to_numpy(int)
    return ([paired_comparison(y, cand["prediction"].to_numpy(), champ["prediction"].to_numpy(), s)
             for s in ("all", "positives")], str(champion.version))


def gate_stage(evaluated: EvaluatedModel, cfg: ExperimentConfig,
               comparisons: list[Any] | None, champion_version: str | None) -> Any:
    """The GateDecision for this candidate (pure)."""
    from cxr_core.gates import decide, thresholds_from_config

    return decide(evaluated.evaluation.metrics, thresholds_from_config(cfg.gates), comparisons,
                  champion_version, robust_worst_accuracy=evaluated.robustness.get(
                      "robust_worst_accuracy"))


@dataclass
class TrackingRefs:
    """Where a pipeline run lives in MLflow."""

    experiment_id: str
    parent_run_id: str
    final_run_id: str | None = None
    model_version: str | None = None


def start_tracking(client: Any, experiment_name: str, cfg: ExperimentConfig, run_dir: Path,
                   data_dir: Path, artifact_location: str | None = None) -> TrackingRefs:
    """The parent run of this pipeline run, with the full config as params."""
    from cxr_core.tracking import ensure_experiment, start_run

    exp_id = ensure_experiment(client, experiment_name, artifact_location)
    parent = start_run(client, exp_id, f"retrain-{Path(run_dir).name}", params=cfg.flat(),
                       tags={"cxr.stage": "pipeline", "cxr.run_dir": str(run_dir),
                             "cxr.dataset_root": str(data_dir), "cxr.profile": cfg.profile})
    return TrackingRefs(exp_id, parent)


def log_results(
    client: Any,
    refs: TrackingRefs,
    model_name: str,
    cfg: ExperimentConfig,
    run_dir: Path,
    validated: ValidatedData,
    trials: list[Any],
    trained: Any,
    evaluated: EvaluatedModel,
    decision: Any,
) -> TrackingRefs:
    """Log trials (nested runs) and the final training run: params, per-epoch and test
    metrics, artifacts, dataset lineage, model card, and the model in the mlflow.keras flavor.
    Returns new refs carrying the final run id. A failed attempt marks its runs FAILED, so a
    retry's duplicates are told apart in the UI."""
    from cxr_core.manifest import read_manifest
    from cxr_core.model_card import render_model_card
    from cxr_core.registry import log_keras_model
    from cxr_core.tracking import (
        log_dataset,
        log_dict_artifact,
        log_history,
        log_metrics,
        log_trials,
        standard_tags,
        start_run,
    )

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
        data_summary = {
            "data_root": validated.data_root, "manifest_hash": validated.manifest_hash,
            "split_counts": validated.split_counts, "image_size": cfg.data.image_size,
            "balancing": f"{cfg.balance.strategy}, target ratio {cfg.balance.target_ratio}"}
        card = render_model_card(model_name, None, evaluated.evaluation, trained.threshold,
                                 decision, data_summary, trained.hyperparameters, cfg.profile)
        client.log_text(final, card, "model_card.md")
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


def register_stage(client: Any, refs: TrackingRefs, model_name: str, decision: Any,
                   trained: Any, evaluated: EvaluatedModel, manifest_hash: str) -> TrackingRefs:
    """Register the final run's model when the gates passed (idempotent: a retry finds the
    version it already created), then end the parent run."""
    from cxr_core.registry import register_if_blessed

    point = evaluated.evaluation.point()
    version = register_if_blessed(
        client, model_name, refs.final_run_id, decision, trained.threshold.threshold,
        manifest_hash, {k: point[k] for k in ("accuracy", "recall", "specificity", "roc_auc")
                        if k in point})
    if version:
        client.set_tag(refs.parent_run_id, "cxr.model_version", version)
    client.set_terminated(refs.parent_run_id, "FINISHED")
    return TrackingRefs(refs.experiment_id, refs.parent_run_id, refs.final_run_id, version)
