"""Tracking and registry against a real `mlflow server` subprocess (sqlite, and PostgreSQL
when CXR_TEST_POSTGRES_URL is set): nested runs, registration only on pass, aliases,
promotion, forced promotion, rollback, concurrent registration, prediction by alias."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.evaluation.gates import GateThresholds, decide
from cxr_core.lifecycle.promotion import PromotionRejected, promote, rollback
from cxr_core.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    PREDICTIONS_ARTIFACT,
    PREVIOUS,
    list_versions,
    log_keras_model,
    register_if_blessed,
)
from cxr_core.lifecycle.tracking import ensure_experiment, log_trials, make_client, start_run
from cxr_core.training.search import TrialResult
from support.images import write_image
from support.servers import POSTGRES_ENV, mlflow_server

pytestmark = pytest.mark.integration
NAME = "cxr-test-model"
SIZE = 16


def _backends() -> list:
    marks = pytest.mark.skipif(not os.environ.get(POSTGRES_ENV),
                               reason=f"{POSTGRES_ENV} is not set")
    return ["sqlite", pytest.param("postgres", marks=marks)]


@pytest.fixture(scope="module", params=_backends())
def server(request, tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp(f"mlflow-{request.param}"), request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny saved cxr model with its threshold."""
    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import build_cnn

    d = tmp_path_factory.mktemp("model")
    build_cnn(SIZE, blocks=3, base_filters=8, dense_units=0).save(d / "model.keras")
    save_threshold(d / "threshold.json", ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20))
    return d


def _interval(v):
    from cxr_core.evaluation.metrics import Interval

    return Interval(v, v - 0.01, v + 0.01)


def _candidate(client, exp_id, model_dir, tmp: Path | None, correct: np.ndarray, passed: bool = True,
               labels: np.ndarray | None = None) -> tuple[str, str | None]:
    """Log a run with the model and per-image test predictions; register it if ``passed``."""
    run_id = start_run(client, exp_id, "final-training", params={"data.image_size": SIZE},
                       tags={"cxr.stage": "final"})
    log_keras_model(client, run_id, model_dir, SIZE)
    y = labels if labels is not None else np.array([1, 0] * (len(correct) // 2))
    pred = np.where(correct, y, 1 - y)
    preds = pd.DataFrame({"path": [f"/t/{i}.jpeg" for i in range(len(y))],
                          "sha256": [f"{i:064d}" for i in range(len(y))], "label": y,
                          "probability": np.where(pred == 1, 0.9, 0.1), "prediction": pred})
    client.log_text(run_id, preds.to_csv(index=False), PREDICTIONS_ARTIFACT)
    metrics = {"recall": _interval(0.97 if passed else 0.5), "accuracy": _interval(0.95)}
    decision = decide(metrics, GateThresholds())
    version = register_if_blessed(client, NAME, run_id, decision, 0.5, "hash", {"accuracy": 0.95})
    client.set_terminated(run_id)
    return run_id, version


@pytest.fixture(scope="module")
def client(server):
    return make_client(server.url)


@pytest.fixture(scope="module")
def exp_id(client):
    return ensure_experiment(client, "cxr-test")


def test_parent_with_nested_trial_runs(client, exp_id) -> None:
    parent = start_run(client, exp_id, "retrain-x", params={"tune.max_trials": 2},
                       tags={"cxr.manifest_hash": "abc"})
    trials = [TrialResult("0", "COMPLETED", 0.8, {"blocks": 3, "learning_rate": 1e-3},
                          {"val_auc": [0.6, 0.8], "loss": [0.7, 0.5]}),
              TrialResult("1", "FAILED", None, {"blocks": 4, "learning_rate": 1e-4}, {})]
    ids = log_trials(client, exp_id, parent, trials)
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == set(ids)
    first = client.get_run(ids[0])
    assert first.data.params["hp.blocks"] == "3"
    history = client.get_metric_history(ids[0], "val_auc")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.6), (1, 0.8)]
    assert client.get_run(ids[1]).info.status == "FAILED"


def test_register_only_on_pass_and_challenger_alias(client, exp_id, model_dir, tmp_path) -> None:
    rejected_run, none = _candidate(client, exp_id, model_dir, tmp_path, np.ones(40, bool),
                                    passed=False)
    assert none is None
    assert client.get_run(rejected_run).data.tags["cxr.gate_passed"] == "false"
    assert not client.search_model_versions(f"name='{NAME}' and run_id='{rejected_run}'")
    run_id, version = _candidate(client, exp_id, model_dir, tmp_path, np.ones(40, bool))
    mv = client.get_model_version_by_alias(NAME, CHALLENGER)
    assert mv.version == version and mv.run_id == run_id
    assert mv.tags["cxr.threshold"] == "0.500000" and mv.tags["cxr.gate_passed"] == "true"
    assert json.loads(mv.tags["cxr.gate_decision"])["passed"] is True


