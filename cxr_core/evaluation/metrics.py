"""Evaluation on held-out images: point metrics at the operating threshold with percentile
bootstrap confidence intervals and calibration (figures: :mod:`cxr_core.evaluation.figures`).

Labels are 0 = NORMAL, 1 = PNEUMONIA; an image is predicted PNEUMONIA when ``p >= threshold``
(the rule ``choose_threshold`` uses). Undefined metrics (precision without positive
predictions, AUC on one class, ...) are ``nan``, never an exception, so a small or skewed
test set still yields a complete report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("accuracy", "recall", "specificity", "precision", "f1", "balanced_accuracy",
           "roc_auc", "pr_auc", "brier", "ece")
CONFUSION_KEYS = ("tn", "fp", "fn", "tp")
ECE_BINS = 10
# Bootstrap resamples are processed in chunks of about this many drawn indices, so memory
# stays bounded (tens of MB) whatever the test set size.
_CHUNK_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float


@dataclass
class Evaluation:
    """Metrics of one model on one labelled set at one threshold."""

    threshold: float
    n: int
    n_positive: int
    n_negative: int
    metrics: dict[str, Interval]
    confusion: dict[str, int]
    confidence: float = 0.95
    n_bootstrap: int = 1000
    seed: int = 0

    def point(self) -> dict[str, float]:
        """Metric name -> point value."""
        return {name: iv.value for name, iv in self.metrics.items()}

    def flat(self) -> dict[str, float]:
        """Flat numeric dict for MLflow ``log_metrics``: ``recall``, ``recall_ci_low``,
        ``recall_ci_high``, ... plus the confusion counts. Undefined values stay ``nan``."""
        out: dict[str, float] = {}
        for name, iv in self.metrics.items():
            out[name] = float(iv.value)
            out[f"{name}_ci_low"] = float(iv.low)
            out[f"{name}_ci_high"] = float(iv.high)
        out.update({k: float(v) for k, v in self.confusion.items()})
        return out

    def to_dict(self) -> dict:
        """JSON-able dict (``nan`` becomes ``None``: strict JSON has no NaN)."""
        return {
            "threshold": _json_float(self.threshold),
            "n": self.n,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "metrics": {name: {"value": _json_float(iv.value), "low": _json_float(iv.low),
                               "high": _json_float(iv.high)} for name, iv in self.metrics.items()},
            "confusion": {k: int(v) for k, v in self.confusion.items()},
        }


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


# --------------------------------------------------------------------------- core metrics


def _check_inputs(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true ({y.size}) and y_prob ({p.size}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (NORMAL) and 1 (PNEUMONIA)")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("y_prob must be finite probabilities in [0, 1]")
    return y.astype(np.int64), p


def _ece_bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Equal-width bins on [0, 1]; p == 1 belongs to the last bin rather than an extra one.
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


class _Prepared:
    """Per-image quantities that do not change between bootstrap resamples, so a resample
    is only a matrix of drawn indices and every metric is a few ``bincount`` calls."""

    def __init__(self, y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int = ECE_BINS):
        self.n = y.size
        self.y = y
        self.p = p
        pred = (p >= threshold).astype(np.int64)
        self.cell = 2 * y + pred  # 0 tn, 1 fp, 2 fn, 3 tp
        # Rank of each distinct score, highest first: ties share a group, which is what
        # makes the rank-based AUC and the step-wise average precision tie-correct.
        uniq = np.unique(p)
        self.n_groups = max(uniq.size, 1)
        self.group = uniq.size - 1 - np.searchsorted(uniq, p)
        self.sq_err = (p - y) ** 2
        self.n_bins = n_bins
        self.bin = _ece_bins(p, n_bins)

    def metrics(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each row of ``idx`` (B x n indices of a resample)."""
        b, n = idx.shape
        rows = np.arange(b)[:, None]
        counts = np.bincount((rows * 4 + self.cell[idx]).ravel(), minlength=b * 4).reshape(b, 4)
        tn, fp, fn, tp = (counts[:, i].astype(np.float64) for i in range(4))
        yi = self.y[idx]

        g = self.n_groups
        gi = (rows * g + self.group[idx]).ravel()
        pos = np.bincount(gi, weights=yi.ravel(), minlength=b * g).reshape(b, g)
        neg = np.bincount(gi, minlength=b * g).reshape(b, g) - pos
        cum_tp = np.cumsum(pos, axis=1)
        cum_fp = np.cumsum(neg, axis=1)
        n_pos, n_neg = cum_tp[:, -1], cum_fp[:, -1]

        nb = self.n_bins
        bi = (rows * nb + self.bin[idx]).ravel()
        sum_p = np.bincount(bi, weights=self.p[idx].ravel(), minlength=b * nb).reshape(b, nb)
        sum_y = np.bincount(bi, weights=yi.ravel(), minlength=b * nb).reshape(b, nb)

        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tp / (tp + fn)
            specificity = tn / (tn + fp)
            # Mann-Whitney U: each negative scores the positives ranked strictly above it,
            # plus half of those tied with it.
            auc = (neg * (cum_tp - pos / 2)).sum(axis=1) / (n_pos * n_neg)
            # Average precision (step-wise, as scikit-learn): precision at each distinct
            # threshold weighted by the recall gained there.
            denom = cum_tp + cum_fp
            prec_at = np.divide(cum_tp, denom, out=np.zeros_like(cum_tp), where=denom > 0)
            ap = (pos * prec_at).sum(axis=1) / n_pos
            out = {
                "accuracy": (tp + tn) / n,
                "recall": recall,
                "specificity": specificity,
                "precision": tp / (tp + fp),
                # 2TP / (2TP + FP + FN): defined (0) when recall is 0 even if precision is
                # not; nan only when there are neither positives nor positive predictions.
                "f1": 2 * tp / (2 * tp + fp + fn),
                "balanced_accuracy": (recall + specificity) / 2,
                "roc_auc": auc,
                "pr_auc": ap,
                "brier": self.sq_err[idx].mean(axis=1),
                "ece": np.abs(sum_p - sum_y).sum(axis=1) / n,
            }
        for v in out.values():  # 0/0 gives nan already; x/0 would give inf
            v[~np.isfinite(v)] = np.nan
        out["_counts"] = counts
        return out


