"""Patient-grouped, class-stratified carving of val/test from train."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_core.data.splits import (
    PatientLeakError,
    assert_no_carved_overlap,
    assign_splits,
    carved_overlap_mask,
    fold_plan,
    patient_overlaps,
)


def fake_manifest(n_normal_patients: int = 60, n_pneu_patients: int = 120, val_rows: int = 4,
                  with_test: bool = False, seed: int = 0) -> pd.DataFrame:
    """Rows only (no files): patients with 1-4 images each, like the real train split."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n, fmt in (("NORMAL", n_normal_patients, "IM-{:04d}"),
                          ("PNEUMONIA", n_pneu_patients, "{}")):
        for p in range(n):
            for k in range(int(rng.integers(1, 5))):
                rows.append({"folder_split": "train", "label": label, "patient_id": fmt.format(p),
                             "path": f"/d/train/{label}/{p}_{k}.jpeg"})
    for i in range(val_rows):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        rows.append({"folder_split": "val", "label": label, "patient_id": f"v{i}",
                     "path": f"/d/val/{label}/v{i}.jpeg"})
    if with_test:
        for i in range(20):
            label = ("NORMAL", "PNEUMONIA")[i % 2]
            rows.append({"folder_split": "test", "label": label, "patient_id": f"t{i}",
                         "path": f"/d/test/{label}/t{i}.jpeg"})
    df = pd.DataFrame(rows)
    df["split"] = df["folder_split"]
    df["split_origin"] = "folder"
    return df


