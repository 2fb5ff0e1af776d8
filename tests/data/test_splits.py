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
