"""A whole run on DICOM input (the synthetic set with fake identifiers planted in every
header): the retrain flow under the Prefect test harness against a real `mlflow server`,
then `cxr predict`. Every file the run left (run folder, MLflow's database and artifact
store, Prefect's database, prediction outputs) is searched for the planted identifiers."""

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
N_PER_CLASS = 24
TINY = {
    "data": {"image_size": 32, "min_val_images": 0},
    "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
    "tune": {"algorithm": "random", "max_trials": 1, "max_epochs": 1},
    "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 1},
    "gates": {"min_recall": 0.0, "min_accuracy": 0.0},
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
        assert url.startswith("sqlite"), url  # the harness keeps its database in a file
        yield Path(url.split(":///", 1)[-1])


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
    res = CliRunner().invoke(app, ["predict", str(dicom_data / "test"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) > 1
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
