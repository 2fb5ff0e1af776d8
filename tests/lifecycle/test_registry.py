"""Tracking and registry against a real `mlflow server` subprocess (sqlite, and PostgreSQL
when CXR_TEST_POSTGRES_URL is set; fixtures in conftest.py): nested runs, registration only on
pass, aliases, promotion, forced promotion, rollback, concurrent registration, prediction by
alias, MLflow 3 logged models. Each test registers under its own model name."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core.lifecycle.promotion import PromotionRejected, PromotionResult, promote, rollback
from cxr_core.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    PREDICTIONS_ARTIFACT,
    PREVIOUS,
    TEST_IMAGES_TAG,
    TEST_PREDICTIONS_TAG,
    TEST_SET_DIGEST_TAG,
    list_versions,
    log_keras_model,
)
from cxr_core.lifecycle.serving import write_model_folder
from cxr_core.lifecycle.tracking import log_trials, start_run
from cxr_core.training.search import TrialResult

pytestmark = pytest.mark.integration


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


def test_register_only_on_pass_and_challenger_alias(client, registrar, model_name) -> None:
    preds = registrar.predictions(registrar.hashes(0, 40))
    rejected_run, none = registrar.candidate(model_name, preds, passed=False)
    assert none is None
    assert client.get_run(rejected_run).data.tags["cxr.gate_passed"] == "false"
    assert not client.search_model_versions(f"name='{model_name}' and run_id='{rejected_run}'")
    run_id, version = registrar.candidate(model_name, preds)
    mv = client.get_model_version_by_alias(model_name, CHALLENGER)
    assert mv.version == version and mv.run_id == run_id
    assert mv.tags["cxr.threshold"] == "0.500000" and mv.tags["cxr.gate_passed"] == "true"
    # Short, filterable tags (no raw JSON); the decision reads as the version's description.
    assert mv.tags["cxr.gate_failed"] == "none" and "cxr.gate_decision" not in mv.tags
    assert "Gate decision: PASSED" in mv.description
    assert client.get_run(rejected_run).data.tags["cxr.gate_failed"] == "min_recall"


def test_version_records_its_test_images(client, registrar, model_name, tmp_path) -> None:
    hashes = registrar.hashes(100, 137)
    run_id, version = registrar.candidate(model_name, registrar.predictions(hashes),
                                          with_model=False)
    tags = client.get_model_version(model_name, version).tags
    assert tags[TEST_IMAGES_TAG] == "37"
    assert tags[TEST_SET_DIGEST_TAG] == hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    # The version points at the file holding the hashes, in its own run.
    assert tags[TEST_PREDICTIONS_TAG] == PREDICTIONS_ARTIFACT
    recorded = pd.read_csv(client.download_artifacts(run_id, tags[TEST_PREDICTIONS_TAG], tmp_path))
    assert sorted(recorded["sha256"]) == sorted(hashes)


def test_first_promotion_has_no_comparison(client, registrar, model_name) -> None:
    _, v1 = registrar.candidate(model_name, registrar.predictions(registrar.hashes(0, 40)),
                                with_model=False)
    assert promote(client, model_name, actor="ci") == PromotionResult(v1, None, False, None)
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v1
    tags = client.get_model_version(model_name, v1).tags
    assert tags["cxr.promotion_comparison"] == "none"
    assert tags["cxr.promotion_reason"] == "passed champion comparison"
    assert tags["cxr.promoted_by"] == "ci"
    assert {v.version: v.aliases for v in list_versions(client, model_name)} == {v1: [CHAMPION]}


def test_promote_compare_force_and_rollback(client, registrar, model_name) -> None:
    hashes = registrar.hashes(0, 60)
    good = np.ones(60, bool)
    _, v1 = registrar.candidate(model_name, registrar.predictions(hashes, good), with_model=False)
    promote(client, model_name, v1)
    # A clearly worse challenger is refused and the champion stays.
    worse = good.copy()
    worse[:30] = False
    _, v2 = registrar.candidate(model_name, registrar.predictions(hashes, worse),
                                with_model=False)
    with pytest.raises(PromotionRejected, match="regresses"):
        promote(client, model_name, v2)
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v1
    with pytest.raises(PromotionRejected, match="reason"):
        promote(client, model_name, v2, force=True)
    forced = promote(client, model_name, v2, force=True, reason="incident 42: new scanner")
    assert forced.forced and client.get_model_version_by_alias(model_name, CHAMPION).version == v2
    assert forced.comparison["shared_images"] == 60 and not forced.comparison["passed"]
    assert client.get_model_version_by_alias(model_name, PREVIOUS).version == v1
    tags = client.get_model_version(model_name, v2).tags
    assert tags["cxr.promotion_forced"] == "true"
    assert tags["cxr.promotion_reason"] == "incident 42: new scanner"
    assert tags["cxr.promoted_by"] and tags["cxr.promoted_at"]
    back = rollback(client, model_name, reason="bad week")
    assert back.promoted_version == v1
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v1
    assert client.get_model_version_by_alias(model_name, PREVIOUS).version == v2
    listed = {v.version: v for v in list_versions(client, model_name)}
    assert CHAMPION in listed[v1].aliases and PREVIOUS in listed[v2].aliases


def test_failed_gates_can_never_be_champion(client, registrar, model_name) -> None:
    preds = registrar.predictions(registrar.hashes(0, 40))
    _, champion = registrar.candidate(model_name, preds, with_model=False)
    promote(client, model_name, champion)
    run_id, _ = registrar.candidate(model_name, preds, passed=False, with_model=False)
    # Even a version registered by hand without a passing gate tag is refused, with --force.
    mv = client.create_model_version(model_name, f"runs:/{run_id}/model", run_id=run_id)
    with pytest.raises(PromotionRejected, match="did not pass its gates"):
        promote(client, model_name, str(mv.version), force=True, reason="try")
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == champion


def test_two_processes_register_at_once(server, client, exp_id, model_dir, model_name,
                                        image_size) -> None:
    runs = [start_run(client, exp_id, f"concurrent-{i}") for i in range(2)]
    for r in runs:
        log_keras_model(client, r, model_dir, image_size)
    script = (
        "import sys; from cxr_core.lifecycle.tracking import make_client;"
        "from cxr_core.lifecycle.registry import register_if_blessed;"
        "from cxr_core.evaluation.gates import GateDecision;"
        "c = make_client(sys.argv[1]);"
        "d = GateDecision(True, ());"
        "print(register_if_blessed(c, sys.argv[2], sys.argv[3], d, 0.5, 'h', {}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, server.url, model_name, r],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in runs]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    versions = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert versions == ["1", "2"]
    registered = client.search_model_versions(f"name='{model_name}'")
    assert sorted(mv.run_id for mv in registered) == sorted(runs)
    # The newest passing version is the challenger, whichever process finished last.
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version in (2, "2")


def test_newest_blessed_version_and_every_version_page_by_page(client, registrar,
                                                               model_name) -> None:
    """The server picks the newest passing version (a newer one without a passing gate tag
    does not count); listing reads every page, not only the first."""
    from cxr_core.lifecycle.registry import _all_versions, _newest_blessed

    preds = registrar.predictions(registrar.hashes(0, 20))
    blessed = [registrar.candidate(model_name, preds, with_model=False)[1] for _ in range(3)]
    run_id, _ = registrar.candidate(model_name, preds, passed=False, with_model=False)
    newer = client.create_model_version(model_name, f"runs:/{run_id}/model", run_id=run_id)
    assert int(newer.version) == 4
    assert _newest_blessed(client, model_name) == int(blessed[-1]) == 3
    assert sorted(int(mv.version) for mv in _all_versions(client, model_name, page_size=3)) \
        == [1, 2, 3, 4]
    assert [v.version for v in list_versions(client, model_name)] == ["4", "3", "2", "1"]


class _LateWriter:
    """A client through which an older registration writes its alias late: the newer
    registration runs to its end between the older one's first read and its write."""

    def __init__(self, client, newer) -> None:
        self._client, self._newer, self._raced = client, newer, False

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def get_model_version_by_alias(self, name, alias):
        answer = self._client.get_model_version_by_alias(name, alias)
        if not self._raced:
            self._raced = True
            self._newer()
        return answer


