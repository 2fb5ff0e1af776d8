"""Registered versions without training: a tiny saved model and per-image test predictions
chosen by the test (which images each version gets right)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SIZE = 16


def tiny_model_dir(root: Path) -> Path:
    """A tiny saved cxr model with its threshold."""
    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import build_cnn

    root.mkdir(parents=True, exist_ok=True)
    build_cnn(SIZE, blocks=3, base_filters=8, dense_units=0).save(root / "model.keras")
    save_threshold(root / "threshold.json", ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20))
    return root


def register_candidate(client: Any, exp_id: str, model_dir: Path, name: str,
                       correct: np.ndarray) -> str:
    """Log a passing run whose test predictions are right exactly where ``correct`` is, and
    register it (alias 'challenger'); returns the version."""
    from cxr_core.evaluation.gates import GateThresholds, decide
    from cxr_core.evaluation.metrics import Interval
    from cxr_core.lifecycle.registry import PREDICTIONS_ARTIFACT, log_keras_model, register_if_blessed
    from cxr_core.lifecycle.tracking import start_run

    run_id = start_run(client, exp_id, "final-training", params={"data.image_size": SIZE},
                       tags={"cxr.stage": "final"})
    log_keras_model(client, run_id, model_dir, SIZE)
    y = np.array([1, 0] * (len(correct) // 2))
    pred = np.where(correct, y, 1 - y)
    preds = pd.DataFrame({"path": [f"/t/{i}.jpeg" for i in range(len(y))],
                          "sha256": [f"{i:064d}" for i in range(len(y))], "label": y,
                          "probability": np.where(pred == 1, 0.9, 0.1), "prediction": pred})
    client.log_text(run_id, preds.to_csv(index=False), PREDICTIONS_ARTIFACT)
    metrics = {"recall": Interval(0.97, 0.96, 0.98), "accuracy": Interval(0.95, 0.94, 0.96)}
    version = register_if_blessed(client, name, run_id, decide(metrics, GateThresholds()), 0.5,
                                  "hash", {"accuracy": 0.95})
    client.set_terminated(run_id)
    assert version is not None
    return version


def champion_and_weaker_challenger(client: Any, model_dir: Path, name: str) -> tuple[str, str]:
    """v1 champion, right on all 60 test images; v2 challenger, wrong on 6 negatives. McNemar
    on the 6 discordant pairs: p = 2 * 0.5**6 = 0.031, a regression at alpha 0.05 but not at
    0.01."""
    from cxr_core.lifecycle.promotion import promote
    from cxr_core.lifecycle.tracking import ensure_experiment

    exp_id = ensure_experiment(client, f"{name}-exp")
    good = np.ones(60, bool)
    v1 = register_candidate(client, exp_id, model_dir, name, good)
    promote(client, name, v1)
    worse = good.copy()
    worse[1:12:2] = False  # odd indices are negatives (labels 1, 0, 1, 0, ...)
    v2 = register_candidate(client, exp_id, model_dir, name, worse)
    return v1, v2
