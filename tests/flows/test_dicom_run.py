"""A whole run on DICOM input (the synthetic set with fake identifiers planted in every
header): the retrain flow under the Prefect test harness against a real `mlflow server`,
then `cxr predict` with its drift check. Every file the run left (run folder, MLflow's
database and artifact store, Prefect's database, prediction and drift outputs) is searched
for the planted identifiers. Then drift end to end: `cxr deploy --retrain-on-drift` sets up
the automation, a shifted batch through the batch-predict flow and through `cxr predict`
emits cxr.drift.detected, and each fires a run of the retrain deployment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxr_core.data.synth import _plan, synthesize_dataset
from cxr_core.data.synth_dicom import planted_identifiers
from support.servers import mlflow_server

pytestmark = pytest.mark.integration
SEED = 11
N_PER_CLASS = 50
TINY = {
    "data": {"image_size": 32, "min_val_images": 0},
    "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
    "tune": {"algorithm": "random", "max_trials": 1, "max_epochs": 1},
    "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 1},
    "gates": {"min_recall": 0.0, "min_accuracy": 0.0},
}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(root, "sqlite") as server:
        yield server, root


@pytest.fixture(scope="module")
def env(tracking, harness, tmp_path_factory):
    home = tmp_path_factory.mktemp("cxr-home")
    values = {"CXR_HOME": str(home), "CXR_TRACKING_URI": tracking[0].url,
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield home
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("dicom") / "data", n_per_class=N_PER_CLASS,
                              size=32, seed=SEED, fmt="dicom").root


@pytest.fixture(scope="module")
def run(env, dicom_data, tmp_path_factory) -> dict:
    """One retrain on the DICOM set, its model promoted to champion."""
    from cxr_core.lifecycle.promotion import promote
    from cxr_core.lifecycle.tracking import make_client
    from flows.retrain import retrain_flow

    cfg = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg.write_text(json.dumps(TINY))
    result = retrain_flow(data_dir=str(dicom_data), profile="quick", config=str(cfg))
    assert result["model_version"] == "1"
    promote(make_client(os.environ["CXR_TRACKING_URI"]), "cxr-pneumonia", "1")
    return result


def _planted() -> set[str]:
    values = set()
    for p in _plan(N_PER_CLASS, SEED, (0.7, 0.15, 0.15)):
        values |= set(planted_identifiers(SEED, p.patient, p.index).values())
    return values


def _leaks(roots: list[Path], planted: set[str]) -> dict[str, list[str]]:
    """Planted values found in any file under ``roots`` (bytes, so binary stores count)."""
    needles = [(v, v.encode()) for v in planted]
    found: dict[str, list[str]] = {}
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            blob = f.read_bytes()
            hits = [v for v, b in needles if b in blob]
            if hits:
                found[str(f)] = hits[:5]
    return found


def test_no_identifier_in_any_artifact_of_a_dicom_run(run, env, tracking, harness, dicom_data,
                                                      tmp_path) -> None:
    from flows.cli import app

    out = tmp_path / "preds" / "predictions.csv"
    # Train and test split together: enough images for the drift tests to run.
    res = CliRunner().invoke(app, ["predict", str(dicom_data / "train"), str(dicom_data / "test"),
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) > 20
    drift = json.loads(out.with_name("predictions.drift.json").read_text())
    assert drift["skipped"] is None and drift["n_reference"] > 0 and len(drift["tests"]) == 12
    assert out.with_name("predictions.drift.md").is_file()
    planted = _planted()
    # The search itself works: the source files do hold the planted values.
    assert _leaks([dicom_data], planted)
    server_root = tracking[1]
    # Prefect's database (flow logs, artifacts, parameters) and MLflow's (params, tags,
    # dataset inputs) are searched as files, like every artifact.
    roots = [Path(run["run_dir"]), env, server_root, out.parent, harness]
    assert (server_root / "mlflow.db").is_file() and harness.is_file()
    assert not _leaks(roots, planted)
    assert not [v for v in planted if v in res.output]
    # The grouped splits came from the header's PatientID, as salted hashes.
    import pandas as pd

    manifest = pd.read_parquet(Path(run["run_dir"]) / "manifest.parquet")
    assert manifest["patient_id"].str.startswith("pid-").all()
    assert (manifest["format"] == "DICOM").all()


def _shifted_batch(src: Path, out: Path, n: int = 40) -> Path:
    """A new acquisition: the DICOM images as brighter, noisier 8-bit PNGs at another size."""
    import numpy as np
    from PIL import Image

    from cxr_core.data.dicom import read_gray

    out.mkdir(parents=True)
    files = sorted(p for p in src.rglob("*") if p.is_file())[:n]
    for i, f in enumerate(files):
        x = read_gray(f).astype(float) * 0.6 + 90
        x += np.random.default_rng(i).normal(0, 20, x.shape)
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).resize((80, 80))
        img.save(out / f"new-{i:03d}.png")
    return out


def _retrain_runs(deployment_id) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
    return len(runs)


def _wait_for_runs(deployment_id, n: int, timeout: float = 90.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (count := _retrain_runs(deployment_id)) >= n:
            return count
        time.sleep(2)
    return _retrain_runs(deployment_id)


def test_drift_event_fires_the_retrain_automation(run, env, dicom_data, tmp_path,
                                                  monkeypatch) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from cxr_core.lifecycle.tracking import make_client
    from flows.batch_predict import batch_predict_flow
    from flows.cli import app
    from flows.drift import AUTOMATION_NAME

    # As with `cxr stack up`: the server's URL in the settings (restored after the test).
    monkeypatch.setenv("CXR_PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    res = CliRunner().invoke(app, ["deploy", "--data-dir", str(dicom_data), "--retrain-on-drift"])
    assert res.exit_code == 0, res.output
    assert f"automation {AUTOMATION_NAME}: on" in res.output
    automation = Automation.read(name=AUTOMATION_NAME)
    assert automation.enabled and automation.actions[0].type == "run-deployment"
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("retrain/scheduled")
    assert automation.actions[0].deployment_id == retrain.id
    before = _retrain_runs(retrain.id)

    # The batch-predict flow on a new acquisition: drifted, event, a retrain run.
    batch = _shifted_batch(dicom_data / "train", tmp_path / "incoming")
    result = batch_predict_flow(str(batch), str(tmp_path / "out" / "batch.csv"))
    assert result["drift"]["drifted"] and result["drift"]["reasons"], result["drift"]
    assert result["drift"]["event_sent"] and result["drift"]["mlflow_run_id"]
    assert _wait_for_runs(retrain.id, before + 1) >= before + 1
    monitoring = make_client(os.environ["CXR_TRACKING_URI"]).get_run(
        result["drift"]["mlflow_run_id"])
    assert monitoring.data.tags["cxr.drifted"] == "true"
    assert "drift_p_embeddings" in monitoring.data.metrics

    # `cxr predict` on the same batch, with the stack's Prefect server configured.
    out = tmp_path / "cli" / "preds.csv"
    res = CliRunner().invoke(app, ["predict", str(batch), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "drift check: DRIFTED" in res.output and "cxr.drift.detected sent" in res.output
    assert _wait_for_runs(retrain.id, before + 2) >= before + 2
