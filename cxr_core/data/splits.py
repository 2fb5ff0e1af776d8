"""Patient-grouped, class-stratified splits carved from train.

The official ``val`` folder has 16 images and ``test`` may be absent; a model chosen on
either would be chosen on noise or not at all. Carving keeps every patient's images in one
split (no patient leaks between train and the images that judge it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_core.config import DataConfig
from cxr_core.data.labels import LABELS
from cxr_core.data.manifest import ScanResult, scan_dataset


class PatientLeakError(AssertionError):
    """Carving produced a patient in two splits (a bug, never expected)."""


def _carve(pool: pd.DataFrame, fraction: float, rng: np.random.Generator) -> pd.Index:
    """Row index of a patient-grouped sample of ``pool`` holding about ``fraction`` per class."""
    chosen: list[pd.Index] = []
    for label in LABELS:
        rows = pool[pool["label"] == label]
        if rows.empty:
            continue
        sizes = rows.groupby("patient_id").size()
        patients = np.array(sorted(sizes.index))
        if len(patients) < 3:  # too few patients to give one away and keep train usable
            continue
        target = fraction * len(rows)
        taken, count = [], 0
        for pid in rng.permutation(patients):
            if count >= target or len(taken) >= len(patients) - 1:
                break
            # Skip a patient that would overshoot by more than half its images, unless
            # nothing has been taken yet (a carved split needs at least one patient).
            if taken and count + sizes[pid] - target > sizes[pid] / 2:
                continue
            taken.append(pid)
            count += int(sizes[pid])
        chosen.append(rows.index[rows["patient_id"].isin(taken)])
    return chosen[0].append(chosen[1:]) if chosen else pd.Index([])


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
    Fractions are of the train pool before carving. Only rows with a known label take part;
    others keep their folder split so validation can report them where they were found.
    """
    out = manifest.copy()
    out["split"] = out["folder_split"]
    out["split_origin"] = "folder"
    rng = np.random.default_rng(seed)
    labelled = out["label"].isin(LABELS)

    n_val = int(((out["folder_split"] == "val") & labelled).sum())
    if n_val < min_val_images:
        small_val = (out["folder_split"] == "val") & labelled
        out.loc[small_val, "split"] = "train"
        out.loc[small_val, "split_origin"] = "folded"
    pool_size = {lab: int(((out["split"] == "train") & (out["label"] == lab)).sum()) for lab in LABELS}

    def pool() -> pd.DataFrame:
        return out[(out["split"] == "train") & labelled]

    if not ((out["folder_split"] == "test") & labelled).any():
        idx = _carve(pool(), test_fraction, rng)
        out.loc[idx, ["split", "split_origin"]] = ["test", "carved"]
    if not (out["split"] == "val").any() or n_val < min_val_images:
        # Fraction relative to the pool before the test carve, so val and test sizes match.
        remaining = pool()
        per_class = [
            val_fraction * pool_size[lab] / max(1, int((remaining["label"] == lab).sum()))
            for lab in LABELS
        ]
        idx = _carve(remaining, min(0.9, max(per_class)), rng)
        out.loc[idx, ["split", "split_origin"]] = ["val", "carved"]
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
