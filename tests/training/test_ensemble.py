"""Several seeds' models saved as one (train.ensemble_size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_core.training.ensemble import ENSEMBLE_NAME, ensemble_model
from cxr_core.training.model import build_cnn
from support.images import spread_outputs

SIZE = 32


def _members(n: int = 2) -> list:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, SIZE, SIZE, 1)).astype(np.float32)
    models = []
    for k in range(n):
        m = build_cnn(SIZE, blocks=1, base_filters=4, dense_units=0, seed=k)
        spread_outputs(m, x)  # outputs away from 0.5, so a wrong mean would show
        models.append(m)
    return models


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_the_ensemble_outputs_the_sigmoid_of_the_mean_member_logit_and_reloads(tmp_path) -> None:
    import keras

    members = _members(3)
    x = np.random.default_rng(1).uniform(0, 255, (6, SIZE, SIZE, 1)).astype(np.float32)
    expected_logit = np.mean([_logit(m.predict(x, verbose=0).ravel()) for m in members], axis=0)
    model = ensemble_model(members, SIZE)
    assert model.name == ENSEMBLE_NAME
    got = model.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(_logit(got), expected_logit, rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "m.keras")  # built-in layers only: loads without cxr code
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0).ravel(), got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="two members"):
        ensemble_model(members[:1], SIZE)


def test_tta_calibration_and_grad_cam_work_on_an_ensemble(tmp_path) -> None:
    from cxr_core.evaluation.figures import gradcam
    from cxr_core.training.calibrate import PlattScaling, fold_into_model
    from cxr_core.training.tta import unwrap, with_tta

    members = _members(2)
    wrapped = with_tta(ensemble_model(members, SIZE), SIZE)
    x = np.random.default_rng(2).uniform(0, 255, (4, SIZE, SIZE, 1)).astype(np.float32)
    before = wrapped.predict(x, verbose=0).ravel()
    fold_into_model(wrapped, PlattScaling(2.0, -0.5))
    after = wrapped.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(_logit(after), 2.0 * _logit(before) - 0.5, rtol=1e-4, atol=1e-4)
    # Grad-CAM explains the first member (its logit scorer), through both wrappers.
    inner = unwrap(wrapped)
    assert inner.name == "member0"
    cams = gradcam(wrapped, x)
    assert cams.shape == (4, SIZE, SIZE) and np.isfinite(cams).all() and cams.max() > 0


def test_an_ensemble_of_equalizing_members_with_tta_and_calibration_reloads(tmp_path) -> None:
    """The heaviest saved model the options build (equalization inside each member, the
    ensemble, TTA and Platt scaling around it) loads without cxr code, output unchanged."""
    import keras

    from cxr_core.training.calibrate import PlattScaling, fold_into_model
    from cxr_core.training.tta import unwrap, with_tta

    x = np.random.default_rng(3).uniform(0, 255, (4, SIZE, SIZE, 1)).astype(np.float32)
    members = [build_cnn(SIZE, blocks=1, base_filters=4, dense_units=0, seed=k,
                         intensity_norm="equalize") for k in range(2)]
    for m in members:
        spread_outputs(m, x)
    wrapped = with_tta(ensemble_model(members, SIZE), SIZE)
    fold_into_model(wrapped, PlattScaling(1.5, 0.25))
    got = wrapped.predict(x, verbose=0).ravel()
    wrapped.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0).ravel(), got, rtol=1e-5, atol=1e-6)
    # Each member still equalizes: its fixed rank layer came back with the model.
    def ranks(model) -> list:
        found = [layer for layer in model.layers if layer.name == "equalize_rank"]
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                found += ranks(layer)
        return found

    assert unwrap(again).name == "member0"
    assert len(ranks(again)) == 2 and not any(layer.trainable for layer in ranks(again))


@pytest.mark.slow
def test_final_training_of_an_ensemble_saves_one_model_of_its_members(tmp_path: Path) -> None:
    from cxr_core.config import ExperimentConfig, deep_merge, load_config
    from cxr_core.data.balance import BalancedTrainSet
    from cxr_core.data.inputs import make_datasets
    from cxr_core.data.splits import scan_and_split
    from cxr_core.lifecycle.predict import load_model_dir
    from cxr_core.training.fit import train_best
    from support.images import make_good_dataset

    data = make_good_dataset(tmp_path / "data", n_patients=10, imgs=2)
    cfg = ExperimentConfig.model_validate(deep_merge(load_config(profile="quick").model_dump(), {
        "data": {"image_size": SIZE, "min_val_images": 0},
        "train": {"epochs": 1, "batch_size": 16, "ensemble_size": 2, "tta": True},
        "balance": {"strategy": "class_weight"}}))
    scan = scan_and_split(data, cfg.data, cfg.seed)
    datasets = make_datasets(BalancedTrainSet(scan.manifest, None, None), cfg)
    hp = {"blocks": 1, "base_filters": 4, "dense_units": 8, "learning_rate": 1e-3}
    trained = train_best(hp, datasets, cfg, tmp_path / "run")
    assert [m["seed"] for m in trained.members] == [cfg.seed, cfg.seed + 1]
    assert all(m["epochs"] == 1 for m in trained.members)
    loaded = load_model_dir(tmp_path / "run" / "model")
    assert loaded.model.name == "cxr_cnn_tta"
    assert loaded.threshold == pytest.approx(trained.threshold.threshold)
    names = {layer.name for layer in loaded.model.layers}
    assert any(n.startswith(ENSEMBLE_NAME) for n in names), names
