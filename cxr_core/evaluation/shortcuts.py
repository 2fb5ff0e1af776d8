"""Shortcut audits: how well a property that is not the lungs alone separates the classes.

Two kinds: image size (:func:`shortcut_auc`, from the manifest's width and height) and
per-image scores measured with plain image processing while the scan decodes each file
(:func:`image_scores`): burned-in annotations (text, side markers, ECG electrodes) in the
top corners and along the sides, and the field of view (how much of the image lies below
the lung fields). :func:`score_aucs` says, per split, how well each score alone separates
NORMAL from PNEUMONIA. The regions are shared with the masking option of the model
(:func:`cxr_core.training.model.build_cnn`), so what is audited is what can be masked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from cxr_core.data.labels import LABELS, POSITIVE

# Scores are measured on the image resized to this square: the geometry the model sees
# (training resizes to a square too), at the resolution the thresholds below were tuned on
# (the real train split, benchmarks/shortcuts.py).
SCORE_SIZE = 224
# Regions as (first row, last row, first column, last column), fractions of the side.
# Top corners: where the issue measured burned-in text (top 15% rows, outer 20% columns).
CORNER_REGIONS = ((0.0, 0.15, 0.0, 0.20), (0.0, 0.15, 0.80, 1.0))
# Side strips below the corners: the laterality marker ("R") of most train NORMAL images
# sits at mid-height on the left edge, outside the lung fields (which start ~13% in).
SIDE_REGIONS = ((0.15, 1.0, 0.0, 0.10), (0.15, 1.0, 0.90, 1.0))
SCORE_COLUMNS = ("annotation_top_px", "annotation_side_px", "abdomen_fraction")
SCORE_DESCRIPTIONS = {
    "annotation_top_px": "burned-in text or markers in the top corners (pixels at 224 px)",
    "annotation_side_px": "burned-in text or markers along the side edges (pixels at 224 px)",
    "abdomen_fraction": "share of the image height below the lung fields (field of view)",
}
# Annotation detector (tuned by eye and by ROC-AUC on the real train split): a pixel is an
# annotation pixel when it stands out of a 7x7 grey opening by more than 50 grey levels and
# is at least 100 bright, in a compact connected blob (letters and electrodes, not the long
# thin edges of bones and skin): 6+ pixels, bounding box 3-24 px a side, 20%+ filled.
_OPENING = 7
_CONTRAST = 50
_MIN_LEVEL = 100
_BLOB_PIXELS = 6
_BLOB_EXTENT = (3, 24)
_BLOB_FILL = 0.2
_MIN_PER_CLASS = 5  # fewer images of a class in a split: no AUC for it


def region_slices(region: tuple[float, float, float, float], size: int) -> tuple[slice, slice]:
    """Row and column slices of a fractional region in a ``size`` x ``size`` image."""
    r0, r1, c0, c1 = (int(round(f * size)) for f in region)
    return slice(r0, r1), slice(c0, c1)


def annotation_mask(gray: np.ndarray, regions: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """Boolean mask of the annotation pixels of a square uint8 image inside ``regions``."""
    found = np.zeros(gray.shape, dtype=bool)
    for region in regions:
        rows, cols = region_slices(region, gray.shape[0])
        patch = np.ascontiguousarray(gray[rows, cols], dtype=np.uint8)
        if patch.size == 0:
            continue
        # A white top-hat: what a 7x7 opening removes is brighter than its surroundings and
        # thinner than 7 px: letter strokes, not the broad brightness of bone or abdomen.
        # Only the regions are filtered: the whole image would cost 4x the time.
        opened = ndimage.grey_opening(patch, size=(_OPENING, _OPENING))
        tophat = patch.astype(np.int16) - opened
        candidate = (tophat > _CONTRAST) & (patch >= _MIN_LEVEL)
        found[rows, cols] = _compact_blobs(candidate)
    return found


def _compact_blobs(candidate: np.ndarray) -> np.ndarray:
    """The connected blobs of ``candidate`` shaped like glyphs or electrodes."""
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3)))
    if not n:
        return candidate
    keep = np.zeros(n + 1, dtype=bool)
    sizes = ndimage.sum_labels(candidate, labels, np.arange(1, n + 1))
    lo, hi = _BLOB_EXTENT
    for i, (box, size) in enumerate(zip(ndimage.find_objects(labels), sizes), start=1):
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        keep[i] = (size >= _BLOB_PIXELS and lo <= min(h, w) and max(h, w) <= hi
                   and size / (h * w) >= _BLOB_FILL)
    return keep[labels]


def abdomen_fraction(gray: np.ndarray) -> float:
    """Share of the image height below the lowest row of the lung fields.

    Per row, the 10th-percentile grey level of the central 60% of columns: in rows through
    the lungs it is aerated lung (dark, even when one lung is opaque), below the diaphragm
    it is soft tissue (bright). The lung fields end at the lowest row (below 30% of the
    height) still darker than halfway between the two levels. 0 when no such rise shows.
    """
    img = gray.astype(np.float32)
    h, w = img.shape
    central = img[:, int(0.2 * w):int(0.8 * w)]
    k = max(1, central.shape[1] // 10)
    dark = np.partition(central, k, axis=1)[:, k]  # the 10th percentile, without sorting
    dark = ndimage.uniform_filter1d(dark, 7)
    lung = float(np.median(dark[int(0.3 * h):int(0.6 * h)]))
    abdomen = float(dark[int(0.7 * h):].max())
    if abdomen - lung < 10:
        return 0.0
    rows = np.flatnonzero(dark < (lung + abdomen) / 2)
    rows = rows[rows >= int(0.3 * h)]
    bottom = int(rows.max()) + 1 if len(rows) else int(0.3 * h)
    return (h - bottom) / h


def image_scores(gray: np.ndarray) -> dict[str, float]:
    """The shortcut scores (:data:`SCORE_COLUMNS`) of a square uint8 grayscale image of
    :data:`SCORE_SIZE` px (:func:`score_image` makes one from any Pillow image)."""
    return {
        "annotation_top_px": float(annotation_mask(gray, CORNER_REGIONS).sum()),
        "annotation_side_px": float(annotation_mask(gray, SIDE_REGIONS).sum()),
        "abdomen_fraction": round(abdomen_fraction(gray), 4),
    }


def to_score_gray(image: Any) -> np.ndarray:
    """A decoded Pillow image -> uint8 grayscale, :data:`SCORE_SIZE` px square, as the
    training pipeline sees it (16-bit keeps its top byte, colour becomes luma)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        arr = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        image = Image.fromarray(arr)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    elif image.mode != "L":
        image = image.convert("RGB").convert("L") if image.mode == "PA" else image.convert("L")
    square = image.resize((SCORE_SIZE, SCORE_SIZE), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(square, dtype=np.uint8)


def score_image(image: Any) -> dict[str, float | None]:
    """:func:`image_scores` of a decoded Pillow image or uint8 array; None values when the
    image cannot be scored (the file is still readable: scores never fail a scan)."""
    try:
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(image)
        return image_scores(to_score_gray(image))
    except (ValueError, TypeError, OSError):
        return dict.fromkeys(SCORE_COLUMNS)


def _oriented_auc(y: np.ndarray, score: np.ndarray) -> tuple[float, str]:
    """ROC-AUC of ``score`` for PNEUMONIA, turned so that 0.5 means no information and 1.0
    perfect separation, with the class whose images score higher."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(y, score))
    if auc == 0.5:
        return auc, "neither"
    return (auc, LABELS[1]) if auc > 0.5 else (1.0 - auc, LABELS[0])


def score_aucs(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """For each score column present and each split: how well the score alone separates
    the classes (``auc``, oriented: 0.5 = no information), the class scoring higher, and
    the mean score per class. Splits with fewer than 5 scored images of a class get
    ``auc`` None."""
    ok = manifest[manifest["readable"].astype(bool) & manifest["label"].isin(LABELS)]
    rows: list[dict[str, Any]] = []
    for column in [c for c in SCORE_COLUMNS if c in ok]:
        for split in [s for s in ("train", "val", "test") if (ok["split"] == s).any()]:
            part = ok[(ok["split"] == split) & ok[column].notna()]
            y = (part["label"] == POSITIVE).to_numpy(int)
            score = part[column].to_numpy(float)
            row: dict[str, Any] = {"score": column, "split": split, "n": len(part),
                                   "auc": None, "higher_in": None}
            for label in LABELS:
                values = score[part["label"].to_numpy() == label]
                row[f"mean_{label}"] = float(values.mean()) if len(values) else None
            if min(y.sum(), len(y) - y.sum()) >= _MIN_PER_CLASS:
                row["auc"], row["higher_in"] = _oriented_auc(y, score)
            rows.append(row)
    return rows


def shortcut_auc(manifest: pd.DataFrame, seed: int = 0) -> float | None:
    """Cross-validated ROC-AUC of a logistic regression on image size alone.

    A high value means width/height/aspect give the class away: a model can learn the
    scanner or the resize history instead of the lungs. None when there is too little data.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ok = manifest[manifest["readable"] & manifest["label"].isin(LABELS)]
    y = (ok["label"] == POSITIVE).to_numpy(int)
    if len(ok) < 20 or min(y.sum(), len(y) - y.sum()) < 5:
        return None
    w = ok["width"].to_numpy(float)
    h = ok["height"].to_numpy(float)
    x = np.column_stack([np.log(w), np.log(h), np.log(w / h)])
    if np.allclose(x.std(axis=0), 0):
        return 0.5  # every image the same size: size carries no information
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))
