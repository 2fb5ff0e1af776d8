"""Report figures of an evaluation (confusion matrix, ROC, PR, calibration, worst cases) and
Grad-CAM heatmaps of what the model looked at."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.data.labels import LABELS
from cxr_core.evaluation.metrics import (
    ECE_BINS,
    _check_inputs,
    _ece_bins,
    expected_calibration_error,
    point_metrics,
)

# --------------------------------------------------------------------------- Grad-CAM


def _default_cam_layer(model: Any) -> Any:
    # The last 4-D output is the last spatial feature map before global pooling: the
    # coarsest, most class-specific map, which is what Grad-CAM is meant to explain.
    for layer in reversed(model.layers):
        shape = getattr(layer.output, "shape", None)
        if shape is not None and len(shape) == 4 and layer.__class__.__name__ != "InputLayer":
            return layer
    raise ValueError("model has no layer with a 4-D (spatial) output to explain")


def _sigmoid_head(model: Any) -> Any | None:
    """The final ``Dense(1, sigmoid)`` layer, or None if the model ends differently."""
    import keras

    head = model.layers[-1]
    if (isinstance(head, keras.layers.Dense) and head.units == 1
            and getattr(head.activation, "__name__", "") == "sigmoid"):
        return head
    return None


def gradcam(model: Any, images: np.ndarray, layer_name: str | None = None,
            batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps [N, H, W] in 0..1 of the PNEUMONIA score for raw 0-255 images
    [N, H, W, 1] (or [N, H, W]).

    The gradient is taken of the logit, not the sigmoid output: a confident prediction
    saturates the sigmoid, whose gradient then underflows to zero and would blank the map.
    Each map is scaled to a maximum of 1; a map with no positive evidence is all zeros.
    Mixed-precision (bfloat16) feature maps and gradients are cast to float32.
    """
    import keras
    import tensorflow as tf

    x_all = np.asarray(images, dtype=np.float32)
    if x_all.ndim == 3:
        x_all = x_all[..., None]
    if x_all.ndim != 4:
        raise ValueError(f"images must be [N, H, W, 1] or [N, H, W], got shape {x_all.shape}")
    n, h, w = x_all.shape[:3]
    if n == 0:
        return np.zeros((0, h, w), np.float32)

    from cxr_core.training.tta import unwrap

    model = unwrap(model)  # explain the trained model, not the averaging wrapper around it
    layer = model.get_layer(layer_name) if layer_name else _default_cam_layer(model)
    head = _sigmoid_head(model)
    target_out = head.input if head is not None else model.outputs[0]
    grad_model = keras.Model(model.inputs, [layer.output, target_out])

    maps = []
    for start in range(0, n, batch_size):
        x = tf.convert_to_tensor(x_all[start:start + batch_size])
        with tf.GradientTape() as tape:
            # training=False: augmentation, dropout and batch-norm updates stay off.
            fmap, last = grad_model(x, training=False)
            if head is not None:
                score = tf.matmul(tf.cast(last, tf.float32), tf.cast(head.kernel, tf.float32))
                if head.use_bias:
                    score = score + tf.cast(head.bias, tf.float32)
            else:
                score = tf.cast(last, tf.float32)
            # Images are independent at inference, so the gradient of the sum is each
            # image's own gradient.
            total = tf.reduce_sum(score)
        grads = tf.cast(tape.gradient(total, fmap), tf.float32)
        fmap = tf.cast(fmap, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # one weight per channel
        cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))
        cam = tf.image.resize(cam[..., None], (h, w), method="bilinear")[..., 0]
        maps.append(cam.numpy())
    cams = np.nan_to_num(np.concatenate(maps).astype(np.float32), nan=0.0, posinf=0.0)
    cams = np.maximum(cams, 0.0)
    peak = cams.reshape(n, -1).max(axis=1)
    scale = np.divide(1.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.clip(cams * scale[:, None, None], 0.0, 1.0)


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Any:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend state is touched and
    # nothing tries to open a window (flows run headless, possibly in threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _short(name: str, width: int = 28) -> str:
    # Elide the middle: patient id (start) and extension/suffix (end) both identify a file.
    if len(name) <= width:
        return name
    keep = width - 3
    return name[:(keep + 1) // 2] + "..." + name[-(keep // 2):]


def _gray(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).reshape(image.shape[0], image.shape[1])


def _confusion_figure(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> Path:
    pred = (p >= threshold).astype(int)
    cm = np.array([[np.sum((y == t) & (pred == q)) for q in (0, 1)] for t in (0, 1)])
    fig = _new_figure(5.2, 4.4)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    row_tot = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_tot, out=np.zeros(cm.shape), where=row_tot > 0)
    for t in (0, 1):
        for q in (0, 1):
            dark = cm[t, q] > cm.max() / 2
            ax.text(q, t, f"{cm[t, q]}\n({100 * share[t, q]:.1f}% of true)", ha="center",
                    va="center", fontsize=11, color="white" if dark else "black")
    ax.set_xticks([0, 1], [f"{LABELS[0]}", f"{LABELS[1]}"])
    ax.set_yticks([0, 1], [f"{LABELS[0]}", f"{LABELS[1]}"])
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(f"Confusion matrix (threshold {threshold:.3f}, n={y.size})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    return _save(fig, path)


def _one_class_note(ax: Any) -> None:
    ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center",
            transform=ax.transAxes)


def _roc_figure(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> Path:
    from sklearn.metrics import roc_curve

    m = point_metrics(y, p, threshold)
    fig = _new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"ROC (AUC {m['roc_auc']:.3f})")
        ax.plot(1 - m["specificity"], m["recall"], "o", color="tab:red", ms=8,
                label=f"threshold {threshold:.3f}\nrecall {m['recall']:.3f}, "
                      f"specificity {m['specificity']:.3f}")
    else:
        _one_class_note(ax)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (recall)")
    ax.set_title(f"ROC curve (n={y.size}, {int(y.sum())} {LABELS[1]})")
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def _pr_figure(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> Path:
    from sklearn.metrics import precision_recall_curve

    m = point_metrics(y, p, threshold)
    fig = _new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    if y.sum() > 0:
        precision, recall, _ = precision_recall_curve(y, p)
        prevalence = y.mean()
        ax.axhline(prevalence, ls="--", color="gray", lw=1,
                   label=f"chance (prevalence {prevalence:.3f})")
        ax.plot(recall, precision, color="tab:blue", lw=2, drawstyle="steps-post",
                label=f"PR (average precision {m['pr_auc']:.3f})")
        if math.isfinite(m["precision"]):
            ax.plot(m["recall"], m["precision"], "o", color="tab:red", ms=8,
                    label=f"threshold {threshold:.3f}\nrecall {m['recall']:.3f}, "
                          f"precision {m['precision']:.3f}")
    else:
        ax.text(0.5, 0.5, f"undefined: no {LABELS[1]} images", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.02)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (positive predictive value)")
    ax.set_title(f"Precision-recall curve ({LABELS[1]} = positive)")
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path)


def _calibration_figure(y: np.ndarray, p: np.ndarray, threshold: float, path: Path,
                        n_bins: int = ECE_BINS) -> Path:
    bins = _ece_bins(p, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    filled = count > 0
    mean_p = np.bincount(bins, weights=p, minlength=n_bins)[filled] / count[filled]
    freq = np.bincount(bins, weights=y, minlength=n_bins)[filled] / count[filled]
    ece = expected_calibration_error(y, p, n_bins)
    brier = float(np.mean((p - y) ** 2))

    fig = _new_figure(5.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfectly calibrated")
    top.plot(mean_p, freq, "o-", color="tab:blue", lw=2, label="model (equal-width bins)")
    for mp, fr, c in zip(mean_p, freq, count[filled]):
        top.annotate(str(c), (mp, fr), textcoords="offset points", xytext=(4, -10), fontsize=7,
                     color="tab:blue")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel(f"Observed fraction {LABELS[1]}")
    top.set_title(f"Calibration (ECE {ece:.3f}, Brier {brier:.3f}; labels = images per bin)",
                  fontsize=10)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    edges = np.linspace(0, 1, n_bins + 1)
    heights, _, _ = bottom.hist([p[y == 0], p[y == 1]], bins=edges, stacked=True,
                                color=["tab:green", "tab:orange"], label=list(LABELS))
    bottom.set_ylim(0, max(float(np.max(heights)), 1.0) * 1.45)  # headroom for the legend
    bottom.axvline(threshold, color="tab:red", lw=1.5, label=f"threshold {threshold:.3f}")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel(f"Predicted probability of {LABELS[1]}")
    bottom.set_ylabel("images")
    bottom.legend(fontsize=8, loc="upper center", ncols=3)
    return _save(fig, path)


def _grid(k: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(k, 1))
    return math.ceil(max(k, 1) / cols), cols


def _worst_figure(y: np.ndarray, p: np.ndarray, threshold: float, names: list[str],
                  images: np.ndarray, n_worst: int, path: Path) -> Path:
    pred = (p >= threshold).astype(int)
    wrong = np.flatnonzero(pred != y)
    # Most confidently wrong first: the distance of the probability from the true label.
    order = wrong[np.argsort(-np.abs(p[wrong] - y[wrong]), kind="stable")][:n_worst]
    rows, cols = _grid(len(order))
    fig = _new_figure(3.0 * cols, 3.3 * rows + 0.4)
    if len(order) == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified images at threshold {threshold:.3f}",
                ha="center", va="center")
        return _save(fig, path)
    fig.suptitle(f"Most confidently wrong ({len(order)} of {len(wrong)} errors, "
                 f"threshold {threshold:.3f})")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, i in zip(axes, order):
        ax.imshow(_gray(images[i]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{_short(names[i])}\ntrue {LABELS[y[i]]}, p={p[i]:.3f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return _save(fig, path)


def _sample_both_classes(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Up to k indices, half from each class where possible, NORMAL first."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    k_pos = min(len(pos), (k + 1) // 2)
    k_neg = min(len(neg), k - k_pos)
    k_pos = min(len(pos), k - k_neg)  # fill from positives when negatives run short
    return np.concatenate([np.sort(rng.choice(neg, k_neg, replace=False)),
                           np.sort(rng.choice(pos, k_pos, replace=False))]).astype(int)


def _gradcam_figure(y: np.ndarray, p: np.ndarray, names: list[str], images: np.ndarray,
                    model: Any, n_gradcam: int, seed: int, path: Path) -> Path:
    sel = _sample_both_classes(y, n_gradcam, seed)
    heat = gradcam(model, images[sel]) if len(sel) else np.zeros((0, 1, 1))
    rows, cols = _grid(len(sel))
    fig = _new_figure(3.0 * cols + 0.8, 3.3 * rows + 0.4)
    fig.suptitle(f"Grad-CAM: image regions raising the {LABELS[1]} score")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    overlay = None
    for ax, i, hm in zip(axes, sel, heat):
        ax.imshow(_gray(images[i]), cmap="gray", vmin=0, vmax=255)
        overlay = ax.imshow(hm, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        # An all-zero map is a finding, not a failure: nothing raised the score.
        note = "" if hm.max() > 0 else "\n(no positive evidence)"
        ax.set_title(f"{_short(names[i])}\ntrue {LABELS[y[i]]}, p={p[i]:.3f}{note}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    if overlay is not None:
        fig.colorbar(overlay, ax=list(axes), shrink=0.8, label="relative importance")
    return _save(fig, path)


def write_figures(out_dir: Path, y_true: Any, y_prob: Any, threshold: float,
                  paths: Sequence[str], images: np.ndarray | None = None, model: Any = None,
                  n_worst: int = 16, n_gradcam: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write the evaluation figures as PNG files and return name -> path of those written.

    Always: confusion_matrix, roc_curve, pr_curve, calibration_curve. With ``images``
    (raw 0-255 [N, S, S, 1] in the order of ``paths``): worst_misclassified. With ``images``
    and ``model``: gradcam (a sample mixing both classes, fixed by ``seed``).
    """
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        raise ValueError("nothing to plot: no predictions")
    names = [Path(str(s)).name for s in paths]
    if len(names) != y.size:
        raise ValueError(f"{len(names)} paths for {y.size} predictions")
    if images is not None and len(images) != y.size:
        raise ValueError(f"{len(images)} images for {y.size} predictions")
    threshold = float(threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = {
        "confusion_matrix": _confusion_figure(y, p, threshold, out_dir / "confusion_matrix.png"),
        "roc_curve": _roc_figure(y, p, threshold, out_dir / "roc_curve.png"),
        "pr_curve": _pr_figure(y, p, threshold, out_dir / "pr_curve.png"),
        "calibration_curve": _calibration_figure(y, p, threshold,
                                                 out_dir / "calibration_curve.png"),
    }
    if images is not None:
        written["worst_misclassified"] = _worst_figure(
            y, p, threshold, names, images, n_worst, out_dir / "worst_misclassified.png")
        if model is not None and n_gradcam > 0:
            written["gradcam"] = _gradcam_figure(y, p, names, images, model, n_gradcam, seed,
                                                 out_dir / "gradcam.png")
    return written
