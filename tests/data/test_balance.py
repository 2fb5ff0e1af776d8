"""Offline class balancing: planning arithmetic, the augmentation itself, reproducible writes
with lineage, train-only sources, manifest rows for the written files, class weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core.config import AugmentConfig
from cxr_core.data.balance import (
    LINEAGE_COLUMNS,
    PARAM_FIELDS,
    AugmentParams,
    augment_image,
    augmented_manifest_rows,
    class_weights,
    load_gray,
    plan_balance,
    plan_variants,
    sample_params,
    write_offline_augmentations,
)
from cxr_core.data.manifest import MANIFEST_COLUMNS, scan_dataset
from support.images import tree_digest, write_image

IDENTITY = AugmentParams.identity()


def params(**kw: float | bool) -> AugmentParams:
    return AugmentParams(**{**IDENTITY.as_dict(), **kw})


# --------------------------------------------------------------------------- plan_balance

@pytest.mark.parametrize(
    "counts, ratio, expected",
    [
        # The real Kaggle train split (74% PNEUMONIA): NORMAL is lifted to the majority.
        ({"NORMAL": 1341, "PNEUMONIA": 3875}, 1.0, {"NORMAL": 2534, "PNEUMONIA": 0}),
        ({"NORMAL": 50, "PNEUMONIA": 50}, 1.0, {"NORMAL": 0, "PNEUMONIA": 0}),
        ({"NORMAL": 10, "PNEUMONIA": 30}, 0.5, {"NORMAL": 5, "PNEUMONIA": 0}),
        # ceil(0.5 * 31) = 16, not 15.
        ({"NORMAL": 10, "PNEUMONIA": 31}, 0.5, {"NORMAL": 6, "PNEUMONIA": 0}),
        # 0.7 * 10 is 7.000000000000001 in floating point: still a target of 7.
        ({"NORMAL": 5, "PNEUMONIA": 10}, 0.7, {"NORMAL": 2, "PNEUMONIA": 0}),
        # The minority already above the target gets nothing.
        ({"NORMAL": 20, "PNEUMONIA": 30}, 0.5, {"NORMAL": 0, "PNEUMONIA": 0}),
        # The majority may be either class, and more than two classes work.
        ({"NORMAL": 9, "PNEUMONIA": 3}, 1.0, {"NORMAL": 0, "PNEUMONIA": 6}),
        ({"a": 1, "b": 4, "c": 7}, 1.0, {"a": 6, "b": 3, "c": 0}),
    ],
)
def test_plan_balance(counts: dict[str, int], ratio: float, expected: dict[str, int]) -> None:
    plan = plan_balance(counts, ratio)
    assert plan == expected
    assert plan[max(counts, key=counts.get)] == 0  # the majority is never augmented


@pytest.mark.parametrize(
    "counts, ratio, message",
    [
        ({"NORMAL": -1, "PNEUMONIA": 5}, 1.0, "NORMAL"),
        ({"NORMAL": 0, "PNEUMONIA": 5}, 1.0, "NORMAL"),
        ({"NORMAL": 2.5, "PNEUMONIA": 5}, 1.0, "NORMAL"),
        ({}, 1.0, "no classes"),
        ({"NORMAL": 1, "PNEUMONIA": 5}, 0.0, "target_ratio"),
        ({"NORMAL": 1, "PNEUMONIA": 5}, 1.5, "target_ratio"),
    ],
)
def test_plan_balance_rejects(counts: dict[str, float], ratio: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_balance(counts, ratio)


# --------------------------------------------------------------------------- plan_variants

@pytest.mark.parametrize("n_sources, n_new", [(4, 8), (4, 10), (3, 2), (5, 1), (1, 7)])
def test_plan_variants_spreads_evenly(n_sources: int, n_new: int) -> None:
    sources = [f"/d/s{i}.jpeg" for i in reversed(range(n_sources))]  # unsorted on purpose
    pairs = plan_variants(sources, n_new)
    assert len(pairs) == n_new
    per = {s: sum(1 for p, _ in pairs if p == s) for s in sources}
    assert set(per.values()) <= {n_new // n_sources, -(-n_new // n_sources)}
    # The extra variants go to the first sources in sorted order.
    ordered = sorted(sources)
    assert [per[s] for s in ordered] == sorted(per.values(), reverse=True)
    # Variant indices count 0..k-1 per source, and no pair repeats.
    for s in ordered:
        assert sorted(v for p, v in pairs if p == s) == list(range(per[s]))
    assert len(set(pairs)) == len(pairs)
    assert plan_variants(list(reversed(sources)), n_new) == pairs  # order-independent


def test_plan_variants_edges() -> None:
    assert plan_variants(["/a.png", "/b.png"], 0) == []
    assert plan_variants([], 0) == []
    with pytest.raises(ValueError):
        plan_variants([], 3)
    with pytest.raises(ValueError):
        plan_variants(["/a.png"], -1)
    with pytest.raises(ValueError, match="duplicate"):
        plan_variants(["/a.png", "/a.png"], 2)


# --------------------------------------------------------------------------- sample_params

def test_sample_params_within_bounds_and_no_flip_by_default() -> None:
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    draws = [sample_params(rng, cfg) for _ in range(300)]
    rot = np.array([p.rotation_deg for p in draws])
    assert np.abs(rot).max() <= cfg.max_rotation_deg
    assert rot.min() < -cfg.max_rotation_deg / 2 and rot.max() > cfg.max_rotation_deg / 2
    for p in draws:
        assert 1 - cfg.max_zoom <= p.zoom <= 1 + cfg.max_zoom
        assert abs(p.shift_x) <= cfg.max_shift and abs(p.shift_y) <= cfg.max_shift
        assert abs(p.brightness) <= cfg.max_brightness
        assert 1 - cfg.max_contrast <= p.contrast <= 1 + cfg.max_contrast
        assert cfg.gamma_range[0] <= p.gamma <= cfg.gamma_range[1]
        assert p.hflip is False
        assert all(type(v) in (float, bool) for v in p.as_dict().values())


def test_sample_params_flip_only_when_enabled_and_zero_bounds_give_identity() -> None:
    flips = {sample_params(np.random.default_rng(i), AugmentConfig(horizontal_flip=True)).hflip
             for i in range(50)}
    assert flips == {True, False}
    still = AugmentConfig(max_rotation_deg=0, max_zoom=0, max_shift=0, max_brightness=0,
                          max_contrast=0, gamma_range=(1.0, 1.0))
    assert sample_params(np.random.default_rng(3), still) == IDENTITY
    with pytest.raises(ValueError, match="gamma"):
        sample_params(np.random.default_rng(0), AugmentConfig(gamma_range=(1.2, 0.8)))


# --------------------------------------------------------------------------- augment_image

def test_augment_image_keeps_shape_and_dtype() -> None:
    img = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)  # not square
    for seed in range(5):
        out = augment_image(img, sample_params(np.random.default_rng(seed), AugmentConfig()))
        assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError):
        augment_image(img.astype(np.float32), IDENTITY)
    with pytest.raises(ValueError):
        augment_image(np.zeros((8, 8, 3), np.uint8), IDENTITY)


def test_identity_params_leave_the_image_unchanged() -> None:
    img = np.random.default_rng(1).integers(0, 256, (33, 47), dtype=np.uint8)
    out = augment_image(img, IDENTITY)
    assert np.abs(out.astype(int) - img).max() <= 1


def test_geometry_directions() -> None:
    img = np.random.default_rng(2).integers(0, 256, (31, 31), dtype=np.uint8)
    # 90 degrees counter-clockwise, exactly numpy's rot90; and the flip is left-right only.
    assert np.array_equal(augment_image(img, params(rotation_deg=90.0)), np.rot90(img))
    assert np.array_equal(augment_image(img, params(hflip=True)), img[:, ::-1])
    # Positive shifts move the content right (x) and down (y).
    dot = np.zeros((41, 41), np.uint8)
    dot[20, 20] = 255
    moved = augment_image(dot, params(shift_x=0.25, shift_y=-0.25))
    r, c = np.unravel_index(np.argmax(moved), moved.shape)
    assert c > 20 and r < 20


def test_no_flip_keeps_left_right_and_top_bottom() -> None:
    """hflip=False never mirrors; nothing ever flips vertically."""
    left = np.full((48, 48), 50, np.uint8)
    left[:, :24] = 200
    top = np.full((48, 48), 50, np.uint8)
    top[:24, :] = 200
    rng = np.random.default_rng(7)
    for _ in range(30):
        p = sample_params(rng, AugmentConfig())
        a = augment_image(left, p).astype(float)
        b = augment_image(top, p).astype(float)
        assert a[:, :24].mean() > a[:, 24:].mean() + 50
        assert b[:24].mean() > b[24:].mean() + 50
    flipped = augment_image(left, params(zoom=1.05, hflip=True)).astype(float)
    assert flipped[:, 24:].mean() > flipped[:, :24].mean() + 50


def test_rotation_is_bounded_and_corners_are_not_black() -> None:
    img = np.full((64, 64), 180, np.uint8)
    out = augment_image(img, params(rotation_deg=10.0, zoom=0.9, shift_x=0.05))
    # Reflected borders: a uniform image stays uniform (no black corners).
    assert out.min() == 180
    # A 10 degree rotation moves a horizontal bar's ends by about tan(10) * half-length.
    bar = np.zeros((65, 65), np.uint8)
    bar[32, 8:57] = 255
    rot = augment_image(bar, params(rotation_deg=10.0))
    rows = np.nonzero(rot.max(axis=1) > 100)[0]
    assert 2 * np.tan(np.radians(8)) * 24 < rows.max() - rows.min() + 1 < 2 * np.tan(np.radians(12)) * 24 + 3


def test_intensity_transforms() -> None:
    flat = np.full((16, 16), 64, np.uint8)
    assert np.all(augment_image(flat, params(brightness=0.2)) == 64 + 51)
    assert np.all(augment_image(flat, params(contrast=1.5)) == 64)  # around the mean
    assert np.all(augment_image(flat, params(gamma=0.5)) == round(255 * (64 / 255) ** 0.5))
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    stretched = augment_image(ramp, params(contrast=1.5)).astype(int)
    assert np.ptp(stretched) > np.ptp(ramp.astype(int))
    assert stretched.min() >= 0 and stretched.max() <= 255  # clipped, no wrap-around
    assert augment_image(np.full((8, 8), 250, np.uint8), params(brightness=0.5)).min() == 255


def test_load_gray_scales_16_bit_instead_of_clipping(tmp_path: Path) -> None:
    p16 = write_image(tmp_path / "a.png", 3, size=32, mode="I;16", fmt="PNG")
    gray = load_gray(p16)
    raw = np.asarray(Image.open(p16))
    assert gray.dtype == np.uint8 and np.array_equal(gray, (raw >> 8).astype(np.uint8))
    assert 100 < gray.mean() < 155  # Pillow's convert('L') would give ~255 everywhere
    rgb = write_image(tmp_path / "b.png", 4, size=32, mode="RGB", fmt="PNG")
    assert load_gray(rgb).shape == (32, 32)


# --------------------------------------------------------------------------- writing

@pytest.fixture
def imbalanced(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """train: 12 PNEUMONIA, 5 NORMAL (one carved to test) + an unreadable NORMAL file;
    val/test images of both classes. Returns (data root, manifest)."""
    root = tmp_path / "data"
    seed = 0
    for i in range(12):
        write_image(root / "train" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", seed := seed + 1, size=32)
    for i in range(3):
        write_image(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", seed := seed + 1, size=32)
    # Odd source formats: 16-bit grayscale PNG and an RGB PNG.
    write_image(root / "train" / "NORMAL" / "IM-0100-0001.png", seed := seed + 1, size=32, mode="I;16", fmt="PNG")
    write_image(root / "train" / "NORMAL" / "IM-0101-0001.png", seed := seed + 1, size=32, mode="RGB", fmt="PNG")
    (root / "train" / "NORMAL" / "IM-0200-0001.jpeg").write_bytes(b"")  # unreadable
    for split in ("val", "test"):
        for label, name in (("NORMAL", "IM-0900-0001.jpeg"), ("PNEUMONIA", "person900_virus_1.jpeg")):
            write_image(root / split / label / name, seed := seed + 1, size=32)
    manifest = scan_dataset(root, workers=1).manifest
    manifest["split"] = manifest["folder_split"]
    carved = manifest["path"].str.endswith("IM-0101-0001.png")  # carved from train into test
    manifest.loc[carved, ["split", "split_origin"]] = ["test", "carved"]
    return root, manifest


def test_balancing_reaches_target_from_train_sources_only(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    out = tmp_path / "aug"
    lineage = write_offline_augmentations(manifest, out, 1.0, AugmentConfig(), seed=5)
    assert list(lineage.columns) == LINEAGE_COLUMNS
    assert (lineage["label"] == "NORMAL").all()
    # The lineage says the file is not the last transform: training augments it online too.
    assert lineage["also_online_augmented"].all()
    assert 4 + len(lineage) == 12  # four usable train NORMAL images lifted to the 12 PNEUMONIA

    eligible = manifest[(manifest["split"] == "train") & manifest["readable"]
                        & (manifest["label"] == "NORMAL")]["path"]
    assert len(eligible) == 4
    assert set(lineage["source_path"]) == set(eligible)  # 8 variants over 4 sources: 2 each
    assert lineage.groupby("source_path").size().eq(2).all()
    never = manifest[(manifest["split"] != "train") | ~manifest["readable"]]["path"]
    assert len(never) >= 6 and not set(never) & set(lineage["source_path"])

    for row in lineage.itertuples(index=False):
        path = Path(row.path)
        assert path.is_file() and path.parent == out.resolve() / "NORMAL"
        assert path.name == f"{Path(row.source_path).stem}__aug{row.variant_index}.png"
        src = manifest.set_index("path").loc[row.source_path]
        assert row.patient_id == src["patient_id"] and row.split == "train" and row.seed == 5
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (32, 32)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        Path(p).name for p in lineage["path"])
    assert not list(tmp_path.glob(".aug.partial-*"))  # staging folder cleaned up

    # The 16-bit source was scaled, not clipped into a white image.
    from16 = lineage[lineage["source_path"].str.endswith("IM-0100-0001.png")]["path"]
    assert len(from16) == 2 and all(np.asarray(Image.open(p)).mean() < 200 for p in from16)


def test_lineage_params_reproduce_the_file(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    lineage = write_offline_augmentations(manifest, tmp_path / "aug", 1.0, AugmentConfig(), seed=1)
    row = lineage.iloc[3]
    p = AugmentParams(**{f: row[f] for f in PARAM_FIELDS})
    expected = augment_image(load_gray(row["source_path"]), p)
    assert np.array_equal(np.asarray(Image.open(row["path"])), expected)
    assert p != AugmentParams.identity()


def test_writes_are_deterministic_and_seeded(tmp_path: Path, imbalanced) -> None:
    root, manifest = imbalanced
    before = tree_digest(root)
    cfg = AugmentConfig()
    a = write_offline_augmentations(manifest, tmp_path / "a", 1.0, cfg, seed=11)
    # Row order of the input must not matter.
    b = write_offline_augmentations(manifest.iloc[::-1], tmp_path / "b", 1.0, cfg, seed=11)
    c = write_offline_augmentations(manifest, tmp_path / "c", 1.0, cfg, seed=12)
    da, db, dc = (tree_digest(tmp_path / n) for n in "abc")
    assert da == db and len(da) == 8
    pd.testing.assert_frame_equal(a.drop(columns="path"), b.drop(columns="path"))
    assert da.keys() == dc.keys() and all(da[k] != dc[k] for k in da)
    assert not c[list(PARAM_FIELDS)].equals(a[list(PARAM_FIELDS)])
    assert tree_digest(root) == before  # sources never modified
    # Each variant has its own parameters: no two files (of one source or not) are equal.
    assert len(set(da.values())) == len(da)
    assert not a.duplicated(subset=list(PARAM_FIELDS)).any()


def test_workers_give_identical_bytes(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    cfg = AugmentConfig(horizontal_flip=True)
    write_offline_augmentations(manifest, tmp_path / "serial", 1.0, cfg, seed=3, workers=1)
    write_offline_augmentations(manifest, tmp_path / "pool", 1.0, cfg, seed=3, workers=2)
    assert tree_digest(tmp_path / "serial") == tree_digest(tmp_path / "pool")


def test_refuses_non_empty_out_dir_and_accepts_empty(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    out = tmp_path / "aug"
    out.mkdir()
    (out / "stale.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="aug"):
        write_offline_augmentations(manifest, out, 1.0, AugmentConfig(), seed=0)
    assert [p.name for p in out.iterdir()] == ["stale.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_offline_augmentations(manifest, empty, 1.0, AugmentConfig(), seed=0)) == 8


def test_partial_ratio_and_nothing_to_do(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    half = write_offline_augmentations(manifest, tmp_path / "half", 0.5, AugmentConfig(), seed=0)
    assert 4 + len(half) == 6
    none = write_offline_augmentations(manifest, tmp_path / "none", 0.25, AugmentConfig(), seed=0)
    assert none.empty and list(none.columns) == LINEAGE_COLUMNS
    assert augmented_manifest_rows(none).columns.tolist() == MANIFEST_COLUMNS


def test_class_without_train_images_is_refused(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    only_pneumonia = manifest[manifest["label"] != "NORMAL"]
    with pytest.raises(ValueError, match="NORMAL"):
        write_offline_augmentations(only_pneumonia, tmp_path / "x", 1.0, AugmentConfig(), seed=0)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_same_stem_sources_do_not_overwrite_each_other(tmp_path: Path) -> None:
    a = write_image(tmp_path / "src" / "one" / "x.jpeg", 1, size=16)
    b = write_image(tmp_path / "src" / "two" / "x.jpeg", 2, size=16)
    rows = [{"path": str(p), "split": "train", "readable": True, "label": "NORMAL",
             "patient_id": f"p{i}"} for i, p in enumerate((a, b))]
    rows += [{"path": f"/none/{i}.jpeg", "split": "train", "readable": True,
              "label": "PNEUMONIA", "patient_id": str(i)} for i in range(4)]
    lineage = write_offline_augmentations(pd.DataFrame(rows), tmp_path / "aug", 1.0,
                                          AugmentConfig(), seed=0)
    assert len(lineage) == 2 and lineage["path"].nunique() == 2
    assert all(Path(p).is_file() for p in lineage["path"])


# --------------------------------------------------------------------------- manifest rows

def test_augmented_manifest_rows(tmp_path: Path, imbalanced) -> None:
    _, manifest = imbalanced
    out = tmp_path / "aug"
    lineage = write_offline_augmentations(manifest, out, 1.0, AugmentConfig(), seed=2)
    rows = augmented_manifest_rows(lineage)
    assert rows.columns.tolist() == MANIFEST_COLUMNS and len(rows) == len(lineage)
    assert (rows["split"] == "train").all() and (rows["folder_split"] == "train").all()
    assert (rows["split_origin"] == "augmented").all()
    assert rows["readable"].all() and rows["readable"].dtype == bool
    assert rows["relpath"].tolist() == [f"NORMAL/{Path(p).name}" for p in lineage["path"]]
    assert rows["patient_id"].tolist() == lineage["patient_id"].tolist()
    assert (rows["format"] == "PNG").all() and (rows["width"] == 32).all()
    assert rows["sha256"].tolist() == [
        hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in lineage["path"]]
    combined = pd.concat([manifest, rows], ignore_index=True)
    train_normal = combined[(combined["split"] == "train") & combined["readable"]
                            & (combined["label"] == "NORMAL")]
    assert len(train_normal) == 12


# --------------------------------------------------------------------------- class weights

def test_class_weights_formula() -> None:
    w = class_weights({"NORMAL": 1341, "PNEUMONIA": 3875})
    assert set(w) == {0, 1}
    assert w[0] == pytest.approx(5216 / (2 * 1341)) and w[1] == pytest.approx(5216 / (2 * 3875))
    assert 1341 * w[0] == pytest.approx(3875 * w[1])  # each class weighs the same in the loss
    assert class_weights({"PNEUMONIA": 7, "NORMAL": 7}) == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="NORMAL"):
        class_weights({"NORMAL": 0, "PNEUMONIA": 5})
    with pytest.raises(ValueError, match="COVID"):
        class_weights({"NORMAL": 3, "PNEUMONIA": 5, "COVID": 1})


def test_the_training_order_does_not_depend_on_where_the_state_folder_lies(
        tmp_path: Path, imbalanced) -> None:
    """The seeded shuffle permutes this order, so it decides the batches: the same data
    and seed balanced into a state folder whose path sorts before the data folder's
    (``a-state``) or after it (``z-state``) must give the same sequence of images."""
    from cxr_core.config import ExperimentConfig
    from cxr_core.data.balance import balance_train_split
    from cxr_core.data.inputs import split_data, split_rows

    root, manifest = imbalanced
    assert "a-state" < root.name < "z-state"
    cfg = ExperimentConfig()  # offline balancing, the default
    orders, labels = [], []
    for state in ("a-state", "z-state"):
        balanced = balance_train_split(manifest, cfg, tmp_path / state).manifest
        rows = split_rows(balanced, "train")
        orders.append(list(zip(rows["split_origin"], rows["relpath"])))
        labels.append(split_data(balanced, "train").labels.tolist())
    assert orders[0] == orders[1] and labels[0] == labels[1]
    # Variants first (what the absolute-path order gave when the state folder sorted first).
    origins = [origin for origin, _ in orders[0]]
    assert origins[:8] == ["augmented"] * 8 and "augmented" not in origins[8:]
