"""Evaluation on held-out images: point metrics at the operating threshold with percentile
bootstrap confidence intervals (patients resampled when their ids are given) and calibration
(figures: :mod:`cxr_core.evaluation.figures`).

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
# Bootstrap resamples are processed in chunks of about this many image weights (resamples x
# images), so memory stays bounded (tens of MB) whatever the test set size.
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
    resampled: str = "images"        # the bootstrap's unit: "patients" or "images"
    n_clusters: int | None = None    # how many of them there were

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
            "resampled": self.resampled,
            "n_clusters": self.n_clusters,
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
    """Per-image quantities that do not change between bootstrap resamples.

    A resample is described by how often each cluster (a patient, or an image when there are
    no groups) was drawn; an image then counts as often as its cluster. Every metric is a
    weighted sum over images, so a chunk of resamples costs one matrix product and one
    segment sum over images sorted by score (no per-resample index arrays).
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, threshold: float,
                 clusters: np.ndarray | None = None, n_bins: int = ECE_BINS):
        # Images sorted by score, highest first: tied scores form one contiguous segment,
        # which is what makes the rank-based AUC and the step-wise average precision
        # tie-correct.
        order = np.argsort(-p, kind="stable")
        y, p = y[order], p[order]
        self.n = y.size
        self.cluster = (np.arange(y.size) if clusters is None else clusters)[order]
        self.n_clusters = int(self.cluster.max()) + 1 if y.size else 0
        self.y = y.astype(np.float64)
        self.segment = np.flatnonzero(np.r_[True, p[1:] != p[:-1]]) if y.size else np.zeros(0, int)
        # Columns of one matrix, so the sums a resample needs are one product with it:
        # the 4 confusion cells (0 tn, 1 fp, 2 fn, 3 tp), positives, squared error, and per
        # ECE bin the summed probabilities and the summed labels.
        cell = 2 * y + (p >= threshold).astype(np.int64)
        bins = _ece_bins(p, n_bins)
        columns = np.zeros((y.size, 6 + 2 * n_bins))
        columns[np.arange(y.size), cell] = 1.0
        columns[:, 4] = y
        columns[:, 5] = (p - y) ** 2
        columns[np.arange(y.size), 6 + bins] = p
        columns[np.arange(y.size), 6 + n_bins + bins] = y
        self.columns = columns
        self.n_bins = n_bins

    def metrics(self, draws: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each row of ``draws`` (B x n_clusters: how often each cluster is
        in a resample; a row of ones is the data itself)."""
        w = np.asarray(draws, dtype=np.float64)[:, self.cluster]  # B x n image weights
        sums = w @ self.columns
        size = w.sum(axis=1)
        tn, fp, fn, tp = (sums[:, i] for i in range(4))
        # Per distinct score (highest first): weighted positives and images.
        pos = np.add.reduceat(w * self.y, self.segment, axis=1)
        neg = np.add.reduceat(w, self.segment, axis=1) - pos
        cum_tp = np.cumsum(pos, axis=1)
        cum_fp = np.cumsum(neg, axis=1)
        n_pos, n_neg = cum_tp[:, -1], cum_fp[:, -1]
        nb = self.n_bins
        sum_p, sum_y = sums[:, 6:6 + nb], sums[:, 6 + nb:]

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
                "accuracy": (tp + tn) / size,
                "recall": recall,
                "specificity": specificity,
                "precision": tp / (tp + fp),
                # 2TP / (2TP + FP + FN): defined (0) when recall is 0 even if precision is
                # not; nan only when there are neither positives nor positive predictions.
                "f1": 2 * tp / (2 * tp + fp + fn),
                "balanced_accuracy": (recall + specificity) / 2,
                "roc_auc": auc,
                "pr_auc": ap,
                "brier": sums[:, 5] / size,
                "ece": np.abs(sum_p - sum_y).sum(axis=1) / size,
            }
        for v in out.values():  # 0/0 gives nan already; x/0 would give inf
            v[~np.isfinite(v)] = np.nan
        out["_counts"] = np.rint(sums[:, :4]).astype(np.int64)
        return out


def _draw_counts(idx: np.ndarray, n_clusters: int) -> np.ndarray:
    """B x k drawn cluster indices -> B x n_clusters counts (how often each was drawn)."""
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * n_clusters + idx).ravel()
    return np.bincount(flat, minlength=b * n_clusters).reshape(b, n_clusters)


def cluster_codes(groups: Any, n: int) -> np.ndarray:
    """Cluster index 0..k-1 per image from any ids (a patient id per image). A missing id
    (None, nan, empty) makes the image a cluster of its own: it is not pooled with others."""
    import pandas as pd

    ids = pd.Series(np.asarray(groups, dtype=object).ravel())
    if len(ids) != n:
        raise ValueError(f"groups ({len(ids)}) and y_true ({n}) differ in length")
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    codes, uniques = pd.factorize(ids.where(~missing))
    codes = np.asarray(codes, dtype=np.int64)
    codes[missing.to_numpy()] = len(uniques) + np.arange(int(missing.sum()))
    return codes


def point_metrics(y_true: Any, y_prob: Any, threshold: float) -> dict[str, float]:
    """Every metric in ``METRICS`` at ``threshold`` (positive when ``p >= threshold``).

    ``pr_auc`` is average precision; ``ece`` uses 10 equal-width bins. Undefined values are
    ``nan``.
    """
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        return {name: float("nan") for name in METRICS}
    values = _Prepared(y, p, float(threshold)).metrics(np.ones((1, y.size)))
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
                         confidence: float = 0.95, seed: int = 0,
                         groups: Any = None) -> Evaluation:
    """Point metrics with percentile bootstrap confidence intervals (deterministic for a seed).

    ``groups`` holds the patient id of each image. With it, the bootstrap resamples
    patients with replacement and keeps each drawn patient's images together (a cluster
    bootstrap): a patient's images are not independent evidence, and resampling them one by
    one gives intervals that are too narrow. Without it every image is its own cluster. An
    image without an id (None, nan, "") is a patient of its own.

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
    prep = _Prepared(y, p, threshold, None if groups is None else cluster_codes(groups, n))
    k = prep.n_clusters
    point = prep.metrics(np.ones((1, k)))
    parts = _bootstrap(prep, n_bootstrap, seed)
    metrics = {name: _percentile_interval(np.concatenate([part[name] for part in parts]),
                                          float(point[name][0]), confidence)
               for name in METRICS}
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
        resampled="images" if groups is None else "patients",
        n_clusters=k,
    )


def _bootstrap(prep: _Prepared, n_bootstrap: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Metrics of ``n_bootstrap`` resamples of the clusters, in chunks of bounded memory."""
    rng = np.random.default_rng(seed)
    k = prep.n_clusters
    chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // max(prep.n, k, 1)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, k, size=(min(chunk, n_bootstrap - start), k))
        parts.append(prep.metrics(_draw_counts(idx, k)))
    return parts


def _percentile_interval(boot: np.ndarray, value: float, confidence: float) -> Interval:
    """The percentile interval of the resampled values, widened to include ``value``."""
    alpha = (1.0 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan metric: nan interval
        low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
    # fmin/fmax ignore nan: an undefined point value leaves the interval as it is.
    return Interval(value, float(np.fmin(low, value)), float(np.fmax(high, value)))
