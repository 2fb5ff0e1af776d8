"""The retraining pipeline as plain functions, one per flow stage:

validate (+ external sets scanned) -> balance -> tune -> train -> evaluate (+ external sets
scored) -> gate -> track & register.

Each stage is a few lines over :mod:`cxr_core.data`, :mod:`cxr_core.training`,
:mod:`cxr_core.evaluation` and :mod:`cxr_core.lifecycle`, and takes and returns plain values
(paths, dataclasses), so the orchestrator (flows/) wraps each in a task and tests or notebooks
call them directly. State lives in the run's work directory, so a rerun of the same run
resumes (the tuner skips completed trials).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxr_core.config import ExperimentConfig
from cxr_core.errors import DataValidationError
from cxr_core.evaluation.scoring import EvaluatedModel, evaluate_test_split, test_split
from cxr_core.lifecycle.tracking import (
    LiveTracking,
    TrackingRefs,
    live_run,
    log_pipeline_results,
    start_pipeline_run,
    tracking_env,
)


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
    from cxr_core.data.manifest import write_manifest
    from cxr_core.data.validate import validate_dataset

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
    from cxr_core.data.balance import PREPARED_MANIFEST, balance_train_split
    from cxr_core.data.manifest import read_manifest, write_manifest

    out = Path(run_dir) / PREPARED_MANIFEST
    if out.is_file():
        return out
    balanced = balance_train_split(read_manifest(manifest_path), cfg, run_dir)
    tmp = out.with_suffix(".tmp.parquet")
    write_manifest(balanced.manifest, tmp)
    tmp.replace(out)
    return out


def prepare_stage(data_dir: Path, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Validate, then balance: the prepared manifest a distributed search's workers read (a
    second call finds it and does nothing). Raises DataValidationError before any training."""
    from cxr_core.data.balance import PREPARED_MANIFEST

    prepared = Path(run_dir) / PREPARED_MANIFEST
    if prepared.is_file():
        return prepared
    return balance_stage(validate_stage(data_dir, cfg, run_dir).manifest_path, cfg, run_dir)


