"""Test-time augmentation: the saved wrapper averages the logits of the image and its
centre-crop view, and calibration is fitted on (and applied to) that final output."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.training.calibrate import PlattScaling, fit_platt, logit
from cxr_core.training.tta import unwrap, with_tta
from support.images import spread_outputs


@pytest.fixture(scope="module")
def model():
    from cxr_core.training.model import build_cnn

    m = build_cnn(32, blocks=2, base_filters=8, dense_units=0, seed=3,
                  intensity_norm="standardize")
    spread_outputs(m, _images(16))  # so the two views differ visibly, whatever the init
    return m


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 32, 32, 1)).astype("float32")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _crop_view(x: np.ndarray, keep: float) -> np.ndarray:
    import keras

    side = round(32 * keep)
    return np.asarray(keras.layers.Resizing(32, 32)(keras.layers.CenterCrop(side, side)(x)))


def test_wrapper_averages_the_logits_of_the_views_and_survives_save(model, tmp_path) -> None:
    import keras
    import tensorflow as tf

    x = _images()
    wrapped = with_tta(model, 32, crops=(0.75,))
    crop = tf.image.resize(x[:, 4:28, 4:28, :], (32, 32)).numpy()  # 24 px kept of 32
    plain, zoomed = (model.predict(v, verbose=0).ravel() for v in (x, crop))
    got = wrapped.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(got, _sigmoid((logit(plain) + logit(zoomed)) / 2), atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-4)
    wrapped.save(tmp_path / "tta.keras")
    reloaded = keras.models.load_model(tmp_path / "tta.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0).ravel(), got, atol=1e-6)
    # Inside: the trained model's logit (what Grad-CAM explains).
    inner = unwrap(reloaded)
    np.testing.assert_allclose(_sigmoid(inner.predict(x, verbose=0).ravel()), plain, atol=1e-5)


def test_unwrap_leaves_plain_models_and_gradcam_explains_the_inner_model(model) -> None:
    from cxr_core.evaluation.figures import gradcam

    assert unwrap(model) is model
    x = _images(3)
    cams = gradcam(with_tta(model, 32), x)
    assert cams.shape == (3, 32, 32)
    np.testing.assert_allclose(cams, gradcam(model, x), atol=1e-5)


def test_crops_must_be_fractions(model) -> None:
    for bad in [(), (1.0,), (0.0,), (1.2,)]:
        with pytest.raises(ValueError, match="crops"):
            with_tta(model, 32, crops=bad)


def test_calibration_is_fitted_on_the_tta_output_and_applied_last(model, tmp_path) -> None:
    import keras

    from cxr_core.evaluation.metrics import expected_calibration_error
    from cxr_core.training.fit import final_model

    # Validation labels drawn from sigmoid(0.5 * z - 0.7) of the TTA output's logit z: the
    # calibration the served (averaged) output needs.
    x = _images(1500, seed=1)
    uncalibrated = with_tta(model, 32).predict(x, verbose=0).ravel()
    rng = np.random.default_rng(2)
    y = (rng.random(x.shape[0]) < _sigmoid(0.5 * logit(uncalibrated) - 0.7)).astype(int)

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    final, calibration = final_model(clone, x, y, 32, calibrate=True, tta=True)
    served = final.predict(x, verbose=0).ravel()
    scaling = PlattScaling(**calibration)
    np.testing.assert_allclose(served, scaling.apply(uncalibrated), atol=2e-5)
    assert scaling.a == pytest.approx(0.5, abs=0.1) and scaling.b == pytest.approx(-0.7, abs=0.2)
    final.save(tmp_path / "final.keras")
    np.testing.assert_allclose(
        keras.models.load_model(tmp_path / "final.keras").predict(x, verbose=0).ravel(), served,
        atol=1e-6)

    # Before: Platt fitted on single-view outputs, then the calibrated views averaged.
    single, zoomed = (model.predict(v, verbose=0).ravel() for v in (x, _crop_view(x, 0.9)))
    old = fit_platt(single, y)
    before = (old.apply(single) + old.apply(zoomed)) / 2
    ece = {"after": expected_calibration_error(y, served),
           "before": expected_calibration_error(y, before)}  # seen: 0.014 vs 0.053
    assert ece["after"] <= ece["before"], ece


def test_without_tta_the_scaling_folds_into_the_trained_output_layer(model) -> None:
    import keras

    from cxr_core.training.fit import final_model

    x = _images(400, seed=3)
    plain = model.predict(x, verbose=0).ravel()
    y = (np.random.default_rng(4).random(400) < _sigmoid(0.6 * logit(plain) + 0.5)).astype(int)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    final, calibration = final_model(clone, x, y, 32, calibrate=True, tta=False)
    assert final is clone and calibration is not None
    np.testing.assert_allclose(final.predict(x, verbose=0).ravel(),
                               PlattScaling(**calibration).apply(plain), atol=2e-5)
    same, none = final_model(model, x, y, 32, calibrate=False, tta=False)
    assert same is model and none is None
