"""Evaluation: Grad-CAM heatmaps and report figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.evaluation.figures import gradcam, write_figures


@pytest.fixture(scope="module")
def tiny_images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 1)).astype(np.float32)


@pytest.mark.parametrize("options", [{}, {"residual": True}, {"separable": True},
                                     {"mixed_precision": True}],
                         ids=["plain", "residual", "separable", "mixed-precision"])
def test_gradcam_on_build_cnn_variants(options, tiny_images) -> None:
    from cxr_core.training.model import build_cnn

    model = build_cnn(32, blocks=3, base_filters=8, seed=1, **options)
    heat = gradcam(model, tiny_images, batch_size=4)  # two batches
    assert heat.shape == (6, 32, 32) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    peaks = heat.reshape(6, -1).max(axis=1)
    assert np.all((peaks == 0) | np.isclose(peaks, 1.0, atol=1e-5))  # each map scaled to 1
    assert gradcam(model, tiny_images[:2, ..., 0]).shape == (2, 32, 32)  # [N, S, S] accepted


def test_gradcam_localises_the_region_that_drives_the_score(tiny_images) -> None:
    """Known answer: only the top-left quadrant reaches the output, and the sigmoid is
    saturated (p == 1.0), so a gradient of the probability itself would vanish."""
    import keras

    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, :16, :16] = 1
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name="feat")(inp)
    x = keras.layers.Lambda(lambda t: t * mask, name="masked")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid",
                             kernel_initializer=keras.initializers.Constant(1000.0))(x)
    model = keras.Model(inp, out)
    images = tiny_images + 10.0
    assert np.all(model.predict(images, verbose=0) == 1.0)
    heat = gradcam(model, images)  # default layer: "masked", the last 4-D output
    assert heat[:, :12, :12].mean() > 0.3
    assert heat[:, 20:, :].max() == 0.0 and heat[:, :, 20:].max() == 0.0
    assert gradcam(model, images, layer_name="feat")[:, 20:, 20:].max() > 0.5
    with pytest.raises(ValueError):
        gradcam(model, images, layer_name="no_such_layer")


# ------------------------------------------------------------------ figures

CURVES = {"confusion_matrix", "roc_curve", "pr_curve", "calibration_curve"}


def _assert_pngs(written: dict[str, Path], names: set[str], out: Path) -> None:
    assert set(written) == names
    assert {p.name for p in out.iterdir()} == {f"{n}.png" for n in names}
    for path in written.values():
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 200


def test_write_figures_all_six(tmp_path: Path, tiny_images) -> None:
    from cxr_core.training.model import build_cnn

    rng = np.random.default_rng(1)
    n = 12
    images = rng.uniform(0, 255, (n, 32, 32, 1)).astype(np.float32)
    y = np.array([0, 1] * 6)
    p = rng.uniform(0, 1, n)
    paths = [f"/d/test/{'PNEUMONIA' if v else 'NORMAL'}/person{i}_bacteria_{i}.jpeg"
             for i, v in enumerate(y)]
    model = build_cnn(32, blocks=3, base_filters=8)
    written = write_figures(tmp_path / "all", y, p, 0.5, paths, images=images, model=model,
                            n_worst=4, n_gradcam=4)
    _assert_pngs(written, CURVES | {"worst_misclassified", "gradcam"}, tmp_path / "all")

    written = write_figures(tmp_path / "curves", y, p, 0.5, paths)
    _assert_pngs(written, CURVES, tmp_path / "curves")
    written = write_figures(tmp_path / "no_model", y, p, 0.5, paths, images=images)
    _assert_pngs(written, CURVES | {"worst_misclassified"}, tmp_path / "no_model")

    # One class and no errors: still readable figures, no exception.
    written = write_figures(tmp_path / "one_class", np.ones(n, int), np.full(n, 0.9), 0.5,
                            paths, images=images)
    _assert_pngs(written, CURVES | {"worst_misclassified"}, tmp_path / "one_class")

    with pytest.raises(ValueError, match="paths"):
        write_figures(tmp_path / "bad", y, p, 0.5, paths[:-1])
