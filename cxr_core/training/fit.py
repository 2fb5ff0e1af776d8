"""Final training of the best hyperparameters and the operating threshold that travels with
the model (saved beside the ``.keras`` file as ``threshold.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.config import AugmentConfig, ExperimentConfig
from cxr_core.data.inputs import Datasets, SplitData, augment_training_batches
from cxr_core.training.callbacks import monitor_mode, progress_callback, shifted_validation

MODEL_FILE = "model.keras"
THRESHOLD_FILE = "threshold.json"


@dataclass(frozen=True)
class ThresholdChoice:
    """The operating point chosen on validation data."""

    threshold: float
    recall: float
    specificity: float
    precision: float
    recall_target: float
    n_positive: int
    n_negative: int


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, recall_target: float) -> ThresholdChoice:
    """The highest threshold whose recall (predict positive when ``p >= t``) meets the target.

    Highest, because every lower threshold only adds false positives. The k-th largest
    positive score with k = ceil(target * n_pos) is exactly that threshold.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if y_true.shape != y_prob.shape:
        raise ValueError("y_true and y_prob differ in length")
    pos = np.sort(y_prob[y_true == 1])[::-1]
    neg = y_prob[y_true == 0]
    if len(pos) == 0:
        raise ValueError("no positive examples: recall is undefined")
    k = max(1, math.ceil(recall_target * len(pos) - 1e-9))
    t = float(pos[k - 1])
    predicted = y_prob >= t
    tp = int((predicted & (y_true == 1)).sum())
    fp = int((predicted & (y_true == 0)).sum())
    tn = int((~predicted & (y_true == 0)).sum())
    return ThresholdChoice(
        threshold=t,
        recall=tp / len(pos),
        specificity=tn / len(neg) if len(neg) else float("nan"),
        precision=tp / (tp + fp) if tp + fp else float("nan"),
        recall_target=recall_target,
        n_positive=len(pos),
        n_negative=len(neg),
    )


@dataclass
class TrainedModel:
    """What final training produced: the saved model, its threshold and its history."""

    model_path: Path
    threshold: ThresholdChoice
    hyperparameters: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs_trained: int = 0
    best_epoch: int = 0
    calibration: dict[str, float] | None = None  # Platt scaling folded into the model
    members: list[dict[str, Any]] | None = None  # an ensemble's members: seed, epochs
    pseudo_labels: dict[str, Any] | None = None  # PseudoLabels.summary() of --unlabeled
    run_id: str | None = None  # the MLflow run that logged this training live, if any


def predict_proba(model: Any, dataset: Any) -> np.ndarray:
    """Probabilities of PNEUMONIA for a batched ``(images, labels)`` or images dataset."""
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float64).ravel()