def point_metrics(y_true: Any, y_prob: Any, threshold: float) -> dict[str, float]:
    """Every metric in ``METRICS`` at ``threshold`` (positive when ``p >= threshold``).

    ``pr_auc`` is average precision; ``ece`` uses 10 equal-width bins. Undefined values are
    ``nan``.
    """
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        return {name: float("nan") for name in METRICS}
    values = _Prepared(y, p, float(threshold)).metrics(np.arange(y.size)[None, :])
    return {name: float(values[name][0]) for name in METRICS}


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10) -> float:
    """Expected calibration error: over equal-width probability bins, the mean of
    |mean predicted probability - observed PNEUMONIA frequency| weighted by bin size."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    bins = _ece_bins(p, n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    # sum_b (n_b / n) * |sum_p_b / n_b - sum_y_b / n_b| = sum_b |sum_p_b - sum_y_b| / n
    return float(np.abs(sum_p - sum_y).sum() / y.size)


def evaluate_predictions(y_true: Any, y_prob: Any, threshold: float, n_bootstrap: int = 1000,
                         confidence: float = 0.95, seed: int = 0) -> Evaluation:
    """Point metrics with percentile bootstrap confidence intervals (images resampled with
    replacement; deterministic for a seed).

    Resamples where a metric is undefined (e.g. AUC on a resample with one class) are left
    out of that metric's percentiles. A percentile interval can miss the point estimate of
    a biased statistic (ECE, whose resamples are noisier and so larger); such an interval
    is widened to include it, which only makes it more conservative.
    """
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        raise ValueError("nothing to evaluate: no predictions")
    if n_bootstrap < 1:
        raise ValueError("n_bootstrap must be >= 1 (use point_metrics for point values only)")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    threshold = float(threshold)
    n = y.size
    prep = _Prepared(y, p, threshold)
    point = prep.metrics(np.arange(n)[None, :])

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // max(n, 1)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))
        parts.append(prep.metrics(idx))

    alpha = (1.0 - confidence) / 2
    metrics: dict[str, Interval] = {}
    for name in METRICS:
        boot = np.concatenate([part[name] for part in parts])
        value = float(point[name][0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan metric: nan interval
            low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
        # fmin/fmax ignore nan: an undefined point value leaves the interval as it is.
        metrics[name] = Interval(value, float(np.fmin(low, value)), float(np.fmax(high, value)))
    counts = point["_counts"][0]
    return Evaluation(
        threshold=threshold,
        n=n,
        n_positive=int(y.sum()),
        n_negative=int(n - y.sum()),
        metrics=metrics,
        confusion={k: int(c) for k, c in zip(CONFUSION_KEYS, counts)},
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
