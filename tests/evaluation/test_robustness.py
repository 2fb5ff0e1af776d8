"""The robustness report: perturbations change images plausibly; the report is complete."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.evaluation.robustness import (
    PERTURBATIONS,
    SEEN_SHIFTS,
    SHIFT_FAMILY,
    UNSEEN_SHIFTS,
    robustness_report,
)


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.uniform(40, 200, (6, 32, 32, 1)).astype(np.float32)
    x[:, 8:24, 8:24] = 230.0  # a bright square, so blur/rotation/crop have something to move
    return x


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_each_perturbation_keeps_shape_and_range_and_changes_pixels(images, name) -> None:
    out = PERTURBATIONS[name](images.copy(), np.random.default_rng(1))
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 255
    assert np.abs(out - images).mean() > 0.5, name


def test_report_covers_every_shift_and_finds_a_fragile_model(images) -> None:
    y = np.array([0, 1, 0, 1, 0, 1])
    # A "model" that reads brightness: exposure changes flip it, so the worst case drops.
    bright = images.copy()
    bright[y == 1] += 20
    bright = np.clip(bright, 0, 255)

    def predict(x: np.ndarray) -> np.ndarray:
        return (x.mean(axis=(1, 2, 3)) > float(bright.mean())).astype(float)

    report = robustness_report(predict, bright, y, threshold=0.5)
    assert set(report.shifted) == set(PERTURBATIONS)
    assert report.clean["accuracy"] == 1.0
    assert report.worst("accuracy") <= 0.5
    flat = report.flat()
    assert flat["robust_worst_accuracy"] == report.worst("accuracy")
    assert "robust_jpeg_q30_roc_auc" in flat
    rows = report.rows()
    assert rows[0]["condition"] == "clean" and len(rows) == 1 + len(PERTURBATIONS)
    # Each family is reported on its own; the overall worst (the gate's) is the lower one.
    # Exposure shifts (seen: the training varies brightness) break this model; the unseen
    # shifts keep the mean brightness it reads.
    assert flat["robust_seen_worst_accuracy"] == report.worst("accuracy", "seen") <= 0.5
    assert flat["robust_unseen_worst_accuracy"] == report.worst("accuracy", "unseen") == 1.0
    assert flat["robust_worst_accuracy"] == min(flat["robust_seen_worst_accuracy"],
                                                flat["robust_unseen_worst_accuracy"])
    assert {r["condition"]: r["family"] for r in rows} == {"clean": "none", **SHIFT_FAMILY}


def test_shifts_are_split_by_what_training_augments() -> None:
    assert SEEN_SHIFTS.keys() & UNSEEN_SHIFTS.keys() == set()
    assert PERTURBATIONS == {**SEEN_SHIFTS, **UNSEEN_SHIFTS}
    # The training pipeline varies exposure, contrast and gamma, blurs, adds noise, rotates
    # and zooms (cxr_core.data.inputs.photometric, cxr_core.training.model's layers, the
    # offline variants of cxr_core.data.balance).
    for name in ("exposure_dark", "contrast_low", "gamma_0.7", "blur", "noise", "rotate_7",
                 "crop_90"):
        assert SHIFT_FAMILY[name] == "seen", name
    assert len(UNSEEN_SHIFTS) >= 3 and "jpeg_q30" in UNSEEN_SHIFTS


def test_shifted_copy_perturbs_every_image_once_and_repeats(images) -> None:
    from cxr_core.evaluation.robustness import shifted_copy

    many = np.concatenate([images] * 8)  # 48 images: every shift is drawn for some
    out = shifted_copy(many, seed=3)
    assert out.shape == many.shape and out.min() >= 0 and out.max() <= 255
    changed = np.abs(out - many).mean(axis=(1, 2, 3)) > 0.1
    assert changed.mean() > 0.9
    assert np.array_equal(out, shifted_copy(many, seed=3))
    assert not np.array_equal(out, shifted_copy(many, seed=4))


def test_shifted_validation_adds_metrics_that_early_stopping_can_read(images) -> None:
    import keras

    from cxr_core.evaluation.robustness import shifted_validation_callback
    from cxr_core.training.model import build_cnn

    y = np.array([0, 1, 0, 1, 0, 1], np.float32)
    model = build_cnn(32, blocks=3, base_filters=8, seed=0)
    seen: list[float] = []

    class Reader(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs["val_shift_auc"])

    stop = keras.callbacks.EarlyStopping(monitor="val_shift_auc", mode="max", patience=1)
    history = model.fit(images, y, epochs=2, verbose=0, validation_data=(images, y),
                        callbacks=[shifted_validation_callback(images, y), Reader(), stop])
    assert len(seen) == 2 and all(0.0 <= v <= 1.0 for v in seen)
    assert history.history["val_shift_auc"] == seen
    assert 0.0 <= history.history["val_shift_accuracy"][-1] <= 1.0
