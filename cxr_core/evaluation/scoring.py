"""Scoring a model on the test split: one row per image (the unit every comparison joins on),
and the evaluation report built from those rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.data.inputs import SplitData, make_dataset, split_rows
from cxr_core.data.labels import POSITIVE
from cxr_core.data.manifest import read_manifest
from cxr_core.errors import DataValidationError


def test_split(manifest_path: Path) -> pd.DataFrame:
    """Readable, labelled rows of the test split (the images that judge every model)."""
    return split_rows(read_manifest(manifest_path), "test")


def score_test_split(model: Any, threshold: float, image_size: int, test: pd.DataFrame,
                     batch_size: int = 64) -> pd.DataFrame:
    """One row per test image: path, sha256, patient_id (empty where ``test`` has none),
    label (0/1), probability, prediction."""
    labels = (test["label"] == POSITIVE).to_numpy(np.int32)
    ds = make_dataset(SplitData(test["path"].tolist(), labels), image_size, batch_size,
                      shuffle=False, seed=0, cache=False)
    probs = np.asarray(model.predict(ds.map(lambda x, y: x), verbose=0), np.float64).ravel()
    patients = test["patient_id"].to_numpy(object) if "patient_id" in test else [None] * len(test)
    return pd.DataFrame({"path": test["path"].to_numpy(), "sha256": test["sha256"].to_numpy(),
                         "patient_id": patients, "label": labels, "probability": probs,
                         "prediction": (probs >= threshold).astype(int)})


@dataclass
class EvaluatedModel:
    """What the evaluate stage produced: metrics, per-image predictions, figures, robustness;
    then, once scored (:func:`cxr_core.stages.external_stage`), each external set's
    Evaluation and the site threshold chosen on a calibration sample, if any."""

    evaluation: Any
    predictions_path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    robustness: dict[str, float] = field(default_factory=dict)  # robust_* metrics
    external: dict[str, Any] = field(default_factory=dict)  # set name -> Evaluation
    site_threshold: Any | None = None  # cxr_core.evaluation.external.SiteThreshold


def evaluate_test_split(model: Any, threshold: float, test: pd.DataFrame, image_size: int,
                        out_dir: Path, seed: int, with_figures: bool = True) -> EvaluatedModel:
    """Score ``test`` at ``threshold``: metrics with bootstrap intervals (patients resampled:
    their images are not independent), per-image predictions (for champion comparisons),
    scores under acquisition shifts and figures, all under ``out_dir``."""
    from cxr_core.data.inputs import load_images
    from cxr_core.evaluation.figures import write_figures
    from cxr_core.evaluation.metrics import evaluate_predictions
    from cxr_core.evaluation.robustness import score_under_shifts

    if test.empty:
        raise DataValidationError("the test split is empty: nothing to evaluate on")
    preds = score_test_split(model, threshold, image_size, test)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / "test_predictions.csv"
    preds.to_csv(predictions_path, index=False)
    evaluation = evaluate_predictions(preds["label"].to_numpy(), preds["probability"].to_numpy(),
                                      threshold, seed=seed, groups=preds["patient_id"].to_numpy())
    (out_dir / "metrics.json").write_text(json.dumps(evaluation.to_dict(), indent=2))
    robustness = score_under_shifts(model, threshold, preds, image_size, out_dir, seed)
    figures: dict[str, Path] = {}
    if with_figures:
        # Figures need pixels: decode at most a few hundred test images for the image grids.
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(preds), size=min(len(preds), 256), replace=False))
        sample = preds.iloc[pick]
        images = load_images(sample["path"].tolist(), image_size)
        figures = write_figures(out_dir / "figures", sample["label"].to_numpy(),
                                sample["probability"].to_numpy(), threshold,
                                sample["path"].tolist(), images=images, model=model,
                                seed=seed)
        # The curves belong to the whole test split, not the sample.
        figures.update(write_figures(out_dir / "figures", preds["label"].to_numpy(),
                                     preds["probability"].to_numpy(), threshold,
                                     preds["path"].tolist()))
    return EvaluatedModel(evaluation, predictions_path, figures, robustness)
