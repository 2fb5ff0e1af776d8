"""Semi-supervised adaptation to a deployment site: pseudo-labels on its unlabeled images.

A model trained at one site ranks the images of another fairly well (ROC-AUC about 0.95
on the external development half) but calls many of its normal children pneumonia: what
it learned of "normal" does not carry over. The site's own images, unlabeled, can teach
it: the most confident ends of the model's ranking are labeled by the model itself, and
training goes on with them beside the labeled training images. The threshold is chosen
afterwards on the labeled validation split, as always; the unlabeled images never judge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_core.data.inputs import SplitData


@dataclass(frozen=True)
class PseudoLabels:
    """The site images the model labeled itself, and how they were chosen."""

    data: SplitData               # the chosen images with their pseudo-labels (1 = PNEUMONIA)
    n_images: int                 # unlabeled images ranked
    predicted_prevalence: float   # share at or above the model's validation threshold
    threshold: float              # that threshold

    def summary(self) -> dict[str, Any]:
        """Counts for logs, MLflow and the run result."""
        n_pos = int(self.data.labels.sum())
        return {"unlabeled_images": self.n_images, "pseudo_pneumonia": n_pos,
                "pseudo_normal": len(self.data) - n_pos,
                "predicted_prevalence": round(self.predicted_prevalence, 4),
                "threshold": round(self.threshold, 6)}


def select_pseudo_labels(paths: list[str], probs: np.ndarray, threshold: float,
                         share: float) -> PseudoLabels:
    """Pseudo-labels from the ranking: with ``pi`` the share of images at or above
    ``threshold``, the ``share * pi`` highest-scored images become PNEUMONIA and the
    ``share * (1 - pi)`` lowest-scored NORMAL; the uncertain middle is left out.

    Ranks rather than fixed probability cut-offs, because at a shifted site the
    probabilities are what moved (most of its normal images score above the threshold),
    while the ranking held up. ``pi`` over-counts pneumonia there, which only makes the
    NORMAL end more conservative."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if len(probs) != len(paths):
        raise ValueError("paths and probabilities differ in length")
    n = len(probs)
    prevalence = float(np.mean(probs >= threshold)) if n else 0.0
    # 1e-9: 0.5 * (1 - 0.8) * 20 is 1.999... in floating point, and means 2.
    n_pos = math.floor(share * prevalence * n + 1e-9)
    n_neg = math.floor(share * (1.0 - prevalence) * n + 1e-9)
    order = np.argsort(probs, kind="stable")  # ascending: NORMAL end first
    neg, pos = order[:n_neg], order[n - n_pos:] if n_pos else order[:0]
    chosen = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(len(neg), np.int32), np.ones(len(pos), np.int32)])
    return PseudoLabels(SplitData([paths[i] for i in chosen], labels), n, prevalence,
                        float(threshold))


def mixed_split(train: SplitData, pseudo: SplitData, weight: float) -> SplitData:
    """The labeled training images plus the pseudo-labeled ones repeated so that they make
    up about ``weight`` of the result (at least once each)."""
    if not len(pseudo):
        return train
    copies = max(1, round(weight / (1.0 - weight) * len(train) / len(pseudo)))
    return SplitData(list(train.paths) + list(pseudo.paths) * copies,
                     np.concatenate([train.labels, np.tile(pseudo.labels, copies)]))


@dataclass(frozen=True)
class PseudoLabelPlan:
    """What the pseudo-label round needs beside the trained model."""

    unlabeled_paths: list[str]
    train_data: SplitData
    share: float
    weight: float
    epochs: int
    image_size: int
    batch_size: int
    seed: int
    rounds: int                   # train.pseudo_label.rounds: label and train this many times
    # The ``online`` balancing strategy's target ratio: the round then draws classes at it,
    # as the main training did (None: offline-balanced or class-weighted data, shuffled).
    resample_ratio: float | None = None
    # The main training's train-only batch transforms (markers, acquisition changes, mixup),
    # applied to the round's batches too (``train.pseudo_label.augment``); None: plain images.
    transform: Callable[[Any], Any] | None = None


def unlabeled_probabilities(model: Any, paths: list[str], image_size: int,
                            batch_size: int) -> tuple[list[str], np.ndarray]:
    """The model's probabilities for the decodable ``paths`` (in input order)."""
    from cxr_core.data.inputs import path_dataset

    kept: list[str] = []
    probs: list[np.ndarray] = []
    for images, batch_paths in path_dataset(paths, image_size, batch_size):
        probs.append(np.asarray(model(images, training=False), dtype=np.float64).ravel())
        kept.extend(p.decode() for p in batch_paths.numpy())
    return kept, (np.concatenate(probs) if probs else np.zeros(0))


def round_dataset(plan: PseudoLabelPlan, mixed: SplitData) -> tuple[Any, int | None]:
    """The round's training data: ``mixed`` shuffled, or for ``online`` balancing drawn at the
    plan's class ratio (pseudo-labeled repeats stay in their class's pool, so they keep about
    their share within it), through the plan's ``transform`` when it has one. Returns
    ``(dataset, steps_per_epoch or None)``."""
    from cxr_core.data.inputs import make_dataset, make_resampled_dataset

    steps = None
    if plan.resample_ratio is not None:
        ds, steps = make_resampled_dataset(mixed, plan.image_size, plan.batch_size,
                                           plan.seed + 1, plan.resample_ratio)
    else:
        ds = make_dataset(mixed, plan.image_size, plan.batch_size, shuffle=True,
                          seed=plan.seed + 1)
    return (plan.transform(ds) if plan.transform else ds), steps


def pseudo_label_round(model: Any, plan: PseudoLabelPlan, threshold: float,
                       fit_kwargs: dict[str, Any]) -> PseudoLabels:
    """Label the site images with ``model`` (at its own operating point ``threshold``, chosen
    on validation), then train on for ``plan.epochs`` epochs on the labeled images mixed
    with the pseudo-labeled ones. ``fit_kwargs`` are the final training's (validation data,
    class weights, verbosity); the optimizer goes on from where training ended (its reduced
    learning rate included)."""
    from cxr_core.training.callbacks import progress_callback

    paths, probs = unlabeled_probabilities(model, plan.unlabeled_paths, plan.image_size,
                                           plan.batch_size)
    labels = select_pseudo_labels(paths, probs, threshold, plan.share)
    print(f"[pseudo-labels] {labels.summary()}", flush=True)
    if len(labels.data):
        ds, steps = round_dataset(plan, mixed_split(plan.train_data, labels.data, plan.weight))
        kwargs = {k: v for k, v in fit_kwargs.items()
                  if k in ("validation_data", "class_weight", "verbose")}
        if steps:
            kwargs["steps_per_epoch"] = steps
        model.fit(ds, epochs=plan.epochs, shuffle=False,
                  callbacks=[progress_callback("pseudo-label training")], **kwargs)
    return labels
