"""Robustness report: the test split scored again under realistic acquisition changes.

Models are judged on images acquired differently from the training data; carved test
splits hide that. Each perturbation mimics one such difference (exposure, contrast, gamma,
blur, noise, JPEG quality, resolution, small rotations and crops) and is applied to the
model-resolution images, so the report costs one extra inference pass per perturbation.
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


PERTURBATIONS: dict[str, Perturbation] = {
    "exposure_dark": _exposure(-30.0),
    "exposure_bright": _exposure(30.0),
    "contrast_low": _contrast(0.7),
    "contrast_high": _contrast(1.3),
    "gamma_0.7": _gamma(0.7),
    "gamma_1.4": _gamma(1.4),
    "blur": _blur(1.0),
    "noise": _noise(8.0),
    "jpeg_q30": _jpeg(30),
    "half_resolution": _resolution(0.5),
    "rotate_7": _rotation(7.0),
    "crop_90": _crop(0.9),
}


@dataclass
class RobustnessReport:
    """Metrics of the clean test images and of each perturbed copy, at the same threshold."""

    clean: dict[str, float]
    shifted: dict[str, dict[str, float]] = field(default_factory=dict)

    def worst(self, metric: str) -> float:
        """The lowest value of ``metric`` over the perturbations (nan-safe)."""
        values = [m[metric] for m in self.shifted.values() if np.isfinite(m.get(metric, np.nan))]
        return float(min(values)) if values else float("nan")

    def flat(self) -> dict[str, float]:
        """MLflow metrics: robust_<shift>_<metric> and robust_worst_<metric>."""
        out = {f"robust_{name}_{k}": v for name, m in self.shifted.items() for k, v in m.items()}
        for k in ("accuracy", "recall", "specificity", "roc_auc"):
            out[f"robust_worst_{k}"] = self.worst(k)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per condition (clean first), for a CSV or table artifact."""
        rows = [{"condition": "clean", **self.clean}]
        rows += [{"condition": name, **m} for name, m in self.shifted.items()]
        return rows


def robustness_report(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                      y_true: np.ndarray, threshold: float, seed: int = 0,
                      perturbations: dict[str, Perturbation] | None = None) -> RobustnessReport:
    """Score ``images`` (raw 0-255, [N, S, S, 1]) clean and under each perturbation with
    ``predict`` (images -> probabilities) at ``threshold``."""
    from cxr_core.evaluation.metrics import point_metrics

    keep = ("accuracy", "recall", "specificity", "roc_auc")
    y_true = np.asarray(y_true).astype(int)
    images = np.asarray(images, dtype=np.float32)
    clean = point_metrics(y_true, predict(images), threshold)
    report = RobustnessReport({k: clean[k] for k in keep})
    for i, (name, perturb) in enumerate((perturbations or PERTURBATIONS).items()):
        shifted = perturb(images, np.random.default_rng([seed, i])).astype(np.float32)
        metrics = point_metrics(y_true, predict(shifted), threshold)
        report.shifted[name] = {k: metrics[k] for k in keep}
    return report


def shifted_copy(images: np.ndarray, seed: int = 0,
                 perturbations: dict[str, Perturbation] | None = None) -> np.ndarray:
    """A copy of ``images`` (raw 0-255, [N, S, S, 1]) where each image went through one
    perturbation drawn at random (fixed by ``seed``): one extra set the size of the
    original that covers every shift, cheap enough to score after every epoch."""
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
    ``robustness.csv`` and returns the robust_* metrics."""
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