def train_final(
    hyperparameters: dict[str, Any],
    train_ds: Any,
    val_ds: Any,
    val_labels: np.ndarray,
    out_dir: Path,
    image_size: int,
    epochs: int,
    patience: int,
    recall_target: float,
    augment: AugmentConfig | None = None,
    mixed_precision: bool = False,
    seed: int = 0,
    steps_per_epoch: int | None = None,
    class_weight: dict[int, float] | None = None,
    verbose: int = 0,
    intensity_norm: str = "none",
    label_smoothing: float = 0.0,
    monitor: str = "val_auc",
    callbacks: list[Any] | None = None,
    calibrate: bool = False,
    tta: bool = False,
    mask: str = "none", crop: tuple[float, float, float] = (0.0, 0.0, 0.0),
    mask_fill: str = "mean",
    pseudo: Any | None = None,
    ema_momentum: float = 0.0,
) -> TrainedModel:
    """Retrain the best hyperparameters with early stopping on ``monitor`` (the search's
    objective; best weights restored), choose the threshold on validation, save model and
    threshold. ``callbacks`` run before early stopping (they may add the monitored metric).
    ``calibrate`` and ``tta`` shape the saved model (:func:`final_model`); the threshold is
    chosen on that model's output, the one that will be served. ``mask``, ``mask_fill`` and
    ``crop`` are the shortcut mitigations built into the model (``build_cnn``). ``pseudo`` (a
    :class:`~cxr_core.training.pseudo_label.PseudoLabelPlan`) adds a round of training on
    pseudo-labeled site images after early stopping (:func:`pseudo_label_round`).
    ``ema_momentum`` > 0 averages the weights (:func:`_ema_options`).

    ``val_ds`` must not be shuffled: its order has to match ``val_labels``.
    """
    import keras

    from cxr_core.training.model import build_cnn

    keras.utils.set_random_seed(seed)
    keys = ("blocks", "base_filters", "convs_per_block", "separable", "residual", "dropout",
            "dense_units", "learning_rate")
    model = build_cnn(image_size, augment=augment, mixed_precision=mixed_precision, seed=seed,
                      intensity_norm=intensity_norm, label_smoothing=label_smoothing,
                      mask=mask, crop=crop, mask_fill=mask_fill,
                      optimizer_options=_ema_options(ema_momentum, train_ds, steps_per_epoch),
                      **{k: hyperparameters[k] for k in keys if k in hyperparameters})
    fit_kwargs: dict[str, Any] = dict(validation_data=val_ds, epochs=epochs,
                                      callbacks=_final_callbacks(callbacks, monitor, patience),
                                      shuffle=False,  # tf.data already reshuffles each epoch
                                      verbose=verbose)
    if steps_per_epoch:
        fit_kwargs["steps_per_epoch"] = steps_per_epoch
    if class_weight:
        fit_kwargs["class_weight"] = class_weight
    history = model.fit(train_ds, **fit_kwargs).history
    pseudo_summary = _pseudo_labels(model, pseudo, val_labels, recall_target, fit_kwargs)
    model, calibration = final_model(model, val_ds, val_labels, image_size, calibrate, tta)
    val_prob = predict_proba(model, val_ds)
    choice = choose_threshold(val_labels, val_prob, recall_target)

    model_path = save_model_dir(Path(out_dir), model, choice)
    val_auc = history.get(monitor, history.get("val_auc", []))
    return TrainedModel(
        model_path=model_path,
        threshold=choice,
        hyperparameters=dict(hyperparameters),
        history={k: [float(v) for v in vals] for k, vals in history.items()},
        epochs_trained=len(val_auc),
        best_epoch=int(np.argmax(val_auc)) + 1 if val_auc else 0,
        calibration=calibration,
        pseudo_labels=pseudo_summary,
    )


def _ema_options(momentum: float, train_ds: Any, steps_per_epoch: int | None) -> dict[str, Any]:
    """Adam's weight-averaging options: the average replaces the weights at the last step of
    every epoch (so each epoch's validation, early stopping's best weights and the saved
    model are the averaged ones). {} when ``momentum`` is 0."""
    if not momentum:
        return {}
    steps = steps_per_epoch or int(train_ds.cardinality())
    if steps < 1:  # unknown or infinite: the average replaces the weights once, at the end
        steps = None
    return {"use_ema": True, "ema_momentum": momentum, "ema_overwrite_frequency": steps}


