"""Test-time augmentation: the saved wrapper averages the image and its centre-crop view."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_core.training.tta import unwrap, with_tta
from support.images import spread_outputs


@pytest.fixture(scope="module")
def model():
    from cxr_core.training.model import build_cnn

    m = build_cnn(32, blocks=2, base_filters=8, dense_units=0, seed=3,
                  intensity_norm="standardize")
    spread_outputs(m, _images(16))  # so the two views differ visibly, whatever the init
    return m


def _images(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (n, 32, 32, 1)).astype("float32")


def test_wrapper_is_the_mean_of_the_views_and_survives_save(model, tmp_path) -> None:
    import keras
    import tensorflow as tf

    x = _images()
    wrapped = with_tta(model, 32, crops=(0.75,))
    crop = tf.image.resize(x[:, 4:28, 4:28, :], (32, 32)).numpy()  # 24 px kept of 32
    plain, zoomed = (model.predict(v, verbose=0).ravel() for v in (x, crop))
    got = wrapped.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(got, (plain + zoomed) / 2, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-4)
    wrapped.save(tmp_path / "tta.keras")
    reloaded = keras.models.load_model(tmp_path / "tta.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0).ravel(), got, atol=1e-6)
    assert unwrap(reloaded).name == model.name


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
