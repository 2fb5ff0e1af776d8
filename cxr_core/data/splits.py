"""Patient-grouped, class-stratified splits carved from train.

The official ``val`` folder has 16 images and ``test`` may be absent; a model chosen on
either would be chosen on noise or not at all. Carving keeps every patient's images in one
split (no patient leaks between train and the images that judge it); the folds come from
scikit-learn's ``StratifiedGroupKFold``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_core.config import DataConfig
from cxr_core.data.labels import LABELS
from cxr_core.data.manifest import ScanResult, scan_dataset

# A class needs 3 patients (one each for train, val and test) before any of it is carved; with
# fewer it stays whole in train (a carved split with no patient of a class cannot judge it).
MIN_PATIENTS_TO_CARVE = 3
# Carved shares are whole folds of the pool. scikit-learn's greedy costs about one pass over the
# patients per fold (about 0.35 s CPU per fold for the 2,846 real train patients here), so
# the fewest folds that meet every fraction to within a percentage point of the pool are used.
MAX_FOLDS = 20
FRACTION_TOLERANCE = 0.01


class PatientLeakError(AssertionError):
    """Carving produced a patient in two splits (a bug, never expected)."""


def _carvable(pool: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``pool`` that may be carved: patients of a class with too few patients stay in
    train, with all their images (an id with images in both classes included)."""
    while True:
        per_class = pool.groupby("label")["patient_id"].nunique()
        small = per_class.index[per_class < MIN_PATIENTS_TO_CARVE]
        if small.empty:
            return pool
        held = pool.loc[pool["label"].isin(small), "patient_id"]
        pool = pool[~pool["patient_id"].isin(held)]


def fold_plan(fractions: list[float], max_folds: int = MAX_FOLDS,
              tolerance: float = FRACTION_TOLERANCE) -> tuple[int, list[int]]:
    """Fold count ``k`` and folds per carved split, whose shares (folds / k) match ``fractions``.

    Every carved split gets a fold and train keeps at least one. The smallest ``k`` that puts
    every share within ``tolerance`` wins (0.15 and 0.15 -> 7 folds, one each: 14.3 %; 0.1 and
    0.3 -> 10 folds, 1 and 3); failing that, the ``k`` with the smallest worst error.
    """
    plans = []
    for k in range(len(fractions) + 1, max_folds + 1):
        counts = [max(1, round(f * k)) for f in fractions]
        if sum(counts) >= k:
            continue
        err = max(abs(c / k - f) for c, f in zip(counts, fractions))
        if err <= tolerance + 1e-9:
            return k, counts
        plans.append((err, k, counts))
    if not plans:
        raise ValueError(f"no fold plan for fractions {fractions} within {max_folds} folds")
    _, k, counts = min(plans, key=lambda plan: (plan[0], plan[1]))
    return k, counts


def _carve(pool: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.Index]:
    """Row index per carved split: whole folds of a seeded ``StratifiedGroupKFold`` over ``pool``
    (grouped by patient, stratified by label), about ``fractions[split]`` of each class."""
    from sklearn.model_selection import StratifiedGroupKFold

    pool = _carvable(pool)
    if pool.empty or not fractions:
        return {}
    # No more folds than the rarest class has patients: the greedy puts each patient in the fold
    # holding least of its class, so every fold (and every carved split) gets one of each class.
    max_folds = min(MAX_FOLDS, int(pool.groupby("label")["patient_id"].nunique().min()))
    k, n_folds = fold_plan(list(fractions.values()), max_folds)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.empty(len(pool), dtype=int)
    for i, (_, rows) in enumerate(sgkf.split(np.zeros(len(pool)), pool["label"], pool["patient_id"])):
        fold[rows] = i
    carved, first = {}, 0
    for split, n in zip(fractions, n_folds):
        carved[split] = pool.index[(fold >= first) & (fold < first + n)]
        first += n
    return carved


def assign_splits(
    manifest: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    min_val_images: int = 100,
    seed: int = 42,
) -> pd.DataFrame:
    """Return a copy of ``manifest`` with final ``split`` and ``split_origin`` columns.

    - no ``test`` rows: carve test from train (``test_fraction`` of train per class);
    - ``val`` rows fewer than ``min_val_images``: fold them into train and carve val from it.
    Fractions are of the train pool before carving, matched in whole folds of
    scikit-learn's ``StratifiedGroupKFold`` (see :func:`fold_plan`). Every patient id keeps all
    its images in one split, whatever their labels. Only rows with a known label and patient id
    take part; others keep their folder split so validation can report them where they were found.
    """
    out = manifest.copy()
    out["split"] = out["folder_split"]
    out["split_origin"] = "folder"
    labelled = out["label"].isin(LABELS)

    n_val = int(((out["folder_split"] == "val") & labelled).sum())
    if n_val < min_val_images:
        small_val = (out["folder_split"] == "val") & labelled
        out.loc[small_val, "split"] = "train"
        out.loc[small_val, "split_origin"] = "folded"

    fractions: dict[str, float] = {}
    if not ((out["folder_split"] == "test") & labelled).any():
        fractions["test"] = test_fraction
    if not (out["split"] == "val").any() or n_val < min_val_images:
        fractions["val"] = val_fraction
    pool = out[(out["split"] == "train") & labelled & out["patient_id"].notna()]
    for split, rows in _carve(pool, fractions, seed).items():
        out.loc[rows, ["split", "split_origin"]] = [split, "carved"]
    assert_no_carved_overlap(out)
    return out


def patient_overlaps(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows whose patient id also appears in another split, with the other splits listed."""
    labelled = manifest[manifest["patient_id"].notna()]
    splits_per_patient = labelled.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    multi = splits_per_patient[splits_per_patient.map(len) > 1]
    rows = labelled[labelled["patient_id"].isin(multi.index)].copy()
    rows["patient_splits"] = rows["patient_id"].map(lambda p: ",".join(multi[p]))
    return rows


def carved_overlap_mask(manifest: pd.DataFrame) -> pd.Series:
    """True for rows whose patient sits in two splits carved from the same folder.

    That overlap is the pipeline's own doing (an error); overlap between folders the user gave
    is only inferred from file names and is reported as a warning instead.
    """
    key = manifest["folder_split"].where(manifest["split_origin"] == "folder", "train")
    frame = pd.DataFrame({"pid": manifest["patient_id"], "src": key, "split": manifest["split"]})
    n_splits = frame.groupby(["pid", "src"])["split"].transform("nunique")
    return (n_splits > 1).fillna(False).astype(bool)


def assert_no_carved_overlap(manifest: pd.DataFrame) -> None:
    """Raise :class:`PatientLeakError` if a carved split shares a patient with its source."""
    mask = carved_overlap_mask(manifest)
    if mask.any():
        bad = sorted(manifest.loc[mask, "patient_id"].astype(str).unique())[:10]
        raise PatientLeakError(f"patients in two carved splits: {', '.join(bad)}")


def scan_and_split(data_dir: Path, data_cfg: DataConfig, seed: int) -> ScanResult:
    """Scan ``data_dir`` and carve val/test splits by patient where the folders lack them."""
    scan = scan_dataset(Path(data_dir), workers=data_cfg.scan_workers)
    manifest = assign_splits(
        scan.manifest,
        val_fraction=data_cfg.val_fraction,
        test_fraction=data_cfg.test_fraction,
        min_val_images=data_cfg.min_val_images,
        seed=seed,
    )
    return replace(scan, manifest=manifest)