def test_the_newest_registration_keeps_the_challenger_when_an_older_one_writes_last(
        client, registrar, model_name) -> None:
    from cxr_core.lifecycle.registry import _point_challenger

    preds = registrar.predictions(registrar.hashes(0, 20))
    _, v1 = registrar.candidate(model_name, preds, with_model=False)
    _, v2 = registrar.candidate(model_name, preds, with_model=False)
    _, v3 = registrar.candidate(model_name, preds, with_model=False)
    client.set_registered_model_alias(model_name, CHALLENGER, v1)  # before either finished
    late = _LateWriter(client, lambda: _point_challenger(client, model_name, v3))
    _point_challenger(late, model_name, v2)
    assert late._raced
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version in (3, "3")


def test_predict_by_champion_alias_skips_bad_files(server, client, registrar, model_name,
                                                   image_size, tmp_path) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc

    from cxr_core.lifecycle.predict import (
        collect_paths,
        load_model,
        model_artifact_uri,
        predict_paths,
        write_predictions,
    )

    _, version = registrar.candidate(model_name, registrar.predictions(registrar.hashes(0, 40)))
    promote(client, model_name, version)
    folder = tmp_path / "incoming"
    for i, level in enumerate((20, 70, 120, 170, 220)):  # five brightness levels: five scores
        pixels = np.clip(level + np.random.default_rng(i).normal(0, 20, (40, 40)), 0, 255)
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "sub" / f"img{i}.jpeg")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"x")
    files, skipped = collect_paths([folder])
    assert len(files) == 6 and any(p.endswith("notes.txt") for p, _ in skipped)
    uri = f"models:/{model_name}@{CHAMPION}"
    loaded = load_model(uri, server.url)
    assert loaded.threshold == 0.5 and loaded.image_size == image_size
    preds, errors = predict_paths(loaded, files, workers=1)
    assert len(preds) == 5 and list(errors["path"]) == [str((folder / "broken.jpeg").resolve())]
    assert set(preds["label"]) <= {"NORMAL", "PNEUMONIA"}
    assert ((preds["probability"] >= 0.5) == (preds["label"] == "PNEUMONIA")).all()
    errors_path = write_predictions(preds, errors, tmp_path / "out" / "preds.csv")
    assert len(pd.read_csv(tmp_path / "out" / "preds.csv")) == 5
    assert errors_path is not None and len(pd.read_csv(errors_path)) == 1
    assert write_predictions(preds, errors.iloc[:0], tmp_path / "clean.csv") is None
    # The registered model as pyfunc (mlflow.keras flavor, signature) gives the same
    # probabilities as `cxr predict` on the same files, decoded as training decodes them.
    from cxr_core.data.inputs import load_images

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_artifact_uri(client, uri), dst_path=str(tmp_path / "pyfunc"),
        tracking_uri=server.url)
    pyfunc = mlflow.pyfunc.load_model(local)  # the image pyfunc (lifecycle.serving)
    served = pyfunc.predict(pd.DataFrame({"path": preds["path"].tolist()}))
    out = served["probability"].to_numpy(np.float64)
    assert np.ptp(out) > 0.05  # the model's outputs differ across files: a real comparison
    np.testing.assert_allclose(out, preds["probability"].to_numpy(), atol=1e-5)
    # The keras flavor still takes pixel tensors, decoded as training decodes them.
    import mlflow.keras

    net = mlflow.keras.load_model(local)
    pixels = load_images(preds["path"].tolist(), image_size)
    np.testing.assert_allclose(np.asarray(net.predict(pixels, verbose=0), np.float64).ravel(),
                               preds["probability"].to_numpy(), atol=1e-5)


