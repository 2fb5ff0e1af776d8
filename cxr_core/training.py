"""The training stage from a manifest and an experiment config: balance -> datasets ->
search -> final training. Each step is its own function so an orchestrator can run (and
retry, cache or fan out) them separately; none of them knows about the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.config import ExperimentConfig
from cxr_core.pipeline import SplitData, make_dataset, make_resampled_dataset, split_data


@dataclass
class BalancedTrainSet:
    """The manifest with augmented train rows appended (offline) and the lineage table."""

    manifest: pd.DataFrame
    lineage: pd.DataFrame | None
    class_weight: dict[int, float] | None


def balance_train_split(manifest: pd.DataFrame, cfg: ExperimentConfig, work_dir: Path) -> BalancedTrainSet:
    """Apply the configured balancing strategy to the train split only.

    offline: augmented minority images are written under ``work_dir/augmented`` (a rerun of
    the same run reuses them); online: nothing is written, the input pipeline resamples;
    class_weight: the loss is weighted instead.
    """
    from cxr_core import balance

    strategy = cfg.balance.strategy
    if strategy == "class_weight":
        counts = split_data(manifest, "train").class_counts()
        return BalancedTrainSet(manifest, None, balance.class_weights(counts))
    if strategy == "online":
        return BalancedTrainSet(manifest, None, None)
    out_dir = Path(work_dir) / "augmented"
    lineage_path = Path(work_dir) / "augmentation_lineage.csv"
    if lineage_path.is_file():  # written by an earlier attempt of this run: reuse, never redo
        lineage = pd.read_csv(lineage_path)
    else:
        import os

        lineage = balance.write_offline_augmentations(
            manifest, out_dir, cfg.balance.target_ratio, cfg.balance.augment, cfg.seed,
            workers=cfg.data.scan_workers or os.cpu_count() or 1)
        lineage.to_csv(lineage_path, index=False)
    rows = balance.augmented_manifest_rows(lineage) if len(lineage) else manifest.iloc[:0]
    return BalancedTrainSet(pd.concat([manifest, rows], ignore_index=True), lineage, None)


@dataclass
class Datasets:
    """tf.data datasets of one run, with what fit() needs beside them."""

    train: Any
    val: Any
    train_data: SplitData
    val_data: SplitData
    steps_per_epoch: int | None
    class_weight: dict[int, float] | None


def make_datasets(balanced: BalancedTrainSet, cfg: ExperimentConfig,
                  train_fraction: float = 1.0) -> Datasets:
    """Train (shuffled; resampled for ``online``) and validation (fixed order) datasets.

    ``train_fraction`` < 1 trains on a class-stratified, seeded sample of the train split
    (the search's ``tune.train_fraction``); validation is always whole."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    train_data = split_data(balanced.manifest, "train").sample(train_fraction, cfg.seed)
    val_data = split_data(balanced.manifest, "val")
    if not len(val_data):
        from cxr_core.errors import DataValidationError

        raise DataValidationError("the validation split is empty: nothing to select models on")
    steps = None
    if cfg.balance.strategy == "online":
        train, steps = make_resampled_dataset(train_data, size, batch, cfg.seed,
                                              cfg.balance.target_ratio)
    else:
        train = make_dataset(train_data, size, batch, shuffle=True, seed=cfg.seed)
    aug = cfg.balance.augment
    if aug.random_gamma or aug.noise_std or aug.max_blur_sigma:
        from cxr_core.pipeline import photometric

        train = photometric(train, aug.gamma_range if aug.random_gamma else None,
                            aug.noise_std, cfg.seed, max_blur_sigma=aug.max_blur_sigma)
    if cfg.train.mixup_alpha:
        from cxr_core.pipeline import mixup

        train = mixup(train, cfg.train.mixup_alpha, cfg.seed)
    val = make_dataset(val_data, size, batch, shuffle=False, seed=cfg.seed)
    return Datasets(train, val, train_data, val_data, steps, balanced.class_weight)


def hypermodel_for(cfg: ExperimentConfig) -> Any:
    """The search space of ``cfg`` (image size, augmentation and robust-training options)."""
    from cxr_core.model import CxrHyperModel

    return CxrHyperModel(cfg.data.image_size, augment=cfg.balance.augment,
                         mixed_precision=cfg.train.mixed_precision, seed=cfg.seed,
                         intensity_norm=cfg.train.intensity_norm,
                         label_smoothing=cfg.train.label_smoothing)


def shifted_validation(datasets: Datasets, cfg: ExperimentConfig) -> Any:
    """The per-epoch ``val_shift_*`` callback over a shifted copy of the validation images
    (see :func:`cxr_core.robustness.shifted_copy`)."""
    import numpy as np

    from cxr_core.robustness import shifted_copy, shifted_validation_callback

    images = np.concatenate([x.numpy() for x, _ in datasets.val])
    return shifted_validation_callback(shifted_copy(images, cfg.seed), datasets.val_data.labels)


def tune(datasets: Datasets, cfg: ExperimentConfig, work_dir: Path, verbose: int = 0,
         project_name: str = "search"):
    """Run or resume the search whose state lives in ``work_dir/tuner``; returns
    ``(tuner, trial results)``."""
    from cxr_core.tune import (
        check_distributed_env,
        default_distribution_strategy,
        make_tuner,
        run_search,
    )

    check_distributed_env()
    tuner = make_tuner(
        hypermodel_for(cfg), Path(work_dir) / "tuner", project_name=project_name,
        algorithm=cfg.tune.algorithm, objective_name=cfg.tune.objective,
        max_trials=cfg.tune.max_trials, max_epochs=cfg.tune.max_epochs,
        executions_per_trial=cfg.tune.executions_per_trial, seed=cfg.seed,
        distribution_strategy=default_distribution_strategy(),
    )
    trials = run_search(tuner, datasets.train, datasets.val, cfg.tune.max_epochs,
                        cfg.train.early_stopping_patience, datasets.steps_per_epoch,
                        datasets.class_weight, verbose=verbose,
                        callbacks=[shifted_validation(datasets, cfg)])
    return tuner, trials


def train_best(best_hp: dict[str, Any], datasets: Datasets, cfg: ExperimentConfig,
               work_dir: Path, verbose: int = 0):
    """Final training of ``best_hp``; the model and threshold go to ``work_dir/model``."""
    from cxr_core.train import train_final

    return train_final(
        best_hp, datasets.train, datasets.val, datasets.val_data.labels,
        Path(work_dir) / "model", image_size=cfg.data.image_size, epochs=cfg.train.epochs,
        patience=cfg.train.early_stopping_patience,
        recall_target=cfg.gates.recall_target_for_threshold, augment=cfg.balance.augment,
        mixed_precision=cfg.train.mixed_precision, seed=cfg.seed,
        steps_per_epoch=datasets.steps_per_epoch, class_weight=datasets.class_weight,
        verbose=verbose, intensity_norm=cfg.train.intensity_norm,
        label_smoothing=cfg.train.label_smoothing, monitor=cfg.tune.objective,
        callbacks=[shifted_validation(datasets, cfg)], calibrate=cfg.train.calibrate,
        tta=cfg.train.tta,
    )


PREPARED_MANIFEST = "prepared_manifest.parquet"


def prepare_training_manifest(data_dir: Path, cfg: ExperimentConfig, work_dir: Path,
                              report_dir: Path | None = None) -> Path:
    """Scan, split, validate and balance ``data_dir`` once; write the manifest every tuner
    process reads (``work_dir/prepared_manifest.parquet``, written atomically).

    Raises :class:`DataValidationError` when the data fails validation, before any training.
    """
    from cxr_core.dataset import validate_dataset
    from cxr_core.errors import DataValidationError
    from cxr_core.manifest import write_manifest

    work_dir = Path(work_dir)
    out = work_dir / PREPARED_MANIFEST
    if out.is_file():
        return out
    scan, report = validate_dataset(data_dir, cfg.data, cfg.validation, cfg.seed,
                                    report_dir or work_dir / "validation")
    if not report.passed:
        raise DataValidationError(report.summary_text(), report)
    balanced = balance_train_split(scan.manifest, cfg, work_dir)
    tmp = out.with_suffix(".tmp.parquet")
    write_manifest(balanced.manifest, tmp)
    tmp.replace(out)  # readers never see a half-written file
    return out


def wait_for_manifest(work_dir: Path, timeout_s: float = 600.0, poll_s: float = 1.0) -> Path:
    """Block until the chief has prepared the manifest (workers start before it is ready)."""
    import time

    out = Path(work_dir) / PREPARED_MANIFEST
    deadline = time.monotonic() + timeout_s
    while not out.is_file():
        if time.monotonic() > deadline:
            from cxr_core.errors import CxrError

            raise CxrError(f"{out} did not appear within {timeout_s:.0f} s: is the chief running?")
        time.sleep(poll_s)
    return out


def tune_from_manifest(work_dir: Path, cfg: ExperimentConfig, chief: bool = False,
                       verbose: int = 0):
    """Tune over the prepared manifest in ``work_dir``. The chief of a distributed search
    builds no datasets: it only serves the oracle."""
    from cxr_core.manifest import read_manifest

    if chief:
        from cxr_core.tune import check_distributed_env, collect_trials, make_tuner

        check_distributed_env()
        tuner = make_tuner(
            hypermodel_for(cfg),
            Path(work_dir) / "tuner", algorithm=cfg.tune.algorithm,
            objective_name=cfg.tune.objective, max_trials=cfg.tune.max_trials,
            max_epochs=cfg.tune.max_epochs, seed=cfg.seed)
        tuner.search()  # serves the oracle until the workers are done
        return tuner, collect_trials(tuner)
    from cxr_core.pipeline import configure_tensorflow

    # Before the first op: thread pools, and GPU memory growth so workers can share a card.
    configure_tensorflow(cfg.data.intra_op_threads, cfg.data.inter_op_threads)
    manifest = read_manifest(Path(work_dir) / PREPARED_MANIFEST)
    balanced = BalancedTrainSet(manifest, None, _class_weight_for(manifest, cfg))
    return tune(make_datasets(balanced, cfg, cfg.tune.train_fraction), cfg, work_dir,
                verbose=verbose)


def _class_weight_for(manifest: pd.DataFrame, cfg: ExperimentConfig) -> dict[int, float] | None:
    if cfg.balance.strategy != "class_weight":
        return None
    from cxr_core import balance

    return balance.class_weights(split_data(manifest, "train").class_counts())