def test_carves_val_and_test_grouped_and_stratified() -> None:
    m = fake_manifest()
    out = assign_splits(m, val_fraction=0.15, test_fraction=0.15, min_val_images=100, seed=1)
    assert set(out["split"]) == {"train", "val", "test"}
    # No patient in two splits.
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    # Each carved split holds about 15% of each class (patient granularity allows slack).
    for split in ("val", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            share = ((out["split"] == split) & (out["label"] == label)).sum() / (
                (m["label"] == label).sum())
            assert 0.10 <= share <= 0.20, (split, label, share)
    # The tiny given val was folded into train first (and may have been re-carved).
    assert set(out.loc[out["folder_split"] == "val", "split_origin"]) <= {"folded", "carved"}
    assert_no_carved_overlap(out)


def test_same_seed_same_assignment_other_seed_differs() -> None:
    m = fake_manifest()
    a = assign_splits(m, seed=3)["split"]
    b = assign_splits(m, seed=3)["split"]
    c = assign_splits(m, seed=4)["split"]
    assert a.equals(b) and not a.equals(c)


def test_given_test_and_large_val_are_kept() -> None:
    m = fake_manifest(val_rows=30, with_test=True)
    out = assign_splits(m, min_val_images=10, seed=0)
    given = out["folder_split"].isin(["val", "test"])
    assert (out.loc[given, "split"] == out.loc[given, "folder_split"]).all()
    assert (out.loc[given, "split_origin"] == "folder").all()
    assert not (out["split_origin"] == "carved").any()


def test_unlabelled_rows_keep_their_folder_split() -> None:
    m = fake_manifest()
    m.loc[len(m)] = {"folder_split": "train", "label": None, "patient_id": "x",
                     "path": "/d/train/COVID/x.jpeg", "split": "train", "split_origin": "folder"}
    out = assign_splits(m, seed=0)
    assert out.iloc[-1]["split"] == "train"


def test_overlap_detection_distinguishes_carved_from_given() -> None:
    m = fake_manifest(val_rows=0, with_test=True)
    out = assign_splits(m, seed=0)
    assert not carved_overlap_mask(out).any()
    # A patient present in both the train folder and the given test folder: user-given overlap.
    given = out.copy()
    given.loc[given["folder_split"] == "test", "patient_id"] = out.loc[
        out["split"] == "train", "patient_id"].iloc[0]
    assert not carved_overlap_mask(given).any()
    assert len(patient_overlaps(given)) > 0
    # A carved split sharing a patient with train: the pipeline's own leak.
    broken = out.copy()
    val_idx = broken.index[broken["split"] == "val"][0]
    broken.loc[val_idx, "patient_id"] = broken.loc[broken["split"] == "train", "patient_id"].iloc[0]
    assert carved_overlap_mask(broken).any()
    with pytest.raises(PatientLeakError):
        assert_no_carved_overlap(broken)


def test_too_few_patients_carves_nothing_for_that_class() -> None:
    m = fake_manifest(n_normal_patients=2, n_pneu_patients=30, val_rows=0)
    out = assign_splits(m, seed=0)
    carved = out[out["split_origin"] == "carved"]
    assert (carved["label"] == "PNEUMONIA").all() and len(carved) > 0


def _share(out: pd.DataFrame, m: pd.DataFrame, split: str, label: str) -> float:
    return ((out["split"] == split) & (out["label"] == label)).sum() / (m["label"] == label).sum()


@pytest.mark.parametrize("n_normal", [60, 2])
def test_patient_with_images_in_both_classes_stays_in_one_split(n_normal: int) -> None:
    # Ids are inferred from file names: here 12 PNEUMONIA patients share an id with a NORMAL
    # one. Carving each class on its own split such ids (PatientLeakError); with only 2 NORMAL
    # patients that class stays in train, and so must the shared ids' PNEUMONIA images.
    m = fake_manifest(n_normal_patients=n_normal, val_rows=0)
    shared = m["patient_id"].isin([str(p) for p in range(12)]) & (m["label"] == "PNEUMONIA")
    m.loc[shared, "patient_id"] = m.loc[shared, "patient_id"].map(
        lambda p: f"IM-{int(p) % n_normal:04d}")
    mixed = m.groupby("patient_id")["label"].nunique().loc[lambda n: n > 1].index
    assert len(mixed) == min(12, n_normal)
    for seed in range(5):
        out = assign_splits(m, seed=seed)
        assert out.groupby("patient_id")["split"].nunique().max() == 1
        assert set(out["split"]) == {"train", "val", "test"}
        if n_normal == 2:
            assert (out.loc[out["patient_id"].isin(mixed), "split"] == "train").all()


def test_class_with_three_patients_gives_one_to_each_split() -> None:
    m = fake_manifest(n_normal_patients=3, n_pneu_patients=40, val_rows=0)
    for seed in range(5):
        out = assign_splits(m, seed=seed)
        normal = out[out["label"] == "NORMAL"]
        assert normal.groupby("split")["patient_id"].nunique().to_dict() == {
            "train": 1, "val": 1, "test": 1}


@pytest.mark.parametrize("val_fraction, test_fraction", [(0.1, 0.3), (0.2, 0.05), (0.25, 0.25)])
def test_other_fractions_are_met_per_class(val_fraction: float, test_fraction: float) -> None:
    m = fake_manifest(n_normal_patients=100, n_pneu_patients=200, val_rows=0)
    out = assign_splits(m, val_fraction=val_fraction, test_fraction=test_fraction, seed=0)
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        for label in ("NORMAL", "PNEUMONIA"):
            assert abs(_share(out, m, split, label) - fraction) <= 0.02, (split, label)


def test_given_test_with_small_val_carves_val_only() -> None:
    m = fake_manifest(val_rows=4, with_test=True)
    out = assign_splits(m, val_fraction=0.2, min_val_images=100, seed=0)
    assert set(out.loc[out["split_origin"] == "carved", "split"]) == {"val"}
    assert (out.loc[out["folder_split"] == "test", "split"] == "test").all()
    for label in ("NORMAL", "PNEUMONIA"):
        assert abs(_share(out, m, "val", label) - 0.2) <= 0.02


def test_assignment_does_not_depend_on_row_order() -> None:
    m = fake_manifest()
    a = assign_splits(m, seed=7).set_index("path")["split"]
    b = assign_splits(m.sample(frac=1.0, random_state=1), seed=7).set_index("path")["split"]
    assert a.sort_index().equals(b.sort_index())


@pytest.mark.parametrize("fractions, max_folds, expected", [
    ([0.15, 0.15], 20, (7, [1, 1])),     # 14.3 % each, within a point of 15 %
    ([0.1, 0.3], 20, (10, [1, 3])),
    ([0.05], 20, (17, [1])),
    ([0.15, 0.15], 3, (3, [1, 1])),      # a class with 3 patients: one fold per split
    ([0.49, 0.49], 20, (19, [9, 9])),    # no plan within a point: the smallest error
])
def test_fold_plan(fractions: list[float], max_folds: int, expected: tuple[int, list[int]]) -> None:
    k, counts = fold_plan(fractions, max_folds=max_folds)
    assert (k, counts) == expected
    assert sum(counts) < k and min(counts) >= 1
