"""Drift between a model's reference images and a batch that arrives for prediction.

A model trained on one acquisition fails silently on another; the labels that would show it
come late or never. Every registered version carries a reference (``drift_reference.npz``
beside ``model.keras``): per-image statistics of held-out images from its training data
(intensity percentiles, spread, histogram entropy, an annotation score, file size and
format) and their penultimate-layer embeddings. Each prediction batch is compared with it:

- per feature, a two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``);
- the format mix, a chi-square test of the contingency table (``scipy.stats.chi2_contingency``);
- the embeddings, a multivariate test: the maximum mean discrepancy (RBF kernel, median
  bandwidth, on a PCA of the reference) with its p-value from ``scipy.stats.permutation_test``;
- the share predicted positive, an exact binomial test against the reference's share.

scipy and not alibi-detect or evidently: alibi-detect 0.13 pins numpy < 2 and pandas < 3
(it would downgrade the stack), and evidently brings about 30 packages (a web server,
plotly, nltk, telemetry) for the same KS/chi-square tests; scipy is already a dependency
and its tests are the textbook ones. p-values are Bonferroni-adjusted over all tests of the
batch; a test whose adjusted p-value is under ``alpha`` marks the batch drifted, and its
line says why.

The reference is computed on the validation split, not on the images the weights were fitted
on: a network's embeddings of its own training images sit closer to its decision surface
than those of any new image, which pushes every batch towards "drifted" (measured on the
real data: the carved test split's embedding test gave adjusted p 0.09 against a
train-image reference, above 0.5 against the validation reference; docs/benchmarks.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_FILE = "drift_reference.npz"
NUMERIC_FEATURES = ("intensity_p05", "intensity_p50", "intensity_p95", "intensity_mean",
                    "intensity_std", "entropy", "annotation_score", "width", "height")
HIST_BINS = 32
MAX_REFERENCE = 600     # reference images kept (a seeded sample of larger splits)
MAX_MMD = 400           # images per side in the kernel test (its cost is quadratic)
PCA_DIMS = 16
# Burned-in text and markers: near-white pixels on a sharp edge (annotation_score).
_BRIGHT, _EDGE = 200.0, 25.0


@dataclass
class BatchFeatures:
    """Per-image features, embeddings and probabilities of a set of images."""

    features: pd.DataFrame        # NUMERIC_FEATURES + "format", one row per image
    embeddings: np.ndarray        # [n, d]
    probabilities: np.ndarray     # [n]
    histogram: np.ndarray         # mean normalized intensity histogram [HIST_BINS]


# ------------------------------------------------------------------------------- features


def _file_facts(path: str) -> tuple[str, int, int]:
    """(format, width, height) from the file header, without decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    from cxr_core.data import dicom

    if dicom.is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return "DICOM", int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    try:
        with Image.open(path) as img:
            return str(img.format), int(img.size[0]), int(img.size[1])
    except (OSError, UnidentifiedImageError):
        return "unknown", 0, 0


