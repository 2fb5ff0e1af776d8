"""Drift checks of prediction batches: reports beside the predictions, an MLflow run in the
monitoring experiment, a skipped report for models without a reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.evaluation.drift import REFERENCE_FILE, write_reference
from cxr_core.lifecycle.monitoring import check_batch, drift_paths, log_check
from cxr_core.lifecycle.predict import load_model_dir
from support.images import write_image

SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import build_cnn

    d = tmp_path_factory.mktemp("model")
    build_cnn(SIZE, blocks=2, base_filters=4, dense_units=8).save(d / "model.keras")
    save_threshold(d / "threshold.json", ThresholdChoice(0.5, 0.9, 0.8, 0.7, 0.9, 10, 10))
    return d


def _images(folder: Path, n: int, seed0: int) -> list[str]:
    return [str(write_image(folder / f"IM-{seed0 + i:04d}-0001.jpeg", seed0 + i, size=48))
            for i in range(n)]


def test_check_writes_reports_and_logs_a_monitoring_run(model_dir, tmp_path) -> None:
    assert load_model_dir(model_dir).reference_path is None
    out = tmp_path / "preds.csv"
    skipped = check_batch(load_model_dir(model_dir), _images(tmp_path / "a", 3, 0), out, "m")
    assert skipped.report.skipped and "no drift reference" in skipped.report.skipped

    val = _images(tmp_path / "val", 30, 100)
    manifest = pd.DataFrame({"path": val, "split": "val", "readable": True,
                             "label": ["NORMAL", "PNEUMONIA"] * 15, "format": "JPEG"})
    write_reference(model_dir, manifest, SIZE, seed=0)
    loaded = load_model_dir(model_dir)
    assert loaded.reference_path == model_dir / REFERENCE_FILE
    outcome = check_batch(loaded, _images(tmp_path / "b", 30, 500), out, "models:/m/1")
    json_path, md_path = drift_paths(out)
    assert outcome.json_path == json_path and md_path.read_text().startswith("# Drift check")
    data = json.loads(json_path.read_text())
    assert data["n_images"] == 30 and data["n_reference"] == 30 and len(data["tests"]) == 12
    assert data["drifted"] is False  # the same random-image generator on both sides

    from cxr_core.lifecycle.tracking import make_client

    client = make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = log_check(client, "cxr-test", outcome, out, (tmp_path / "art").as_uri())
    run = client.get_run(run_id)
    assert run.data.tags["cxr.drifted"] == "false" and run.data.tags["cxr.stage"] == "monitoring"
    assert client.get_experiment(run.info.experiment_id).name == "cxr-test-monitoring"
    assert np.isfinite(run.data.metrics["drift_p_embeddings"])
    names = {a.path for a in client.list_artifacts(run_id, "drift")}
    assert names == {"drift/preds.drift.json", "drift/preds.drift.md"}
