"""Drift tests on the synthetic set: against itself no drift; after realistic acquisition
changes (exposure, noise, burned-in text, another resolution) drift, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cxr_core.data.synth import synthesize_dataset
from cxr_core.evaluation.drift import compare, compute_features, load_reference, save_reference

SIZE = 48


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("syn") / "d", n_per_class=140, size=64,
                              seed=2).root


@pytest.fixture(scope="module")
def model():
    import keras

    from cxr_core.training.model import build_cnn

    keras.utils.set_random_seed(0)
    return build_cnn(SIZE, blocks=2, base_filters=8, dense_units=16)


def _files(root: Path, split: str) -> list[str]:
    return sorted(str(p) for p in (root / split).rglob("*.jpeg"))


@pytest.fixture(scope="module")
def reference(synth, model, tmp_path_factory):
    batch, _ = compute_features(model, SIZE, _files(synth, "val"))
    path = save_reference(tmp_path_factory.mktemp("ref") / "drift_reference.npz", batch, 0.5,
                          "val")
    return load_reference(path)


def _shifted(files: list[str], out: Path, fn) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(files):
        img = fn(Image.open(f).convert("L"), np.random.default_rng(i))
        paths.append(str(out / Path(f).name))
        img.save(paths[-1], format="JPEG", quality=90)
    return paths


def _exposure(img, rng):
    x = np.asarray(img, float)
    return Image.fromarray(np.clip(0.6 * x + 90, 0, 255).astype(np.uint8))


def _noise(img, rng):
    x = np.asarray(img, float) + rng.normal(0, 25, img.size[::-1])
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def _text(img, rng):
    img = img.copy()
    draw = ImageDraw.Draw(img)
    for row in range(3):  # a burned-in header: site, date, "PORTABLE"
        draw.text((2, 2 + 10 * row), "PORTABLE AP 12:04", fill=255)
    return img


def _resolution(img, rng):
    return img.resize((160, 160), Image.BILINEAR)


def test_same_acquisition_shows_no_drift(synth, model, reference) -> None:
    batch, kept = compute_features(model, SIZE, _files(synth, "test"))
    report = compare(reference, batch, 0.5, seed=0)
    assert len(kept) == len(_files(synth, "test")) >= 40
    assert not report.drifted, report.summary()
    assert len(report.tests) == 12 and all(t.p_adjusted >= 0.01 for t in report.tests)
    assert "no drift detected" in report.summary()


@pytest.mark.parametrize("shift, expected", [
    (_exposure, {"intensity_p05", "intensity_mean"}),
    (_noise, {"intensity_p05", "entropy"}),
    (_text, {"annotation_score"}),
    (_resolution, {"width", "height"}),
])
def test_acquisition_changes_drift_with_the_reason(synth, model, reference, tmp_path, shift,
                                                   expected) -> None:
    paths = _shifted(_files(synth, "test"), tmp_path / shift.__name__, shift)
    batch, _ = compute_features(model, SIZE, paths)
    report = compare(reference, batch, 0.5, seed=0)
    drifted = {t.name for t in report.tests if t.drifted}
    assert report.drifted and expected <= drifted, report.summary()
    assert any(r.startswith(next(iter(expected))) for r in report.reasons)
    data = json.loads(report.to_json())
    assert data["drifted"] is True and data["n_images"] == len(paths)
    assert "DRIFTED" in report.summary()


def test_embedding_test_sees_a_shift_the_pixels_hide(synth, model, reference) -> None:
    """Embeddings moved by one standard deviation (same pixels, files and sizes): only the
    multivariate test can tell."""
    from cxr_core.evaluation import drift

    batch, _ = compute_features(model, SIZE, _files(synth, "test"))
    moved = drift.BatchFeatures(batch.features, batch.embeddings + batch.embeddings.std(axis=0),
                                batch.probabilities, batch.histogram)
    report = compare(reference, moved, 0.5, seed=0)
    (emb,) = [t for t in report.tests if t.name == "embeddings"]
    assert emb.drifted and report.drifted
    assert [t.name for t in report.tests if t.drifted] == ["embeddings"]


def test_small_batches_are_skipped_not_judged(synth, model, reference) -> None:
    batch, _ = compute_features(model, SIZE, _files(synth, "test")[:5])
    report = compare(reference, batch, 0.5)
    assert not report.drifted and report.skipped and "fewer than 20" in report.skipped
    assert json.loads(report.to_json())["skipped"]