def test_promote_compare_force_and_rollback(client, exp_id, model_dir, tmp_path) -> None:
    good = np.ones(60, bool)
    _, v1 = _candidate(client, exp_id, model_dir, tmp_path, good)
    first = promote(client, NAME, v1)
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v1
    assert first.comparison is None or first.comparison["passed"]
    # A clearly worse challenger is refused and the champion stays.
    worse = good.copy()
    worse[:30] = False
    _, v2 = _candidate(client, exp_id, model_dir, tmp_path, worse)
    with pytest.raises(PromotionRejected, match="regresses"):
        promote(client, NAME, v2)
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v1
    with pytest.raises(PromotionRejected, match="reason"):
        promote(client, NAME, v2, force=True)
    forced = promote(client, NAME, v2, force=True, reason="incident 42: new scanner")
    assert forced.forced and client.get_model_version_by_alias(NAME, CHAMPION).version == v2
    assert client.get_model_version_by_alias(NAME, PREVIOUS).version == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags["cxr.promotion_forced"] == "true"
    assert tags["cxr.promotion_reason"] == "incident 42: new scanner"
    assert tags["cxr.promoted_by"] and tags["cxr.promoted_at"]
    back = rollback(client, NAME, reason="bad week")
    assert back.promoted_version == v1
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v1
    assert client.get_model_version_by_alias(NAME, PREVIOUS).version == v2
    listed = {v.version: v for v in list_versions(client, NAME)}
    assert CHAMPION in listed[v1].aliases and PREVIOUS in listed[v2].aliases


def test_failed_gates_can_never_be_champion(client, exp_id, model_dir, tmp_path) -> None:
    before = client.get_model_version_by_alias(NAME, CHAMPION).version
    run_id, _ = _candidate(client, exp_id, model_dir, tmp_path, np.ones(40, bool), passed=False)
    # Even a version registered by hand without a passing gate tag is refused, with --force.
    mv = client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id)
    with pytest.raises(PromotionRejected, match="did not pass its gates"):
        promote(client, NAME, str(mv.version), force=True, reason="try")
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == before


def test_two_processes_register_at_once(server, client, exp_id, model_dir, tmp_path) -> None:
    runs = [start_run(client, exp_id, f"concurrent-{i}") for i in range(2)]
    for r in runs:
        log_keras_model(client, r, model_dir, SIZE)
    script = (
        "import sys; from cxr_core.lifecycle.tracking import make_client;"
        "from cxr_core.lifecycle.registry import register_if_blessed;"
        "from cxr_core.evaluation.gates import GateDecision;"
        "c = make_client(sys.argv[1]);"
        "d = GateDecision(True, ());"
        "print(register_if_blessed(c, sys.argv[2], sys.argv[3], d, 0.5, 'h', {}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, server.url, "cxr-concurrent", r],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in runs]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    versions = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert versions == ["1", "2"]
    registered = client.search_model_versions("name='cxr-concurrent'")
    assert sorted(mv.run_id for mv in registered) == sorted(runs)
    # The newest passing version is the challenger, whichever process finished last.
    assert client.get_model_version_by_alias("cxr-concurrent", CHALLENGER).version in (2, "2")


def test_predict_by_champion_alias_skips_bad_files(server, tmp_path) -> None:
    from cxr_core.lifecycle.predict import collect_paths, load_model, predict_paths

    folder = tmp_path / "incoming"
    for i in range(5):
        write_image(folder / "sub" / f"img{i}.jpeg", i, size=40)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"x")
    files, skipped = collect_paths([folder])
    assert len(files) == 6 and any(p.endswith("notes.txt") for p, _ in skipped)
    loaded = load_model(f"models:/{NAME}@{CHAMPION}", server.url)
    assert loaded.threshold == 0.5 and loaded.image_size == SIZE
    preds, errors = predict_paths(loaded, files, workers=1)
    assert len(preds) == 5 and list(errors["path"]) == [str((folder / "broken.jpeg").resolve())]
    assert set(preds["label"]) <= {"NORMAL", "PNEUMONIA"}
    assert ((preds["probability"] >= 0.5) == (preds["label"] == "PNEUMONIA")).all()
    from cxr_core.lifecycle.predict import write_predictions

    errors_path = write_predictions(preds, errors, tmp_path / "out" / "preds.csv")
    assert len(pd.read_csv(tmp_path / "out" / "preds.csv")) == 5
    assert errors_path is not None and len(pd.read_csv(errors_path)) == 1
    assert write_predictions(preds, errors.iloc[:0], tmp_path / "clean.csv") is None
    # The keras flavor takes pixel tensors; the pyfunc takes images (lifecycle.serving).
    import mlflow.keras
    import mlflow.pyfunc

    mlflow.set_tracking_uri(server.url)
    try:
        net = mlflow.keras.load_model(f"models:/{NAME}@{CHAMPION}")
        out = net.predict(np.full((2, SIZE, SIZE, 1), 100.0, np.float32), verbose=0)
        assert np.asarray(out).shape == (2, 1)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
        served = pyfunc.predict(pd.DataFrame({"path": list(preds["path"])}))
        assert np.allclose(served["probability"], preds["probability"], atol=1e-5)
    finally:
        mlflow.set_tracking_uri("")