def _pseudo_labels(model: Any, pseudo: Any | None, val_labels: np.ndarray,
                   recall_target: float, fit_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The pseudo-label rounds of ``pseudo`` (None: no round, no summary); the summary is the
    last round's, with the number of rounds and each round's own (``per_round``)."""
    if pseudo is None or not pseudo.unlabeled_paths:
        return None
    from cxr_core.training.pseudo_label import pseudo_label_round

    per_round: list[dict[str, Any]] = []
    for _ in range(pseudo.rounds):
        # The model's own operating point on validation sets the predicted prevalence; it
        # is chosen again each round, as the model has moved.
        raw = choose_threshold(val_labels, predict_proba(model, fit_kwargs["validation_data"]),
                               recall_target)
        per_round.append(pseudo_label_round(model, pseudo, raw.threshold, fit_kwargs).summary())
    return {**per_round[-1], "rounds": pseudo.rounds, "per_round": per_round}


def _final_callbacks(extra: list[Any] | None, monitor: str, patience: int) -> list[Any]:
    """``extra``, progress lines, learning-rate halving and early stopping on ``monitor``."""
    import keras

    mode = monitor_mode(monitor)
    # Validation AUC swung between epochs on the real data (0.999 -> 0.943 -> 0.999): halving
    # the rate when it stalls lets the last epochs settle instead of jumping between minima.
    callbacks = [*(extra or []), progress_callback("final training"),
                 keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5,
                                                   patience=1, min_lr=1e-5)]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=patience, restore_best_weights=True))
    return callbacks


def final_model(model: Any, val_ds: Any, val_labels: np.ndarray, image_size: int,
                calibrate: bool, tta: bool) -> tuple[Any, dict[str, float] | None]:
    """The model to save, and its Platt scaling (None when not calibrated).

    With ``tta`` the trained model is wrapped to average the logits of the image and a
    centre-crop view (:func:`cxr_core.training.tta.with_tta`). With ``calibrate``, Platt
    scaling is fitted on the validation output of that model, TTA included, and folded into
    its final sigmoid layer: the served probabilities and the calibration error reported
    for them are the calibrated ones. A fit that fails (one class, reversed ranking) leaves
    the model uncalibrated: such a model fails the gates, no reason to crash here.
    """
    from cxr_core.training.calibrate import fit_platt, fold_into_model

    if tta:
        from cxr_core.training.tta import with_tta

        model = with_tta(model, image_size)
    if not calibrate:
        return model, None
    try:
        scaling = fit_platt(predict_proba(model, val_ds), val_labels)
    except ValueError as exc:
        print(f"[final training] calibration skipped: {exc}", flush=True)
        return model, None
    fold_into_model(model, scaling)
    return model, scaling.as_dict()


def save_model_dir(out_dir: Path, model: Any, choice: ThresholdChoice) -> Path:
    """``model.keras`` and ``threshold.json`` under ``out_dir``; the model file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / MODEL_FILE)
    save_threshold(out_dir / THRESHOLD_FILE, choice)
    return out_dir / MODEL_FILE


def save_threshold(path: Path, choice: ThresholdChoice) -> Path:
    """Write the operating point beside the model."""
    Path(path).write_text(json.dumps(asdict(choice), indent=2), encoding="utf-8")
    return Path(path)


def load_threshold(model_dir: Path) -> ThresholdChoice:
    """Read ``threshold.json`` from a model directory."""
    return ThresholdChoice(**json.loads((Path(model_dir) / THRESHOLD_FILE).read_text("utf-8")))


def pseudo_label_plan(cfg: ExperimentConfig, train_data: SplitData,
                      unlabeled_paths: list[str]) -> Any:
    """The pseudo-label round of ``cfg.train.pseudo_label`` over ``unlabeled_paths``, mixed
    with ``train_data`` (a
    :class:`~cxr_core.training.pseudo_label.PseudoLabelPlan`); with ``augment`` its batches
    go through the main training's transforms."""
    from cxr_core.training.pseudo_label import PseudoLabelPlan

    pl = cfg.train.pseudo_label
    online = cfg.balance.strategy == "online"
    # The round's own seed (as its shuffle's): its augmentation draws differ from the
    # main training's.
    transform = (partial(augment_training_batches, cfg=cfg, seed=cfg.seed + 1)
                 if pl.augment else None)
    return PseudoLabelPlan(list(unlabeled_paths), train_data, pl.share, pl.weight,
                           pl.epochs, cfg.data.image_size, cfg.train.batch_size, cfg.seed,
                           rounds=pl.rounds,
                           resample_ratio=cfg.balance.target_ratio if online else None,
                           transform=transform)


