"""Scoring the test split: per-image predictions carry the patient, intervals resample patients,
the robustness table names each shift's family."""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_core.data.inputs import split_rows
from cxr_core.data.manifest import scan_dataset
from cxr_core.evaluation.metrics import evaluate_predictions
from cxr_core.evaluation.robustness import SHIFT_FAMILY
from cxr_core.evaluation.scoring import evaluate_test_split
from support.images import make_good_dataset, spread_outputs


def test_evaluation_resamples_the_patients_of_the_test_split(tmp_path: Path) -> None:
    from cxr_core.training.model import build_cnn

    root = make_good_dataset(tmp_path / "data", n_patients=4, imgs=3)
    test = split_rows(scan_dataset(root, workers=1).manifest, "test")
    assert test["patient_id"].nunique() == 8 and len(test) == 24  # 3 images per patient
    model = build_cnn(32, blocks=2, base_filters=8, dense_units=0, seed=0)
    spread_outputs(model, np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)))
    out = tmp_path / "eval"
    evaluated = evaluate_test_split(model, 0.5, test, 32, out, seed=0, with_figures=False)

    preds = pd.read_csv(evaluated.predictions_path, dtype={"patient_id": str})
    assert preds["patient_id"].tolist() == test["patient_id"].tolist()
    ev = evaluated.evaluation
    assert (ev.resampled, ev.n_clusters) == ("patients", 8)
    expected = evaluate_predictions(preds["label"], preds["probability"], 0.5, seed=0,
                                    groups=preds["patient_id"])
    # NaN-aware: with no positive prediction (the untrained model's outputs depend on the
    # random state earlier tests leave) precision is NaN, and NaN != NaN.
    np.testing.assert_equal({k: astuple(v) for k, v in ev.metrics.items()},
                            {k: astuple(v) for k, v in expected.metrics.items()})
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["resampled"], saved["n_clusters"]) == ("patients", 8)

    table = pd.read_csv(out / "robustness.csv")
    assert dict(zip(table["condition"], table["family"])) == {"clean": "none", **SHIFT_FAMILY}
    assert {"robust_seen_worst_accuracy", "robust_unseen_worst_accuracy",
            "robust_worst_accuracy"} <= set(evaluated.robustness)
