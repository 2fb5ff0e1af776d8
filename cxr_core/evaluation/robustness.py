"""Robustness report: the test split scored again under realistic acquisition changes.

Models are judged on images acquired differently from the training data; carved test
splits hide that. Each perturbation mimics one such difference and is applied to the
model-resolution images, so the report costs one extra inference pass per perturbation.

The shifts come in two families. ``seen``: transforms of the kind the training pipeline
augments with (exposure, contrast, gamma, blur, noise, resolution loss, rotation, crop), so
a good score there partly measures the augmentation itself. ``unseen``: changes nothing in
training produces (JPEG compression, edge enhancement, an exposure gradient, grid lines).
Only unseen shifts pick models (the ``val_shift_*`` metrics), and the report gives the
worst case per family beside the worst over all.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

Perturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 255.0)


def _gamma(g: float) -> Perturbation:
    return lambda x, rng: _clip(255.0 * (x / 255.0) ** g)


def _contrast(c: float) -> Perturbation:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return _clip(mean + c * (x - mean))
    return apply


def _exposure(delta: float) -> Perturbation:
    return lambda x, rng: _clip(x + delta)


def _blur(sigma: float) -> Perturbation:
    return lambda x, rng: ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0))


def _noise(std: float) -> Perturbation:
    return lambda x, rng: _clip(x + rng.normal(0.0, std, x.shape))


def _sharpen(amount: float, sigma: float = 1.0) -> Perturbation:
    # Unsharp masking: the edge enhancement many digital radiography systems apply.
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _clip(x + amount * (x - ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0))))
    return apply


def _exposure_gradient(delta: float) -> Perturbation:
    # A left-to-right ramp of -delta..+delta grey levels: the anode heel effect, or a
    # detector exposed unevenly. Training only ever changes exposure uniformly.
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ramp = np.linspace(-delta, delta, x.shape[2], dtype=np.float32)
        return _clip(x + ramp[None, None, :, None])
    return apply


def _grid_lines(amplitude: float, period: float) -> Perturbation:
    # Faint vertical stripes of a stationary anti-scatter grid.
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        stripes = amplitude * np.sin(2 * np.pi * np.arange(x.shape[2]) / period)
        return _clip(x + stripes[None, None, :, None].astype(np.float32))
    return apply


def _per_image(fn: Callable[[Image.Image], Image.Image]) -> Perturbation:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty_like(x)
        for i, img in enumerate(x[..., 0]):
            pil = Image.fromarray(np.round(img).astype(np.uint8), mode="L")
            out[i, ..., 0] = np.asarray(fn(pil), dtype=np.float32)
        return out
    return apply


def _jpeg(quality: int) -> Perturbation:
    def fn(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return _per_image(fn)


def _resolution(factor: float) -> Perturbation:
    def fn(img: Image.Image) -> Image.Image:
        w, h = img.size
        small = img.resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BILINEAR)
        return small.resize((w, h), Image.BILINEAR)
    return _per_image(fn)


def _rotation(degrees: float) -> Perturbation:
    return _per_image(lambda img: img.rotate(degrees, resample=Image.BILINEAR, fillcolor=0))


def _crop(keep: float) -> Perturbation:
    def fn(img: Image.Image) -> Image.Image:
        w, h = img.size
        dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
        return img.crop((dw, dh, w - dw, h - dh)).resize((w, h), Image.BILINEAR)
    return _per_image(fn)


# What training augments with (cxr_core.data.inputs.photometric: gamma, blur, noise;
# cxr_core.training.model.augmentation_layers: rotation, zoom, shift, contrast, brightness;
# cxr_core.data.balance offline variants: the same geometry and intensity changes), whether or
# not a given config switches each one on.
SEEN_SHIFTS: dict[str, Perturbation] = {
    "exposure_dark": _exposure(-30.0),      # RandomBrightness, offline brightness
    "exposure_bright": _exposure(30.0),
    "contrast_low": _contrast(0.7),         # RandomContrast, offline contrast
    "contrast_high": _contrast(1.3),
    "gamma_0.7": _gamma(0.7),               # photometric and offline gamma
    "gamma_1.4": _gamma(1.4),
    "blur": _blur(1.0),                     # photometric blur
    "noise": _noise(8.0),                   # photometric noise
    # Pillow filters before it subsamples, so halving and restoring the resolution is a
    # low-pass filter: the blur family.
    "half_resolution": _resolution(0.5),
    "rotate_7": _rotation(7.0),             # RandomRotation, offline rotation
    "crop_90": _crop(0.9),                  # RandomZoom, offline zoom (and the TTA view)
}
# Nothing in training produces these.
UNSEEN_SHIFTS: dict[str, Perturbation] = {
    "jpeg_q30": _jpeg(30),
    "sharpen": _sharpen(1.0),
    "exposure_gradient": _exposure_gradient(40.0),
    "grid_lines": _grid_lines(6.0, 2.5),
}
PERTURBATIONS: dict[str, Perturbation] = {**SEEN_SHIFTS, **UNSEEN_SHIFTS}
SHIFT_FAMILY: dict[str, str] = {**{name: "seen" for name in SEEN_SHIFTS},
                                **{name: "unseen" for name in UNSEEN_SHIFTS}}
FAMILIES = ("seen", "unseen")
REPORTED_METRICS = ("accuracy", "recall", "specificity", "roc_auc")


@dataclass
class RobustnessReport:
    """Metrics of the clean test images and of each perturbed copy, at the same threshold,
    with each shift's family (``seen`` or ``unseen`` by training)."""

    clean: dict[str, float]
    shifted: dict[str, dict[str, float]] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)

    def worst(self, metric: str, family: str | None = None) -> float:
        """The lowest value of ``metric`` over the perturbations, or over those of one
        ``family`` (nan-safe; nan when there are none)."""
        values = [m[metric] for name, m in self.shifted.items()
                  if (family is None or self.family.get(name) == family)
                  and np.isfinite(m.get(metric, np.nan))]
        return float(min(values)) if values else float("nan")

    def flat(self) -> dict[str, float]:
        """MLflow metrics: robust_<shift>_<metric>, robust_worst_<metric> (over every shift:
        what the gate reads) and robust_seen_worst_<metric> / robust_unseen_worst_<metric>."""
        out = {f"robust_{name}_{k}": v for name, m in self.shifted.items() for k, v in m.items()}
        for k in REPORTED_METRICS:
            out[f"robust_worst_{k}"] = self.worst(k)
            for family in FAMILIES:
                out[f"robust_{family}_worst_{k}"] = self.worst(k, family)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per condition (clean first, family "none"), for a CSV or table artifact."""
        rows = [{"condition": "clean", "family": "none", **self.clean}]
        rows += [{"condition": name, "family": self.family.get(name, "unknown"), **m}
                 for name, m in self.shifted.items()]
        return rows


def robustness_report(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                      y_true: np.ndarray, threshold: float, seed: int = 0,
                      perturbations: dict[str, Perturbation] | None = None,
                      families: dict[str, str] | None = None) -> RobustnessReport:
    """Score ``images`` (raw 0-255, [N, S, S, 1]) clean and under each perturbation with
    ``predict`` (images -> probabilities) at ``threshold``. ``families`` names each
    perturbation's family (default ``SHIFT_FAMILY``; a name it lacks is "unknown")."""
    from cxr_core.evaluation.metrics import point_metrics

    y_true = np.asarray(y_true).astype(int)
    images = np.asarray(images, dtype=np.float32)
    perturbations = perturbations or PERTURBATIONS
    families = SHIFT_FAMILY if families is None else families
    clean = point_metrics(y_true, predict(images), threshold)
    report = RobustnessReport({k: clean[k] for k in REPORTED_METRICS},
                              family={name: families.get(name, "unknown") for name in perturbations})
    for i, (name, perturb) in enumerate(perturbations.items()):
        shifted = perturb(images, np.random.default_rng([seed, i])).astype(np.float32)
        metrics = point_metrics(y_true, predict(shifted), threshold)
        report.shifted[name] = {k: metrics[k] for k in REPORTED_METRICS}
    return report