def pixel_features(images: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Intensity features of model-resolution images [n, S, S, 1] (0-255), and their
    normalized histograms [n, HIST_BINS]. What the model sees, so the statistics compare
    like with like whatever the file's own resolution."""
    x = images.reshape(len(images), -1).astype(np.float64)
    p05, p50, p95 = np.percentile(x, [5, 50, 95], axis=1)
    hist = np.stack([np.histogram(row, bins=HIST_BINS, range=(0, 256))[0] for row in x])
    hist = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    entropy = -(hist * np.log2(np.where(hist > 0, hist, 1))).sum(axis=1)
    return pd.DataFrame({
        "intensity_p05": p05, "intensity_p50": p50, "intensity_p95": p95,
        "intensity_mean": x.mean(axis=1), "intensity_std": x.std(axis=1),
        "entropy": entropy, "annotation_score": annotation_scores(images),
    }), hist


def annotation_scores(images: np.ndarray) -> np.ndarray:
    """Share of pixels that are near-white and on a sharp edge: burned-in text, rulers and
    markers (anatomy is rarely both). A heuristic whose value matters only relative to the
    reference."""
    from scipy import ndimage

    x = images[..., 0].astype(np.float64)
    local = ndimage.uniform_filter(x, size=(1, 3, 3), mode="nearest")
    mask = (x >= _BRIGHT) & (np.abs(x - local) >= _EDGE)
    return mask.reshape(len(x), -1).mean(axis=1)


def embedding_model(model: Any) -> Any:
    """A Keras model giving the penultimate layer (the input of the ``pneumonia`` head) of
    the trained network (inside a test-time-augmentation wrapper, if any)."""
    import keras

    from cxr_core.training.tta import unwrap

    inner = unwrap(model)
    try:
        head = inner.get_layer("pneumonia")
    except ValueError:
        head = inner.layers[-1]
    return keras.Model(inner.inputs, head.input)


def compute_features(model: Any, image_size: int, paths: list[str],
                     batch_size: int = 64) -> tuple[BatchFeatures, list[str]]:
    """Features of the files that decode (same decode as training); returns them and the
    paths they belong to, in order."""
    import tensorflow as tf

    from cxr_core.data.inputs import path_dataset

    embed = embedding_model(model)
    both = tf.function(lambda x: (embed(x, training=False), model(x, training=False)),
                       reduce_retracing=True)
    frames, hists, embs, probs, kept = [], [], [], [], []
    for images, batch_paths in path_dataset(paths, image_size, batch_size):
        e, p = both(images)
        feats, hist = pixel_features(images.numpy())
        frames.append(feats)
        hists.append(hist)
        embs.append(np.asarray(e, np.float64).reshape(len(feats), -1))
        probs.append(np.asarray(p, np.float64).ravel())
        kept += [b.decode() for b in batch_paths.numpy()]
    if not kept:
        raise ValueError("no image could be decoded: nothing to compare")
    features = pd.concat(frames, ignore_index=True)
    facts = [_file_facts(p) for p in kept]
    features["format"] = [f for f, _, _ in facts]
    features["width"] = [w for _, w, _ in facts]
    features["height"] = [h for _, _, h in facts]
    hist = np.concatenate(hists)
    return BatchFeatures(features, np.concatenate(embs), np.concatenate(probs),
                         hist.mean(axis=0)), kept


# ------------------------------------------------------------------------------- reference


def save_reference(path: Path, batch: BatchFeatures, threshold: float, source: str) -> Path:
    """Write the reference (``drift_reference.npz``) beside a model."""
    f = batch.features
    np.savez_compressed(
        path,
        numeric=f[list(NUMERIC_FEATURES)].to_numpy(np.float64),
        numeric_names=np.array(NUMERIC_FEATURES),
        formats=np.array(f["format"].astype(str).tolist(), dtype=str),  # no pickled objects
        embeddings=batch.embeddings.astype(np.float32),
        probabilities=batch.probabilities,
        histogram=batch.histogram,
        threshold=np.array(threshold),
        source=np.array(source),
    )
    return Path(path)


def load_reference(path: Path) -> BatchFeatures:
    """Read a reference written by :func:`save_reference`."""
    with np.load(path, allow_pickle=False) as z:
        features = pd.DataFrame(z["numeric"], columns=[str(n) for n in z["numeric_names"]])
        features["format"] = z["formats"].astype(str)
        return BatchFeatures(features, z["embeddings"].astype(np.float64),
                             z["probabilities"].astype(np.float64), z["histogram"])


def write_reference(model_dir: Path, manifest: pd.DataFrame, image_size: int, seed: int,
                    split: str = "val") -> Path:
    """The reference of the model in ``model_dir`` from ``split`` of ``manifest`` (at most
    MAX_REFERENCE images, seeded sample), saved beside it."""
    import keras

    from cxr_core.data.inputs import split_rows
    from cxr_core.training.fit import MODEL_FILE, load_threshold

    rows = split_rows(manifest, split)
    if rows.empty:
        raise ValueError(f"the {split} split is empty: no drift reference")
    if len(rows) > MAX_REFERENCE:
        rows = rows.sample(MAX_REFERENCE, random_state=seed).sort_values("path")
    model = keras.models.load_model(Path(model_dir) / MODEL_FILE)
    batch, _ = compute_features(model, image_size, rows["path"].tolist())
    return save_reference(Path(model_dir) / REFERENCE_FILE, batch, load_threshold(model_dir).threshold,
                          f"{split} split, {len(batch.features)} images")


# ------------------------------------------------------------------------------- tests


@dataclass
class DriftTest:
    name: str
    kind: str
    statistic: float
    p_value: float
    p_adjusted: float = float("nan")
    drifted: bool = False
    reference: str = ""
    batch: str = ""


@dataclass
class DriftReport:
    """The verdict on one batch, with every test and the reasons it drifted."""

    drifted: bool
    reasons: list[str]
    n_images: int
    n_reference: int
    alpha: float
    tests: list[DriftTest]
    positive_share: dict[str, float]
    histogram_js_distance: float
    model: str = ""
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: NaN (no value) is written as null."""
        return json.dumps(_finite(self.to_dict()), indent=2, default=_json_default,
                          allow_nan=False)

    def summary(self) -> str:
        """A human summary (markdown)."""
        if self.skipped:
            return f"# Drift check: skipped\n\n{self.skipped}\n"
        verdict = "DRIFTED" if self.drifted else "no drift detected"
        lines = [f"# Drift check: {verdict}", "",
                 f"{self.n_images} images against a reference of {self.n_reference} "
                 f"({self.model}); Bonferroni-adjusted p-values, alpha {self.alpha}.", ""]
        lines += [f"- {r}" for r in self.reasons] + ([""] if self.reasons else [])
        lines += ["| test | kind | statistic | p (adjusted) | reference | batch |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {'**' + t.name + '**' if t.drifted else t.name} | {t.kind} | "
                  f"{t.statistic:.3f} | {t.p_adjusted:.2g} | {t.reference} | {t.batch} |"
                  for t in self.tests]
        lines += ["", f"Intensity histogram Jensen-Shannon distance: "
                      f"{self.histogram_js_distance:.3f}."]
        return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _ks_tests(ref: pd.DataFrame, new: pd.DataFrame) -> list[DriftTest]:
    from scipy.stats import ks_2samp

    out = []
    for name in NUMERIC_FEATURES:
        a, b = ref[name].to_numpy(float), new[name].to_numpy(float)
        res = ks_2samp(a, b)
        out.append(DriftTest(name, "ks", float(res.statistic), float(res.pvalue),
                             reference=f"median {np.median(a):.4g}",
                             batch=f"median {np.median(b):.4g}"))
    return out


def _format_test(ref: pd.Series, new: pd.Series) -> DriftTest:
    from scipy.stats import chi2_contingency

    cats = sorted(set(ref) | set(new))
    table = np.array([[int((s == c).sum()) for c in cats] for s in (ref, new)])

    def mix(row: np.ndarray) -> str:
        return ", ".join(f"{c} {n / max(row.sum(), 1):.0%}" for c, n in zip(cats, row) if n)

    if len(cats) < 2:
        return DriftTest("format_mix", "chi2", 0.0, 1.0, reference=mix(table[0]),
                         batch=mix(table[1]))
    res = chi2_contingency(table)
    return DriftTest("format_mix", "chi2", float(res.statistic), float(res.pvalue),
                     reference=mix(table[0]), batch=mix(table[1]))


def _mmd_test(ref: np.ndarray, new: np.ndarray, permutations: int, seed: int) -> DriftTest:
    """Maximum mean discrepancy of the embeddings with a permutation p-value."""
    from scipy.stats import permutation_test

    rng = np.random.default_rng(seed)
    ref = ref[rng.permutation(len(ref))[:MAX_MMD]]
    new = new[rng.permutation(len(new))[:MAX_MMD]]
    # PCA fitted on the reference: a few directions carry the embedding's variation, and
    # the kernel's distances are better behaved there than in all dimensions.
    mean = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    basis = vt[:PCA_DIMS].T
    scale = (ref - mean) @ basis
    sd = scale.std(axis=0) + 1e-9
    z = np.concatenate([(ref - mean) @ basis, (new - mean) @ basis]) / sd
    d2 = np.square(z[:, None, :] - z[None, :, :]).sum(-1)
    bandwidth = float(np.median(d2[np.triu_indices(len(z), 1)])) or 1.0
    kernel = np.exp(-d2 / bandwidth)

    def mmd(i: np.ndarray, j: np.ndarray, axis: int = -1) -> float:
        i, j = i.astype(int), j.astype(int)
        return float(kernel[np.ix_(i, i)].mean() + kernel[np.ix_(j, j)].mean()
                     - 2 * kernel[np.ix_(i, j)].mean())

    idx_ref, idx_new = np.arange(len(ref)), np.arange(len(ref), len(z))
    res = permutation_test((idx_ref, idx_new), mmd, permutation_type="independent",
                           vectorized=False, n_resamples=permutations, alternative="greater",
                           random_state=seed)
    return DriftTest("embeddings", "mmd", float(res.statistic), float(res.pvalue),
                     reference=f"{len(ref)} x {ref.shape[1]}-d",
                     batch=f"{len(new)} images, PCA {basis.shape[1]}")


def _share_test(ref_share: float, probs: np.ndarray, threshold: float) -> DriftTest:
    from scipy.stats import binomtest

    k, n = int((probs >= threshold).sum()), len(probs)
    p = min(max(ref_share, 1e-6), 1 - 1e-6)
    res = binomtest(k, n, p)
    return DriftTest("positive_share", "binomial", k / n, float(res.pvalue),
                     reference=f"{ref_share:.1%} predicted positive",
                     batch=f"{k / n:.1%} predicted positive")


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two histograms."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p + 1e-12, q + 1e-12, base=2))


def compare(reference: BatchFeatures, batch: BatchFeatures, threshold: float,
            alpha: float = 0.01, min_images: int = 20, permutations: int = 500,
            seed: int = 0, model: str = "") -> DriftReport:
    """Test ``batch`` against ``reference``; ``drifted`` when any Bonferroni-adjusted
    p-value is under ``alpha``. Batches under ``min_images`` are not tested (too little
    power to say anything), and the report says so."""
    n, m = len(batch.features), len(reference.features)
    ref_share = float((reference.probabilities >= threshold).mean())
    shares = {"reference": ref_share,
              "batch": float((batch.probabilities >= threshold).mean()) if n else float("nan")}
    js = js_distance(reference.histogram, batch.histogram) if n else float("nan")
    if n < min_images:
        return DriftReport(False, [], n, m, alpha, [], shares, js, model,
                           skipped=f"{n} image(s): fewer than {min_images}, too few to test")
    tests = _ks_tests(reference.features, batch.features)
    tests.append(_format_test(reference.features["format"], batch.features["format"]))
    n_tests = len(tests) + 3
    # A permutation p-value is at least 1/(resamples + 1): enough resamples that a clear
    # shift can pass the Bonferroni-adjusted level at all.
    resamples = max(permutations, int(np.ceil(2 * n_tests / alpha)))
    tests.append(_mmd_test(reference.embeddings, batch.embeddings, resamples, seed))
    tests.append(_share_test(ref_share, batch.probabilities, threshold))
    reasons = []
    for t in tests:
        t.p_adjusted = min(1.0, t.p_value * len(tests))
        t.drifted = t.p_adjusted < alpha
        if t.drifted:
            reasons.append(f"{t.name}: {t.kind} statistic {t.statistic:.3g}, adjusted p "
                           f"{t.p_adjusted:.2g} (reference {t.reference}; batch {t.batch})")
    return DriftReport(bool(reasons), reasons, n, m, alpha, tests, shares, js, model)
