"""The Prefect flows end to end under the Prefect test harness, against a real `mlflow
server` subprocess whose artifacts go to moto's S3 server (a real HTTP endpoint on
127.0.0.1), plus the fault cases: MLflow down during registration, S3 down, gate failure,
validation failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from flows.servers import free_port
from support.images import make_good_dataset
from support.servers import mlflow_server

pytestmark = pytest.mark.integration
SECRET = "s3cr3t-Value-7f3a9c"   # moto accepts any key; this one must never be logged
BUCKET = "cxr-test"
TINY = {
    "data": {"image_size": 32, "min_val_images": 0},
    "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
    "tune": {"algorithm": "random", "max_trials": 2, "max_epochs": 1},
    "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 1},
    "gates": {"min_recall": 0.0, "min_accuracy": 0.0},
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    keys = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=url, aws_access_key_id="test-key-id",
                 aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield url, keys
    server.stop()


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    url, keys = s3
    env = {"MLFLOW_S3_ENDPOINT_URL": url, **keys}
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), "sqlite", env=env,
                       artifacts_destination=f"s3://{BUCKET}/mlflow") as server:
        yield server


@pytest.fixture(scope="module")
def env(tracking, s3, tmp_path_factory, harness):
    url, keys = s3
    home = tmp_path_factory.mktemp("cxr-home")
    values = {"CXR_HOME": str(home), "CXR_TRACKING_URI": tracking.url,
              "CXR_S3_ENDPOINT_URL": url, "CXR_S3_BUCKET": BUCKET, "CXR_S3_PREFIX": "cxr",
              "CXR_S3_SECRET_ACCESS_KEY": SECRET, "CXR_S3_ACCESS_KEY_ID": "test-key-id",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", **keys}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_good_dataset(tmp_path_factory.mktemp("flowdata") / "data", n_patients=10, imgs=2)


def _config(tmp: Path, **override) -> str:
    from cxr_core.config import deep_merge

    f = tmp / "cfg.yaml"
    f.write_text(json.dumps(deep_merge(TINY, override)))
    return str(f)


def _flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_retrain_end_to_end_registers_and_stores_in_s3(env, data, tracking, s3, tmp_path) -> None:
    from cxr_core.lifecycle.predict import load_model
    from cxr_core.lifecycle.tracking import make_client
    from flows.retrain import retrain_flow

    # Calibration and test-time augmentation on: the wrapped model must survive logging,
    # registration, Grad-CAM figures and loading through models:/.
    config = _config(tmp_path, train={"calibrate": True, "tta": True})
    state = retrain_flow(data_dir=str(data), profile="quick", config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["model_version"] == "1" and result["gate_passed"] is True
    assert "accuracy" in result["robust_worst"] and "calibration" in result
    assert set(result["stage_seconds"]) == {"validate", "balance", "tune", "train", "evaluate",
                                            "log_and_register"}
    assert result["trials"] == 2 and all(v >= 0 for v in result["stage_seconds"].values())
    assert result["mlflow_run_url"].startswith(f"{tracking.url}/#/experiments/")
    # Artifacts of the MLflow server and the run's data artifacts are objects in the bucket.
    c = boto3.client("s3", endpoint_url=s3[0], aws_access_key_id="test-key-id",
                     aws_secret_access_key=SECRET, region_name="us-east-1")
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, MaxKeys=1000)["Contents"]]
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("model_card.md") for k in keys)
    run_name = Path(result["run_dir"]).name
    assert f"cxr/runs/{run_name}/manifest.parquet" in keys
    assert f"cxr/runs/{run_name}/augmentation_lineage.csv" in keys
    assert result["data_artifacts"]
    # The registered model loads through its models:/ URI.
    loaded = load_model("models:/cxr-pneumonia/1", tracking.url)
    assert loaded.image_size == 32 and 0 < loaded.threshold < 1
    assert loaded.model.name == "cxr_cnn_tta"
    # One parent run with nested trial runs and the final run.
    client = make_client(tracking.url)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = sorted(r.data.tags.get("cxr.stage") for r in children)
    assert stages == ["final", "tuning", "tuning"]
    final = next(r for r in children if r.data.tags["cxr.stage"] == "final")
    assert "test_recall" in final.data.metrics and "test_recall_ci_low" in final.data.metrics
    assert "robust_worst_accuracy" in final.data.metrics  # the robustness report is logged
    # The shifted validation set is scored every epoch, in trials and the final training.
    assert "val_shift_auc" in final.data.metrics
    assert all("val_shift_auc" in r.data.metrics for r in children)
    assert "robust_jpeg_q30_accuracy" in final.data.metrics
    assert (Path(result["run_dir"]) / "evaluation" / "robustness.csv").is_file()
    assert final.data.tags["cxr.manifest_hash"] and final.data.tags["cxr.git_commit"]
    assert final.inputs.dataset_inputs, "dataset lineage is logged"
    # No secret value in any param, tag or flow log.
    for run in [parent, *children]:
        blob = json.dumps({**run.data.params, **run.data.tags})
        assert SECRET not in blob
    assert SECRET not in _flow_logs(state.state_details.flow_run_id)


def test_gate_failure_leaves_the_champion(env, data, tracking, tmp_path) -> None:
    from cxr_core.errors import GateRejected
    from cxr_core.lifecycle.promotion import promote
    from cxr_core.lifecycle.registry import CHAMPION
    from cxr_core.lifecycle.tracking import make_client
    from flows.retrain import retrain_flow

    client = make_client(tracking.url)
    if not client.search_model_versions("name='cxr-pneumonia'"):
        retrain_flow(data_dir=str(data), profile="quick", config=_config(tmp_path))
    champion = client.get_model_version_by_alias("cxr-pneumonia", CHAMPION).version if any(
        CHAMPION in v.aliases for v in client.search_model_versions("name='cxr-pneumonia'")) \
        else promote(client, "cxr-pneumonia", "1").promoted_version
    n_versions = len(client.search_model_versions("name='cxr-pneumonia'"))
    strict = _config(tmp_path, gates={"min_recall": 1.0, "min_accuracy": 1.0})
    state = retrain_flow(data_dir=str(data), profile="quick", config=strict, return_state=True)
    assert state.is_failed()
    assert "gates rejected" in state.message and "min_accuracy" in state.message
    with pytest.raises(GateRejected):
        state.result()
    assert client.get_model_version_by_alias("cxr-pneumonia", CHAMPION).version == champion
    assert len(client.search_model_versions("name='cxr-pneumonia'")) == n_versions


def test_validation_failure_fails_early_naming_files(env, malformed_corpus, tmp_path) -> None:
    from flows.retrain import retrain_flow

    state = retrain_flow(data_dir=str(malformed_corpus["root"]), profile="quick",
                         config=_config(tmp_path), return_state=True)
    assert state.is_failed()
    assert str(malformed_corpus["truncated"].resolve()) in state.message


def test_validation_is_cached_for_unchanged_data(env, data, tmp_path) -> None:
    from prefect import flow

    from cxr_core.config import load_config
    from flows import tasks

    cfg = load_config(Path(_config(tmp_path, seed=7)), "quick")  # a key no other test used

    @flow
    def twice():
        a = tasks.validate(data, cfg, tmp_path / "run-a")
        b = tasks.validate(data, cfg, tmp_path / "run-b")
        return a, b

    a, b = twice()
    assert a.manifest_path == b.manifest_path == tmp_path / "run-a" / "manifest.parquet"
    assert not (tmp_path / "run-b").exists()  # the second call did no work

    @flow
    def adopt(run: str):
        return tasks.validated_data(data, cfg, tmp_path / run)

    c = adopt("run-c")  # the cached verdict, its files copied into the new run
    assert c.manifest_path == tmp_path / "run-c" / "manifest.parquet"
    assert c.manifest_path.is_file() and (tmp_path / "run-c" / "validation").is_dir()
    assert c.manifest_hash == a.manifest_hash

    import shutil

    shutil.rmtree(tmp_path / "run-a")  # the cached run's files are gone: validate again
    d = adopt("run-d")
    assert d.manifest_path == tmp_path / "run-d" / "manifest.parquet" and d.manifest_path.is_file()
    assert d.manifest_hash == a.manifest_hash


def _counting(monkeypatch, module, name: str) -> list[int]:
    """Count calls of ``module.name`` (each task attempt calls it once)."""
    calls: list[int] = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_register_retries_then_fails_cleanly_when_mlflow_is_down(env, tmp_path,
                                                                  monkeypatch) -> None:
    from prefect import flow

    from cxr_core import stages
    from cxr_core.evaluation.gates import GateDecision
    from cxr_core.lifecycle.tracking import TrackingRefs, ensure_experiment, make_client, start_run
    from flows import tasks

    backend = tmp_path / "srv"
    backend.mkdir()
    with mlflow_server(backend, "sqlite") as server:
        client = make_client(server.url)
        exp = ensure_experiment(client, "fault")
        parent = start_run(client, exp, "p")
        final = start_run(client, exp, "f", parent_run_id=parent)
        url = server.url
    refs = TrackingRefs(exp, parent, final)
    calls = _counting(monkeypatch, stages, "register_stage")

    class _Eval:
        def point(self):
            return {"accuracy": 0.9}

    class _Trained:
        class threshold:  # noqa: N801
            threshold = 0.5

    evaluated = type("E", (), {"evaluation": _Eval()})()

    @flow
    def register_while_down():
        state = tasks.register.with_options(retry_delay_seconds=0)(
            url, refs, "fault-model", GateDecision(True, ()), _Trained(), evaluated, "h",
            return_state=True)
        return state.is_failed(), state.message

    failed, message = register_while_down()
    assert failed and "Connection refused" in message
    assert len(calls) == 4  # the first try and three retries
    # Back up on the same backend: nothing was registered.
    with mlflow_server(backend, "sqlite") as server:
        client = make_client(server.url)
        assert client.search_model_versions("name='fault-model'") == []


def test_s3_outage_is_retried_then_reported(env, tmp_path, monkeypatch) -> None:
    from prefect import flow

    from cxr_core.lifecycle import storage
    from flows import tasks

    calls = _counting(monkeypatch, storage, "upload_run_data")
    run_dir = tmp_path / "run"
    (run_dir / "validation").mkdir(parents=True)
    (run_dir / "manifest.parquet").write_bytes(b"x")
    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    @flow
    def upload_while_down():
        state = tasks.upload_data_artifacts.with_options(retry_delay_seconds=0)(
            run_dir, return_state=True)
        return state.is_failed(), state.message

    failed, message = upload_while_down()
    assert failed and "s3://" in message
    assert len(calls) == 4
    assert SECRET not in message


def test_flow_killed_during_tuning_resumes_without_rerunning_trials(data, tmp_path) -> None:
    """`cxr run` killed mid-search, then `cxr run --resume RUN`: completed trials stay done."""
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    cfg = _config(tmp_path, tune={"algorithm": "random", "max_trials": 3, "max_epochs": 2})
    env = {**os.environ, "CXR_HOME": str(home), "CXR_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
           "PREFECT_HOME": str(tmp_path / "prefect"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for key in ("PREFECT_API_URL", "CXR_S3_BUCKET", "CXR_S3_ENDPOINT_URL"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data-dir", str(data), "--config", cfg,
           "--profile", "quick"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    done: list[Path] = []
    while time.monotonic() < deadline and not done:
        done = list(home.glob("runs/*/tuner/search/trial_*/epochs.json"))
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert done, "no trial finished before the deadline"
    stamps = {p: p.stat().st_mtime_ns for p in home.glob("runs/*/tuner/search/trial_*/epochs.json")}
    (run_dir,) = list((home / "runs").iterdir())
    out = subprocess.run(cmd + ["--resume", run_dir.name, "--json-out", str(tmp_path / "r.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.parent.name} was rerun"
    trials = list(run_dir.glob("tuner/search/trial_*/epochs.json"))
    assert len(trials) == 3
    assert "registered models:/cxr-pneumonia/1" in out.stdout
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["model_version"] == "1" and written["trials"] == 3
    assert "tune" in written["stage_seconds"] and "stage times" in out.stdout
