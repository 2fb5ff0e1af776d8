"""The robustness report: perturbations change images plausibly; the report is complete."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.robustness import PERTURBATIONS, robustness_report


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
    assert report.rows()[0]["condition"] == "clean" and len(report.rows()) == 1 + len(PERTURBATIONS)
