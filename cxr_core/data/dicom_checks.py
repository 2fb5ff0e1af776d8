"""Validation checks read from DICOM headers: one great_expectations expectation per fact,
each with its severity, reported per file (see cxr_core.data.validate).

| check | expected | severity | why |
| --- | --- | --- | --- |
| dicom_modality | CR or DX | error | anything else (CT, MR, US, OT) is not a projection radiograph |
| dicom_body_part | CHEST | warning | often missing or free text at real sites |
| dicom_view_position | AP or PA | warning | laterals and others are outside the intended use |
| dicom_photometric | MONOCHROME1/2 | warning | colour DICOM is usually a secondary capture (converted to gray) |
| dicom_pixel_spacing | present | warning | without it sizes cannot be compared across detectors |
"""

from __future__ import annotations

from typing import Any

import pandas as pd

MISSING = "(missing)"
MODALITIES = ("CR", "DX")
BODY_PARTS = ("CHEST",)
VIEW_POSITIONS = ("AP", "PA")
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
_CHECKED = {  # check -> (frame column holding the value, the values that pass)
    "dicom_modality": ("modality", MODALITIES),
    "dicom_body_part": ("body_part", BODY_PARTS),
    "dicom_view_position": ("view_position", VIEW_POSITIONS),
    "dicom_photometric": ("photometric", PHOTOMETRIC),
    "dicom_pixel_spacing": ("pixel_spacing", ("present",)),
}


def dicom_frame(manifest: pd.DataFrame) -> pd.DataFrame | None:
    """One row per readable DICOM file with the header values checked (missing values spelt
    out, so an absent tag is reported rather than skipped as null); None without DICOM."""
    if "dicom_modality" not in manifest.columns:
        return None
    rows = manifest[(manifest["format"] == "DICOM") & manifest["readable"].astype(bool)]
    if rows.empty:
        return None

    def text(col: str) -> pd.Series:
        return rows[col].astype("string").fillna(MISSING).astype(str).to_numpy()

    return pd.DataFrame({
        "path": rows["path"].to_numpy(),
        "modality": text("dicom_modality"),
        "body_part": text("dicom_body_part"),
        "view_position": text("dicom_view_position"),
        "photometric": text("dicom_photometric"),
        "pixel_spacing": rows["dicom_pixel_spacing"].notna().map(
            {True: "present", False: MISSING}).to_numpy(),
    })


def dicom_expectations(error: str, warning: str) -> list[Any]:
    """The header suite (severities passed in by the validator that owns their names)."""
    import great_expectations.expectations as gxe

    def check(name: str, severity: str, desc: str) -> Any:
        column, allowed = _CHECKED[name]
        return gxe.ExpectColumnValuesToBeInSet(
            column=column, value_set=list(allowed),
            meta={"check": name, "severity": severity, "description": desc})

    return [
        check("dicom_modality", error,
              "DICOM modality is CR or DX (a projection radiograph)"),
        check("dicom_body_part", warning,
              "DICOM body part examined is CHEST"),
        check("dicom_view_position", warning,
              "DICOM view position is AP or PA (the model is for frontal views)"),
        check("dicom_photometric", warning,
              "DICOM photometric interpretation is MONOCHROME1 or MONOCHROME2 "
              "(colour images are converted to gray)"),
        check("dicom_pixel_spacing", warning,
              "DICOM pixel spacing (or imager pixel spacing) is present"),
    ]


def dicom_observed(checks: list[Any], frame: pd.DataFrame) -> None:
    """Say which values broke each failed header check (e.g. ``CT: 2, (missing): 1``)."""
    for c in checks:
        if c.name not in _CHECKED or c.success:
            continue
        column, allowed = _CHECKED[c.name]
        bad = frame.loc[~frame[column].isin(allowed), column].value_counts()
        values = ", ".join(f"{v}: {n}" for v, n in bad.items())
        c.observed = f"{int(bad.sum())} of {len(frame)} DICOM files; values {values}"
