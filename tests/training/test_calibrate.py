"""Platt scaling: fitted on validation, folded exactly into the model's output layer."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.evaluation.metrics import expected_calibration_error
from cxr_core.training.calibrate import PlattScaling, fit_platt, fold_into_model, logit
from support.images import spread_outputs


def _miscalibrated(n: int = 4000, a: float = 0.4, b: float = -0.8, seed: int = 0):
    """Labels drawn from sigmoid(a*z + b) while the 'model' reports sigmoid(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = rng.random(n) < 1 / (1 + np.exp(-(a * z + b)))
    return 1 / (1 + np.exp(-z)), y.astype(int)


def test_fit_recovers_the_true_scaling_and_lowers_ece() -> None:
    probs, y = _miscalibrated()
    scaling = fit_platt(probs, y)
    assert scaling.a == pytest.approx(0.4, abs=0.06)
    assert scaling.b == pytest.approx(-0.8, abs=0.15)
    calibrated = scaling.apply(probs)
    assert expected_calibration_error(y, calibrated) < 0.5 * expected_calibration_error(y, probs)
    # A positive slope keeps the ranking: the same order of images.
    assert (np.argsort(calibrated, kind="stable") == np.argsort(probs, kind="stable")).all()


def test_fit_rejects_single_class_and_reversed_ranking() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(np.array([0.2, 0.7]), np.array([1, 1]))
    probs, y = _miscalibrated(a=-1.0, b=0.0)
    with pytest.raises(ValueError, match="worse than chance"):
        fit_platt(probs, y)


def test_logit_is_finite_at_saturated_probabilities() -> None:
    z = logit(np.array([0.0, 0.5, 1.0]))
    assert np.isfinite(z).all() and z[1] == 0.0 and z[0] < -10 < 10 < z[2]


def test_folding_into_the_model_matches_apply_and_survives_save(tmp_path) -> None:
    import keras

    from cxr_core.training.model import build_cnn

    model = build_cnn(32, blocks=2, base_filters=8, dense_units=0, seed=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 1)).astype("float32")
    spread_outputs(model, x)  # unsaturated outputs, so the scaling has something to move
    before = model.predict(x, verbose=0).ravel()
    scaling = PlattScaling(a=0.5, b=1.0)
    fold_into_model(model, scaling)
    after = model.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(after, scaling.apply(before), atol=2e-4)
    assert not np.allclose(after, before, atol=1e-3)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras").predict(x, verbose=0).ravel()
    np.testing.assert_allclose(reloaded, after, atol=1e-6)
