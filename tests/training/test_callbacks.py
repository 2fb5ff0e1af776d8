"""Callbacks shared by search and final training: model selection on unseen shifts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from cxr_core.evaluation.robustness import UNSEEN_SHIFTS, shifted_copy
from cxr_core.training.callbacks import monitor_mode, shifted_validation


def test_selection_scores_only_shifts_training_never_augments_with() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = np.round(rng.uniform(0, 255, (40, 16, 16, 1))).astype(np.float32)
    labels = np.array([0, 1] * 20, np.int32)
    val = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32))).batch(16)
    datasets = SimpleNamespace(val=val, val_data=SimpleNamespace(labels=labels))
    callback = shifted_validation(datasets, seed=3)
    expected = shifted_copy(images, 3, UNSEEN_SHIFTS)
    assert np.array_equal(callback.images, expected.astype(np.uint8))
    assert np.array_equal(callback.labels, labels)
    assert not np.array_equal(callback.images, shifted_copy(images, 3).astype(np.uint8))


def test_monitor_mode() -> None:
    assert monitor_mode("val_loss") == "min" and monitor_mode("val_shift_auc") == "max"
