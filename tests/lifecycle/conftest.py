"""Fixtures of the lifecycle tests: one real `mlflow server` per backend for the package (sqlite,
and PostgreSQL when CXR_TEST_POSTGRES_URL is set), a tiny saved model, and a registrar that
logs candidate runs with per-image test predictions. Every test registers under its own model
name, so tests do not depend on each other's state or order."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cxr_core.evaluation.gates import GateDecision, GateThresholds, decide
from cxr_core.evaluation.metrics import Interval
from cxr_core.lifecycle.registry import PREDICTIONS_ARTIFACT, log_keras_model, register_if_blessed
from cxr_core.lifecycle.tracking import ensure_experiment, make_client, start_run
from support.servers import POSTGRES_ENV, mlflow_server

SIZE = 16


def _backends() -> list:
    marks = pytest.mark.skipif(not os.environ.get(POSTGRES_ENV),
                               reason=f"{POSTGRES_ENV} is not set")
    return ["sqlite", pytest.param("postgres", marks=marks)]


@pytest.fixture(scope="package", params=_backends())
def server(request, tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp(f"mlflow-{request.param}"), request.param) as srv:
        yield srv


@pytest.fixture(scope="package")
def client(server):
    return make_client(server.url)


@pytest.fixture(scope="package")
def exp_id(client):
    return ensure_experiment(client, "cxr-test")


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory) -> Path:
    """A tiny saved cxr model with its threshold; its outputs spread over (0, 1) so that
    comparisons of probabilities can fail."""
    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import build_cnn
    from support.images import spread_outputs

    d = tmp_path_factory.mktemp("model")
    model = build_cnn(SIZE, blocks=3, base_filters=8, dense_units=0)
    # Spread over images of every brightness, so files of different brightness score apart.
    rng = np.random.default_rng(0)
    levels = np.linspace(10, 245, 32, dtype="float32")[:, None, None, None]
    x = np.clip(levels + rng.normal(0, 20, (32, SIZE, SIZE, 1)), 0, 255).astype("float32")
    spread_outputs(model, x)
    model.save(d / "model.keras")
    save_threshold(d / "threshold.json", ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20))
    return d


@pytest.fixture(scope="package")
def image_size() -> int:
    """The input size of the ``model_dir`` model."""
    return SIZE


@pytest.fixture
def model_name() -> str:
    """A registered-model name no other test uses."""
    return f"cxr-test-{uuid.uuid4().hex[:10]}"


def passing_decision() -> GateDecision:
    return decide({"recall": Interval(0.97, 0.96, 0.98), "accuracy": Interval(0.95, 0.94, 0.96)},
                  GateThresholds())


def failing_decision() -> GateDecision:
    return decide({"recall": Interval(0.5, 0.4, 0.6), "accuracy": Interval(0.95, 0.94, 0.96)},
                  GateThresholds())


@dataclass
class Registrar:
    """Logs candidate runs on the test server and registers them."""

    client: Any
    exp_id: str
    model_dir: Path

    @staticmethod
    def hashes(start: int, stop: int) -> list[str]:
        """Stand-in sha256 values of test images ``start`` .. ``stop - 1``."""
        return [f"{i:064x}" for i in range(start, stop)]

    @staticmethod
    def predictions(hashes: list[str], correct: np.ndarray | None = None,
                    labels: np.ndarray | None = None) -> pd.DataFrame:
        """Per-image test predictions as evaluation/scoring.py writes them (threshold 0.5):
        right where ``correct`` (default: everywhere), labels alternating unless given."""
        y = labels if labels is not None else np.arange(len(hashes)) % 2
        ok = np.ones(len(hashes), bool) if correct is None else correct
        pred = np.where(ok, y, 1 - y)
        return pd.DataFrame({"path": [f"/t/{h[-6:]}.jpeg" for h in hashes], "sha256": hashes,
                             "label": y, "probability": np.where(pred == 1, 0.9, 0.1),
                             "prediction": pred})

    def run(self, predictions: pd.DataFrame | None, with_model: bool = True,
            card: str | None = None) -> str:
        """A finished final-training run with (optionally) the model, its test predictions
        and a model card."""
        run_id = start_run(self.client, self.exp_id, "final-training",
                           params={"data.image_size": SIZE}, tags={"cxr.stage": "final"})
        if with_model:
            log_keras_model(self.client, run_id, self.model_dir, SIZE)
        if predictions is not None:
            self.client.log_text(run_id, predictions.to_csv(index=False), PREDICTIONS_ARTIFACT)
        if card is not None:
            self.client.log_text(run_id, card, "model_card.md")
        self.client.set_terminated(run_id)
        return run_id

    def candidate(self, name: str, predictions: pd.DataFrame | None, passed: bool = True,
                  with_model: bool = True, card: str | None = None) -> tuple[str, str | None]:
        """Log a run and register it if its gates ``passed``: (run id, version or None)."""
        run_id = self.run(predictions, with_model, card)
        decision = passing_decision() if passed else failing_decision()
        version = register_if_blessed(self.client, name, run_id, decision, 0.5, "hash",
                                      {"accuracy": 0.95})
        return run_id, version


@pytest.fixture
def registrar(client, exp_id, model_dir) -> Registrar:
    return Registrar(client, exp_id, model_dir)