def test_load_mlflow3_logged_model_by_alias_version_and_id(server, client, exp_id, model_dir,
                                                           model_name, image_size,
                                                           tmp_path) -> None:
    """A version registered the MLflow 3 way: its source is the logged model (models:/m-...),
    not a run artifact path."""
    import keras

    from cxr_core.lifecycle.predict import load_model

    run_id = start_run(client, exp_id, "final-training")
    logged = client.create_logged_model(exp_id, name="model", source_run_id=run_id)
    local = write_model_folder(model_dir, tmp_path / "model")
    client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, "READY")
    client.create_registered_model(model_name)
    mv = client.create_model_version(model_name, source=f"models:/{logged.model_id}",
                                     run_id=run_id, model_id=logged.model_id)
    assert mv.source.startswith("models:/m-")
    client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    x = np.random.default_rng(1).uniform(0, 255, (4, image_size, image_size, 1)).astype("float32")
    expected = np.asarray(keras.models.load_model(model_dir / "model.keras")(x)).ravel()
    for uri in (f"models:/{model_name}@{CHAMPION}", f"models:/{model_name}/{mv.version}",
                f"models:/{logged.model_id}"):
        loaded = load_model(uri, server.url)
        assert (loaded.threshold, loaded.image_size, loaded.source) == (0.5, image_size, uri)
        np.testing.assert_allclose(loaded.predict_arrays(x), expected, atol=1e-6)


def test_listing_an_unknown_model_is_empty_but_a_refusing_server_is_an_error(client) -> None:
    from mlflow.exceptions import MlflowException

    assert list_versions(client, "no-such-model-anywhere") == []

    class Refusing:
        def get_registered_model(self, name: str):
            raise MlflowException("forbidden", error_code="PERMISSION_DENIED")

    with pytest.raises(MlflowException, match="forbidden"):
        list_versions(Refusing(), "cxr-pneumonia")