def train_best(best_hp: dict[str, Any], datasets: Datasets, cfg: ExperimentConfig,
               work_dir: Path, verbose: int = 0, callbacks: list[Any] | None = None,
               unlabeled_paths: list[str] | None = None):
    """Final training of ``best_hp``; the model and threshold go to ``work_dir/model``.
    ``callbacks`` are added to the shared ones (e.g. a live MLflow epoch logger);
    ``unlabeled_paths``: site images for a pseudo-label round (``train.pseudo_label``)."""
    pseudo = pseudo_label_plan(cfg, datasets.train_data, unlabeled_paths) if unlabeled_paths else None
    shared = dict(
        image_size=cfg.data.image_size, epochs=cfg.train.epochs,
        patience=cfg.train.early_stopping_patience,
        recall_target=cfg.gates.recall_target_for_threshold, augment=cfg.balance.augment,
        mixed_precision=cfg.train.mixed_precision,
        steps_per_epoch=datasets.steps_per_epoch, class_weight=datasets.class_weight,
        verbose=verbose, intensity_norm=cfg.train.intensity_norm,
        label_smoothing=cfg.train.label_smoothing, monitor=cfg.tune.objective,
        mask=cfg.train.mask_annotations, crop=cfg.train.lung_crop.as_tuple(),
        mask_fill=cfg.train.mask_fill, pseudo=pseudo,
        ema_momentum=cfg.train.ema_momentum)
    shift = shifted_validation(datasets, cfg.seed)  # adds val_shift_* that may be monitored
    extra = [shift, *(callbacks or [])]
    if cfg.train.ensemble_size > 1:
        return _train_ensemble(best_hp, datasets, cfg, Path(work_dir), extra, [shift], shared)
    return train_final(best_hp, datasets.train, datasets.val, datasets.val_data.labels,
                       Path(work_dir) / "model", seed=cfg.seed, callbacks=extra,
                       calibrate=cfg.train.calibrate, tta=cfg.train.tta, **shared)


def _train_ensemble(best_hp: dict[str, Any], datasets: Datasets, cfg: ExperimentConfig,
                    work_dir: Path, callbacks: list[Any], later_callbacks: list[Any],
                    shared: dict[str, Any]) -> TrainedModel:
    """``cfg.train.ensemble_size`` members (seeds ``cfg.seed + k``) trained plain under
    ``work_dir/members/k``, then saved as one model (:func:`ensemble_model`) with TTA and
    calibration as configured and the threshold chosen on its validation output. The
    history and epochs are the first member's; ``members`` lists each."""
    import keras

    from cxr_core.training.ensemble import ensemble_model

    trained, models = [], []
    for k in range(cfg.train.ensemble_size):
        # Live epoch logging follows the first member only (one curve per run); later
        # members get ``later_callbacks`` (what adds the monitored metric).
        member = train_final(best_hp, datasets.train, datasets.val, datasets.val_data.labels,
                             work_dir / "members" / str(k), seed=cfg.seed + k,
                             callbacks=callbacks if k == 0 else later_callbacks, **shared)
        trained.append(member)
        models.append(keras.saving.load_model(member.model_path))
    model = ensemble_model(models, cfg.data.image_size)
    val_labels = datasets.val_data.labels
    model, calibration = final_model(model, datasets.val, val_labels, cfg.data.image_size,
                                     cfg.train.calibrate, cfg.train.tta)
    choice = choose_threshold(val_labels, predict_proba(model, datasets.val),
                              cfg.gates.recall_target_for_threshold)
    first = trained[0]
    return TrainedModel(save_model_dir(work_dir / "model", model, choice), choice, dict(best_hp), first.history,
                        first.epochs_trained, first.best_epoch, calibration,
                        pseudo_labels=first.pseudo_labels,
                        members=[{"seed": cfg.seed + k, "epochs": t.epochs_trained,
                                  "best_epoch": t.best_epoch,
                                  "val_threshold": t.threshold.threshold}
                                 for k, t in enumerate(trained)])
