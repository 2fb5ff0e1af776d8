"""Input pipeline, model family and operating threshold (fast: no search)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.training.fit import choose_threshold


@pytest.mark.parametrize(
    "y_true, y_prob, target, expect_t",
    [
        ([1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1], 1.0, 0.6),
        ([1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1], 0.75, 0.7),
        ([1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1], 0.5, 0.8),
        ([1, 0, 1, 0], [0.2, 0.9, 0.4, 0.1], 0.95, 0.2),
    ],
)
def test_threshold_is_the_highest_meeting_recall(y_true, y_prob, target, expect_t) -> None:
    c = choose_threshold(np.array(y_true), np.array(y_prob), target)
    assert c.threshold == pytest.approx(expect_t)
    assert c.recall >= target
    # Any higher candidate threshold misses the target.
    higher = [p for p in y_prob if p > c.threshold]
    for t in higher:
        pos = np.array(y_prob)[np.array(y_true) == 1]
        assert (pos >= t).mean() < target


def test_threshold_reports_specificity() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 500), 0, 1)
    c = choose_threshold(y, p, 0.95)
    assert c.recall >= 0.95
    assert c.specificity == pytest.approx(((p < c.threshold) & (y == 0)).sum() / (y == 0).sum())
    with pytest.raises(ValueError, match="no positive"):
        choose_threshold(np.zeros(3), np.ones(3), 0.9)


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_threshold_meets_the_target_on_held_out_data(target: float) -> None:
    # Chosen on one validation sample, the threshold's recall on fresh images of the same
    # distribution lands at the target, within sampling error (sd ~0.004 here).
    def sample(seed: int, n: int = 8000):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        return y, 1 / (1 + np.exp(-rng.normal(2.0 * (2 * y - 1), 1.5)))

    y_val, p_val = sample(0)
    y_new, p_new = sample(1)
    choice = choose_threshold(y_val, p_val, target)
    held_out = ((p_new >= choice.threshold)[y_new == 1]).mean()
    assert held_out == pytest.approx(target, abs=0.015)