def tune_stage(run_dir: Path, cfg: ExperimentConfig, verbose: int = 0,
               live: LiveTracking | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Search (or resume) over the prepared manifest: (trial results, best hyperparameters).
    With ``live``, every trial is an MLflow run while it trains."""
    from cxr_core.training.search import best_hyperparameters, tune_from_manifest

    with tracking_env(live):
        tuner, trials = tune_from_manifest(run_dir, cfg, verbose=verbose)
    best = best_hyperparameters(tuner)
    (Path(run_dir) / "best_hyperparameters.json").write_text(json.dumps(best, indent=2))
    return trials, best


def search_results(run_dir: Path, cfg: ExperimentConfig) -> tuple[list[Any], dict[str, Any]]:
    """Read a finished search (e.g. a distributed one) back from ``run_dir/tuner``."""
    from cxr_core.training.search import best_hyperparameters, collect_trials, finished_tuner

    tuner = finished_tuner(cfg, run_dir)
    best = best_hyperparameters(tuner)
    (Path(run_dir) / "best_hyperparameters.json").write_text(json.dumps(best, indent=2))
    return collect_trials(tuner), best


def train_stage(run_dir: Path, cfg: ExperimentConfig, best_hp: dict[str, Any], verbose: int = 0,
                live: LiveTracking | None = None, unlabeled_paths: list[str] | None = None) -> Any:
    """Final training of the best hyperparameters; model + threshold under run_dir/model.
    With ``live``, the final-training run exists from the first epoch to the saved model
    (per-epoch metrics as they come, system metrics), and its id is ``.run_id``.
    ``unlabeled_paths``: site images for the pseudo-label round (``--unlabeled``)."""
    from cxr_core.data.balance import PREPARED_MANIFEST, BalancedTrainSet, class_weight_for
    from cxr_core.data.inputs import configure_tensorflow, make_datasets
    from cxr_core.data.manifest import read_manifest
    from cxr_core.evaluation.drift import write_reference
    from cxr_core.training.fit import train_best

    configure_tensorflow(cfg.data.intra_op_threads, cfg.data.inter_op_threads)
    manifest = read_manifest(Path(run_dir) / PREPARED_MANIFEST)
    datasets = make_datasets(BalancedTrainSet(manifest, None, class_weight_for(manifest, cfg)), cfg)
    if live is None:
        trained = train_best(best_hp, datasets, cfg, run_dir, verbose=verbose,
                             unlabeled_paths=unlabeled_paths)
    else:
        from cxr_core.training.callbacks import mlflow_epoch_logger

        params = {**cfg.flat(), **{f"hp.{k}": v for k, v in best_hp.items()}}
        with live_run(live, "final-training", params, {"cxr.stage": "final"}) as (client, run_id):
            trained = train_best(best_hp, datasets, cfg, run_dir, verbose=verbose,
                                 callbacks=[mlflow_epoch_logger(client, run_id)],
                                 unlabeled_paths=unlabeled_paths)
        trained.run_id = run_id
    # The drift reference travels with the model (model/drift_reference.npz, logged with it).
    write_reference(Path(trained.model_path).parent, manifest, cfg.data.image_size, cfg.seed)
    return trained


def evaluate_stage(run_dir: Path, cfg: ExperimentConfig, manifest_path: Path,
                   with_figures: bool = True) -> EvaluatedModel:
    """Score the run's model on the test split at its own threshold (``run_dir/evaluation``)."""
    from cxr_core.lifecycle.predict import load_model_dir

    loaded = load_model_dir(Path(run_dir) / "model")
    return evaluate_test_split(loaded.model, loaded.threshold, test_split(manifest_path),
                               cfg.data.image_size, Path(run_dir) / "evaluation", cfg.seed,
                               with_figures=with_figures)


@dataclass
class ExternalData:
    """The run's external sets and site-calibration sample, scanned and checked before any
    training (reports under ``run_dir/evaluation/external/<name>/`` and
    ``run_dir/evaluation/site_calibration/``)."""

    sets: dict[str, Any]  # name -> cxr_core.data.external.ExternalScan
    calibration: Any | None = None  # an ExternalScan, or None
    unlabeled: Any | None = None  # a cxr_core.data.unlabeled.UnlabeledScan, or None

    def findings(self) -> list[str]:
        """Warnings worth logging: excluded files, images and patients shared with the run."""
        scans = [*self.sets.values(), *([self.calibration] if self.calibration else []),
                 *([self.unlabeled] if self.unlabeled else [])]
        return [line for scan in scans for line in scan.findings()]

    @property
    def unlabeled_paths(self) -> list[str] | None:
        """The unlabeled site images for the pseudo-label round (None without any)."""
        return self.unlabeled.paths if self.unlabeled is not None else None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per set: folder, images scored, files excluded, shared files and patients."""
        return {name: {"root": s.report["root"], "scored": s.report["scored"],
                       "excluded": len(s.report["excluded"]),
                       "shared_files": s.report["shared_files"]["count"],
                       "shared_patients": s.report["shared_patients"]["count"]}
                for name, s in self.sets.items()}


EXTERNAL_DIR = Path("evaluation") / "external"
SITE_CALIBRATION_DIR = Path("evaluation") / "site_calibration"


def external_scan_stage(sets: dict[str, str], calibration: str | None, manifest_path: Path,
                        cfg: ExperimentConfig, run_dir: Path,
                        unlabeled: str | None = None) -> ExternalData:
    """Scan and check every external set, the calibration sample and the unlabeled site
    images against the run's manifest (before any training: a bad set fails the run early).
    InputError for a set without both classes, a calibration sample sharing images with an
    evaluation set, or unlabeled images shared with one (or with validation)."""
    from cxr_core.data.external import (
        CALIBRATION,
        check_calibration_disjoint,
        scan_external_set,
        write_scan,
    )
    from cxr_core.data.manifest import read_manifest

    run_manifest = read_manifest(manifest_path)
    workers = cfg.data.scan_workers
    warn = cfg.validation.shortcut_auc_warn
    scans = {name: scan_external_set(name, folder, run_manifest, workers, warn)
             for name, folder in sorted(sets.items())}
    for name, scan in scans.items():
        write_scan(scan, Path(run_dir) / EXTERNAL_DIR / name)
    cal = None
    if calibration:
        cal = scan_external_set(CALIBRATION, calibration, run_manifest, workers, warn)
        check_calibration_disjoint(cal, scans, run_manifest)
        write_scan(cal, Path(run_dir) / SITE_CALIBRATION_DIR)
    site_images = None
    if unlabeled:
        from cxr_core.data.unlabeled import UNLABELED_DIR, scan_unlabeled

        judges = {f"external set {name!r}": s.manifest for name, s in scans.items()}
        if cal is not None:
            judges["the calibration sample"] = cal.manifest
        site_images = scan_unlabeled(unlabeled, run_manifest, judges, workers)
        write_scan(site_images, Path(run_dir) / UNLABELED_DIR)  # the same two files
    return ExternalData(scans, cal, site_images)


def external_stage(run_dir: Path, cfg: ExperimentConfig, evaluated: EvaluatedModel,
                   data: ExternalData) -> EvaluatedModel:
    """Score each external set at the model's threshold (``evaluation/external/<name>/``) and,
    with a calibration sample, choose the site threshold (``model/site_threshold.json``,
    beside the unchanged ``threshold.json``). Runs after the model and threshold exist."""
    import dataclasses

    from cxr_core.evaluation.external import choose_site_threshold, save_site_threshold, score_external
    from cxr_core.lifecycle.predict import load_model_dir

    if not data.sets and data.calibration is None:
        return evaluated
    loaded = load_model_dir(Path(run_dir) / "model")
    external = {name: score_external(loaded.model, loaded.threshold, name, scan.usable,
                                     cfg.data.image_size, Path(run_dir) / EXTERNAL_DIR / name,
                                     cfg.seed).evaluation
                for name, scan in data.sets.items()}
    site = None
    if data.calibration is not None:
        site = choose_site_threshold(loaded.model, data.calibration.usable, cfg.data.image_size,
                                     cfg.gates.recall_target_for_threshold,
                                     data.calibration.root, Path(run_dir) / SITE_CALIBRATION_DIR)
        save_site_threshold(Path(run_dir) / "model", site)
    return dataclasses.replace(evaluated, external=external, site_threshold=site)


def compare_stage(client: Any, model_name: str,
                  candidate_predictions: Path) -> tuple[Any | None, str | None]:
    """(ChampionComparison or None, champion version or None): the candidate against the
    champion on the test images both were tested on (see
    :func:`cxr_core.lifecycle.promotion.champion_comparison`), ready for :func:`gate_stage`."""
    from cxr_core.lifecycle.promotion import champion_comparison

    comparison = champion_comparison(client, model_name, Path(candidate_predictions))
    return comparison, comparison.champion_version if comparison else None


def gate_stage(evaluated: EvaluatedModel, cfg: ExperimentConfig,
               comparisons: Any | None, champion_version: str | None) -> Any:
    """The GateDecision for this candidate (pure). ``comparisons``: the candidate against the
    champion (:func:`cxr_core.lifecycle.promotion.champion_comparison`: a ChampionComparison,
    or None without a champion)."""
    from cxr_core.evaluation.gates import decide, thresholds_from_config

    return decide(evaluated.evaluation.metrics, thresholds_from_config(cfg.gates), comparisons,
                  champion_version, robust_worst_accuracy=evaluated.robustness.get(
                      "robust_worst_accuracy"),
                  external={name: ev.metrics for name, ev in
                            (getattr(evaluated, "external", None) or {}).items()})


def start_tracking(client: Any, experiment_name: str, cfg: ExperimentConfig, run_dir: Path,
                   data_dir: Path, artifact_location: str | None = None) -> TrackingRefs:
    """The parent run of this pipeline run, with the full config as params."""
    return start_pipeline_run(client, experiment_name, cfg, run_dir, data_dir, artifact_location)


def live_tracking(tracking_uri: str, refs: TrackingRefs, validated: ValidatedData,
                  cfg: ExperimentConfig) -> LiveTracking:
    """Where the search's trials and the final training log themselves while they run: the
    pipeline's parent run, with the data and code identity every run carries."""
    from cxr_core.lifecycle.tracking import standard_tags

    return LiveTracking(tracking_uri, refs.experiment_id, refs.parent_run_id,
                        standard_tags(validated.manifest_hash, validated.data_root, cfg.profile))


def external_inputs(data: ExternalData | None) -> list[Any]:
    """The external sets (context ``external``), the calibration sample (context
    ``calibration``) and the unlabeled site images (``unlabeled``) as MLflow dataset inputs."""
    from cxr_core.data.manifest import manifest_hash
    from cxr_core.lifecycle.tracking import DataInput

    if data is None:
        return []
    inputs = [DataInput(f"external-{name}", s.manifest, manifest_hash(s.manifest), s.root,
                        "external") for name, s in data.sets.items()]
    if data.calibration is not None:
        cal = data.calibration
        inputs.append(DataInput("site-calibration", cal.manifest, manifest_hash(cal.manifest),
                                cal.root, "calibration"))
    if data.unlabeled is not None:
        site = data.unlabeled
        # No label column: these images have none (pseudo-labels are the model's own).
        inputs.append(DataInput("site-unlabeled", site.manifest.drop(columns=["label"]),
                                manifest_hash(site.manifest),
                                site.root, "unlabeled"))
    return inputs


def log_results(client: Any, refs: TrackingRefs, model_name: str, cfg: ExperimentConfig,
                run_dir: Path, validated: ValidatedData, trials: list[Any], trained: Any,
                evaluated: EvaluatedModel, decision: Any,
                external: ExternalData | None = None) -> TrackingRefs:
    """Trials as nested runs and the final training run with its model, the external sets
    as further dataset inputs (see :func:`cxr_core.lifecycle.tracking.log_pipeline_results`)."""
    return log_pipeline_results(client, refs, model_name, cfg, run_dir, validated, trials,
                                trained, evaluated, decision, external_inputs(external))


def register_stage(client: Any, refs: TrackingRefs, model_name: str, decision: Any,
                   trained: Any, evaluated: EvaluatedModel, manifest_hash: str) -> TrackingRefs:
    """Register the final run's model when the gates passed (idempotent: a retry finds the
    version it already created), then end the parent run."""
    from cxr_core.evaluation.external import external_tags
    from cxr_core.lifecycle.registry import register_if_blessed

    point = evaluated.evaluation.point()
    # getattr: evaluations made before external sets existed (or stand-ins) have none.
    extra = external_tags(getattr(evaluated, "external", None) or {})
    site = getattr(evaluated, "site_threshold", None)
    if site is not None:
        extra.update(site.tags())
    version = register_if_blessed(
        client, model_name, refs.final_run_id, decision, trained.threshold.threshold,
        manifest_hash, {k: point[k] for k in ("accuracy", "recall", "specificity", "roc_auc")
                        if k in point}, extra_tags=extra)
    if version:
        client.set_tag(refs.parent_run_id, "cxr.model_version", version)
    client.set_terminated(refs.parent_run_id, "FINISHED")
    return TrackingRefs(refs.experiment_id, refs.parent_run_id, refs.final_run_id, version)
