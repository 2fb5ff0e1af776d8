"""Tests of the synthetic chest X-ray generator (cxr_core.data.synth)."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.data.labels import LABELS, SPLITS
from cxr_core.data.synth import SynthSummary, render_xray, synthesize_dataset

PERSON = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
NORMAL_IM = re.compile(r"^(NORMAL2-)?IM-(\d{4})-(\d{4})\.jpeg$")


def _patient_of(name: str) -> str:
    """Patient id the way the pipeline groups files: person N, or IM prefix + number."""
    m = PERSON.match(name)
    if m:
        return f"person{m.group(1)}"
    m = NORMAL_IM.match(name)
    if m:
        return f"{m.group(1) or ''}IM-{m.group(2)}"
    raise AssertionError(f"file name matches no Kaggle pattern: {name}")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synthesize_dataset(tmp_path_factory.mktemp("synth") / "ds", n_per_class=12, size=64)


def test_layout_and_counts_match_disk(small: SynthSummary) -> None:
    root = small.root
    assert set(small.counts) == set(SPLITS)
    total = {label: 0 for label in LABELS}
    for split in SPLITS:
        for label in LABELS:
            files = list((root / split / label).iterdir())
            assert all(f.suffix == ".jpeg" for f in files)
            assert len(files) == small.counts[split][label]
            assert len(files) >= 1, f"{split}/{label} is empty"
            total[label] += len(files)
    assert total == {"NORMAL": 12, "PNEUMONIA": 12}
    # nothing else was written: only the 3 x 2 class folders
    assert sorted(p.name for p in root.iterdir()) == sorted(SPLITS)
    # 0.7 / 0.15 / 0.15 of 12 images per class
    assert small.counts["train"] == {"NORMAL": 8, "PNEUMONIA": 8}


def test_file_names_follow_kaggle_patterns(small: SynthSummary) -> None:
    counters = []
    for p in small.root.rglob("*.jpeg"):
        if p.parent.name == "PNEUMONIA":
            m = PERSON.match(p.name)
            assert m, p.name
            counters.append(int(m.group(3)))
        else:
            assert NORMAL_IM.match(p.name), p.name
    assert len(counters) == len(set(counters)), "personN_kind_M: M must be unique"


def test_patients_never_straddle_splits(small: SynthSummary) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    images_of: dict[str, int] = defaultdict(int)
    for p in small.root.rglob("*.jpeg"):
        pid = _patient_of(p.name)
        splits_of[pid].add(p.parent.parent.name)
        images_of[pid] += 1
    assert all(len(s) == 1 for s in splits_of.values()), {
        k: v for k, v in splits_of.items() if len(v) > 1
    }
    assert max(images_of.values()) > 1, "every patient has a single image"
    assert max(images_of.values()) <= 4
    assert len(splits_of) == small.n_patients
    # numbers are unique over both classes too, so even a numbers-only parser cannot merge
    numbers = [re.sub(r"\D", "", pid.replace("NORMAL2", "")) for pid in splits_of]
    assert len(numbers) == len(set(numbers))


def test_images_decode_as_grayscale_of_the_requested_size(small: SynthSummary) -> None:
    for p in small.root.rglob("*.jpeg"):
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "L"
            assert im.size == (64, 64)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kw = dict(n_per_class=6, size=64)
    a = _digests(synthesize_dataset(tmp_path / "a", seed=7, **kw).root)
    b = _digests(synthesize_dataset(tmp_path / "b", seed=7, **kw).root)
    c = _digests(synthesize_dataset(tmp_path / "c", seed=8, **kw).root)
    assert a == b
    assert len(a) == 12
    # another seed: other images (file names may coincide, contents must not)
    assert not set(a.values()) & set(c.values())


def test_render_xray_is_deterministic_and_shaped() -> None:
    a = render_xray(np.random.default_rng(3), 96, pneumonia=True)
    b = render_xray(np.random.default_rng(3), 96, pneumonia=True)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, b)
    # dark air outside the body, bright mediastinum in the middle
    assert a[40:70, 44:52].mean() > a[:, :4].mean() + 40


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not touch")
    with pytest.raises(FileExistsError, match="ds"):
        synthesize_dataset(out, n_per_class=4, size=32)
    assert keep.read_text() == "do not touch"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_empty_existing_out_dir_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    summary = synthesize_dataset(out, n_per_class=3, size=32)
    assert sum(sum(c.values()) for c in summary.counts.values()) == 6


def test_image_size_does_not_depend_on_class(tmp_path: Path) -> None:
    s = synthesize_dataset(tmp_path / "ds", n_per_class=20, size=48, seed=1)
    sizes = defaultdict(list)
    for p in s.root.rglob("*.jpeg"):
        with Image.open(p) as im:
            assert im.size == (48, 48)
        sizes[p.parent.name].append(p.stat().st_size)
    # JPEG sizes overlap: the byte count alone does not give the class away
    n, pn = sizes["NORMAL"], sizes["PNEUMONIA"]
    assert min(pn) < max(n) and min(n) < max(pn)


def test_classes_are_separable_from_pixels(tmp_path: Path) -> None:
    """A linear model on coarse pixels must find the opacities (AUC clearly above chance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s = synthesize_dataset(tmp_path / "ds", n_per_class=100, size=64, seed=0)
    feats, labels = [], []
    for p in sorted(s.root.rglob("*.jpeg")):
        a = np.asarray(Image.open(p), dtype=np.float32) / 255.0
        feats.append(a.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel())
        labels.append(p.parent.name == "PNEUMONIA")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    auc = cross_val_score(model, np.array(feats), np.array(labels), cv=5, scoring="roc_auc")
    assert auc.mean() > 0.6, auc
