"""Shortcut mitigations (issue 12): the annotation mask and the lung crop inside the model
(saved with it, applied by ``cxr predict``), and synthetic markers on training images."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.evaluation.shortcuts import CORNER_REGIONS, SIDE_REGIONS, region_slices

SIZE = 32


def _stage(model, layer: str):
    import keras

    return keras.Model(model.inputs, model.get_layer(layer).output)


def _texted(n: int = 4, seed: int = 0) -> np.ndarray:
    """Raw 0-255 images [n, S, S, 1]: noise around 100, with a bright 'marker' in every
    annotation region."""
    x = np.random.default_rng(seed).normal(100, 10, (n, SIZE, SIZE, 1)).clip(0, 255)
    for region in CORNER_REGIONS + SIDE_REGIONS:
        rows, cols = region_slices(region, SIZE)
        x[:, rows, cols] = 255.0
    return x.astype(np.float32)


@pytest.mark.parametrize("mode", ["corners", "borders"])
def test_the_mask_fills_its_regions_with_the_mean_of_the_rest(mode: str) -> None:
    from cxr_core.training.model import annotation_keep_map, build_cnn

    model = build_cnn(SIZE, blocks=2, base_filters=4, dense_units=0, mask=mode)
    x = _texted()
    out = _stage(model, "annotation_masked").predict(x, verbose=0)
    keep = annotation_keep_map(SIZE, mode)[None].astype(bool)
    masked, kept = ~np.broadcast_to(keep, x.shape), np.broadcast_to(keep, x.shape)
    np.testing.assert_allclose(out[kept], x[kept], atol=1e-3)  # the lungs untouched
    for i in range(len(x)):
        fill = x[i][keep[0]].mean()
        np.testing.assert_allclose(out[i][masked[i]], fill, rtol=1e-4)
    side_rows, side_cols = region_slices(SIDE_REGIONS[0], SIZE)
    side = out[:, side_rows, side_cols]
    assert (side.min() > 200) == (mode == "corners")  # corners leave the side markers
    assert (out.max() < 200) == (mode == "borders")    # borders leave no marker at all


def _boundary_jump(img: np.ndarray, keep: np.ndarray) -> float:
    """Mean absolute step between horizontally or vertically adjacent pixels where one is
    masked and the other kept: the edge a flat fill leaves."""
    steps = []
    for axis in (0, 1):
        a, b = np.moveaxis(img, axis, 0), np.moveaxis(keep, axis, 0)
        edge = b[1:] != b[:-1]
        steps.append(np.abs(a[1:] - a[:-1])[edge])
    return float(np.concatenate(steps).mean())


@pytest.mark.parametrize("mode", ["corners", "borders"])
def test_inpainting_removes_the_markers_and_continues_the_surroundings(mode: str) -> None:
    from cxr_core.training.model import annotation_keep_map, build_cnn

    # A smooth image (a ramp across, like the exposure falling off to a side) with markers.
    ramp = np.linspace(30.0, 220.0, SIZE, dtype=np.float32)
    x = np.broadcast_to(ramp[None, None, :, None], (2, SIZE, SIZE, 1)).copy()
    x[1] = x[1].transpose(1, 0, 2)                       # and a ramp downwards
    clean = x.copy()
    keep = annotation_keep_map(SIZE, mode)[..., 0].astype(bool)
    x[:, ~keep] = 255.0                                      # markers where this mode masks
    outs = {}
    for fill in ("mean", "inpaint"):
        model = build_cnn(SIZE, blocks=2, base_filters=4, dense_units=0, mask=mode, mask_fill=fill)
        outs[fill] = _stage(model, "annotation_masked").predict(x, verbose=0)[..., 0]
    out = outs["inpaint"]
    np.testing.assert_allclose(out[:, keep], x[:, keep, 0], atol=1e-3)   # the lungs untouched
    assert (out[:, ~keep] < 250).all()                       # no marker left inside
    for i in range(2):
        inpainted, flat = (_boundary_jump(outs[f][i], keep) for f in ("inpaint", "mean"))
        assert inpainted < 0.5 * flat, (inpainted, flat)    # no visible patch edge
        # Closer to the clean image than the flat fill, where it was masked.
        err = {f: np.abs(outs[f][i] - clean[i, ..., 0])[~keep].mean() for f in outs}
        assert err["inpaint"] < 0.6 * err["mean"], err
    with pytest.raises(ValueError, match="unknown mask fill"):
        build_cnn(SIZE, mask=mode, mask_fill="blur")


def test_the_lung_crop_cuts_the_abdomen_and_resizes_back() -> None:
    from cxr_core.training.model import build_cnn

    model = build_cnn(SIZE, blocks=2, base_filters=4, dense_units=0, crop=(0.0, 0.25, 0.125))
    x = np.zeros((2, SIZE, SIZE, 1), np.float32)
    x[:, SIZE * 3 // 4:] = 255.0       # the 'abdomen': the bottom quarter
    x[:, :, :SIZE // 8] = 255.0        # an arm along the left edge
    out = _stage(model, "lung_crop_resize").predict(x, verbose=0)
    assert out.shape == (2, SIZE, SIZE, 1)
    assert out.max() < 1.0
    with pytest.raises(ValueError, match="leaves nothing"):
        build_cnn(SIZE, crop=(0.3, 0.7, 0.0))


def _write_pngs(folder: Path, images: np.ndarray) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"img{i}.png"
        Image.fromarray(img[..., 0].round().astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("fill", ["mean", "inpaint"])
def test_saved_model_carries_the_mitigations_and_predict_matches_memory(
        tmp_path: Path, fill: str) -> None:
    from typer.testing import CliRunner

    from cxr_core.data.inputs import load_images
    from cxr_core.lifecycle.predict import load_model_dir, predict_paths
    from cxr_core.training.fit import MODEL_FILE, THRESHOLD_FILE
    from cxr_core.training.model import build_cnn
    from flows.cli import app
    from support.images import spread_outputs

    model = build_cnn(SIZE, blocks=2, base_filters=4, dense_units=0, mask="borders",
                      mask_fill=fill, crop=(0.0, 0.15, 0.05), intensity_norm="standardize",
                      seed=2)
    paths = _write_pngs(tmp_path / "images", _texted(6, seed=3))
    images = load_images(paths, SIZE)  # decoded as training decodes them
    spread_outputs(model, images)
    expected = np.asarray(model(images, training=False)).ravel()
    assert expected.std() > 0.05  # outputs that can differ, so equality means something
    (tmp_path / "model").mkdir()
    model.save(tmp_path / "model" / MODEL_FILE)
    (tmp_path / "model" / THRESHOLD_FILE).write_text(json.dumps({
        "threshold": 0.5, "recall": 1.0, "specificity": 1.0, "precision": 1.0,
        "recall_target": 0.9, "n_positive": 1, "n_negative": 1}))
    # Built-in layers only: the file names no cxr module and loads in Keras' safe mode.
    with zipfile.ZipFile(tmp_path / "model" / MODEL_FILE) as z:
        config = z.read("config.json").decode()
    assert "cxr_core" not in config and "annotation_mask" in config and "lung_crop" in config
    loaded = load_model_dir(tmp_path / "model")
    assert {"annotation_masked", "lung_crop_resize"} <= {layer.name for layer in loaded.model.layers}
    preds, errors = predict_paths(loaded, paths, workers=1)
    assert errors.empty
    got = preds.set_index("path").loc[paths, "probability"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", *paths, "--model", str(tmp_path / "model"),
                                   "--output", str(out), "--no-drift"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    cli = pd.read_csv(out).set_index("path").loc[paths, "probability"].to_numpy()
    np.testing.assert_allclose(cli, expected, atol=1e-5)


def _reach(size: int) -> np.ndarray:
    """Where a pasted stamp may land: each zone's start range plus the stamp's extent."""
    from cxr_core.data.markers import stamp_shape, zone_offsets

    h, w = stamp_shape(size)
    reach = np.zeros((size, size), bool)
    for r_lo, r_hi, c_lo, c_hi in zone_offsets(size):
        reach[r_lo:r_hi + h, c_lo:c_hi + w] = True
    return reach


def test_synthetic_markers_touch_both_classes_in_their_zones_only() -> None:
    import tensorflow as tf

    from cxr_core.data.inputs import paste_markers

    size, n = 64, 16
    x = np.full((n, size, size, 1), 60.0, np.float32)
    y = np.array([0.0, 1.0] * (n // 2), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    out = np.concatenate([b.numpy() for b, _ in paste_markers(ds, 1.0, size, seed=4)])
    changed = (out != x)[..., 0]
    assert changed.any(axis=(1, 2)).all()                   # every image, both classes
    assert not changed[:, ~_reach(size)].any()              # only in the border zones
    assert out.max() >= 150 and out.min() == 60.0           # bright marks, nothing darkened
    again = np.concatenate([b.numpy() for b, _ in paste_markers(ds, 1.0, size, seed=4)])
    assert np.array_equal(out, again)                       # reproducible for a seed
    half = np.concatenate([b.numpy() for b, _ in paste_markers(ds, 0.5, size, seed=4)])
    share = (half != x).any(axis=(1, 2, 3)).mean()
    assert 0.1 < share < 0.9
    assert paste_markers(ds, 0.0, size, seed=4) is ds


def test_synthetic_markers_are_for_training_images_only(tmp_path: Path) -> None:
    from cxr_core.config import ExperimentConfig
    from cxr_core.data.balance import BalancedTrainSet
    from cxr_core.data.inputs import make_datasets
    from cxr_core.data.splits import scan_and_split
    from support.images import make_good_dataset

    data = make_good_dataset(tmp_path / "data", n_patients=4, imgs=1)
    base = {"data": {"image_size": SIZE, "min_val_images": 0}, "train": {"batch_size": 64},
            "balance": {"strategy": "class_weight"}}
    scan = scan_and_split(data, ExperimentConfig.model_validate(base).data, 0)
    plain = make_datasets(BalancedTrainSet(scan.manifest, None, None),
                          ExperimentConfig.model_validate(base))
    marked_cfg = ExperimentConfig.model_validate(
        {**base, "balance": {"strategy": "class_weight", "augment": {"synthetic_marker_prob": 1.0}}})
    marked = make_datasets(BalancedTrainSet(scan.manifest, None, None), marked_cfg)
    (xv, _), = list(plain.val)
    (xm, _), = list(marked.val)
    assert np.array_equal(xv.numpy(), xm.numpy())           # validation untouched
    (xt, _), = list(plain.train)
    (xmt, ym), = list(marked.train)
    touched = (xmt.numpy() != xt.numpy()).any(axis=(1, 2, 3))
    assert touched.all() and set(ym.numpy().tolist()) == {0.0, 1.0}