def shifted_copy(images: np.ndarray, seed: int = 0,
                 perturbations: dict[str, Perturbation] | None = None) -> np.ndarray:
    """A copy of ``images`` (raw 0-255, [N, S, S, 1]) where each image went through one
    perturbation drawn at random (fixed by ``seed``): one extra set the size of the
    original that covers every shift, cheap enough to score after every epoch. Model
    selection passes ``UNSEEN_SHIFTS``: a shift the training augments with would reward
    the augmentation rather than robustness."""
    perturbations = perturbations or PERTURBATIONS
    images = np.asarray(images, dtype=np.float32)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(perturbations), len(images))
    out = np.empty_like(images)
    for i, perturb in enumerate(perturbations.values()):
        idx = np.flatnonzero(which == i)
        if len(idx):
            out[idx] = perturb(images[idx], np.random.default_rng([seed, i]))
    return np.round(out)


SHIFT_METRICS = ("val_shift_auc", "val_shift_accuracy")


def shifted_validation_callback(images: np.ndarray, labels: np.ndarray,
                                batch_size: int = 128) -> Any:
    """A Keras callback that scores a shifted copy of the validation images after every
    epoch and adds ``val_shift_auc`` and ``val_shift_accuracy`` (at 0.5) to the epoch's logs,
    so they can be tuner objectives, early-stopping monitors and logged curves.

    It must come before any callback that reads those keys (they see the same logs dict).
    """
    import keras
    from sklearn.metrics import roc_auc_score

    x = np.asarray(images, dtype=np.uint8)  # a quarter of the memory of float32
    y = np.asarray(labels).astype(int).ravel()
    both = len(np.unique(y)) == 2

    class ShiftedValidation(keras.callbacks.Callback):
        images, labels = x, y  # what it scores (read by tests and reports)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs is None:
                return
            p = np.concatenate([
                np.asarray(self.model(x[i:i + batch_size].astype(np.float32), training=False))
                .ravel() for i in range(0, len(x), batch_size)]) if len(x) else np.zeros(0)
            logs["val_shift_auc"] = float(roc_auc_score(y, p)) if both else float("nan")
            logs["val_shift_accuracy"] = float(((p >= 0.5).astype(int) == y).mean()) \
                if len(y) else float("nan")

    return ShiftedValidation()


def score_under_shifts(model: Any, threshold: float, preds: pd.DataFrame, image_size: int,
                       out_dir: Path, seed: int, max_images: int = 1000) -> dict[str, float]:
    """Score (up to ``max_images`` of) the test split again under acquisition shifts; writes
    ``robustness.csv`` (one row per condition, with its family: seen/unseen by training) and
    returns the robust_* metrics."""
    from cxr_core.data.inputs import load_images

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(preds), size=min(len(preds), max_images), replace=False))
    sample = preds.iloc[pick]
    images = load_images(sample["path"].tolist(), image_size)
    report = robustness_report(
        lambda x: np.asarray(model.predict(x, batch_size=128, verbose=0), np.float64).ravel(),
        images, sample["label"].to_numpy(), threshold, seed=seed)
    pd.DataFrame(report.rows()).to_csv(Path(out_dir) / "robustness.csv", index=False)
    return report.flat()
