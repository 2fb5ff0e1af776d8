"""The Prefect flows end to end under the Prefect test harness, against a real `mlflow
server` subprocess whose artifacts go to moto's S3 server (a real HTTP endpoint on
127.0.0.1), plus the fault cases: MLflow down during registration, S3 down, gate failure,
validation failure, resume refusals, --json-out records and the promote flow's alpha."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import boto3
import pytest

from flows.cli import app
from flows.servers import free_port
from support.images import make_good_dataset, write_image
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


# A data set with something to learn (the synthetic generator's lung opacities) and the
# budget to learn it (TINY on random images learns nothing: its AUC is chance). At 64 px the
# search's best point reached test ROC-AUC 0.60 on this machine and 0.82 on another (training
# on the edge of learning: the numeric path decided); at 96 px, the quick profile's size, the
# two trials' points reach 0.947 and 0.846 in about 30 s of training each.
LEARNABLE = {
    "data": {"image_size": 96},
    "train": {"epochs": 15, "batch_size": 8, "early_stopping_patience": 15,
              "intensity_norm": "standardize"},
    # Accuracy at the recall-targeted threshold swings between runs of this small set; the
    # learning itself is asserted on ROC-AUC (>= 0.7).
    "gates": {"min_recall": 0.6, "min_accuracy": 0.5},
}


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory) -> Path:
    from cxr_core.data.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize_dataset(root, n_per_class=200, size=96, seed=0)
    return root


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


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> dict[str, Path]:
    """Another 'site' (an external set: its train/val/test folders all count), a labelled
    calibration sample and unlabeled site images (their folder names are not read), from the
    same generator with other seeds: 40 images each."""
    from cxr_core.data.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("sites")
    out = {}
    for name, seed in (("site-b", 1), ("calibration", 2), ("unlabeled", 3)):
        synthesize_dataset(root / name, n_per_class=20, size=96, seed=seed)
        out[name] = root / name
    return out


def test_retrain_end_to_end_registers_and_stores_in_s3(env, learnable_data, site_data, tracking,
                                                       s3, tmp_path) -> None:
    from cxr_core.config import deep_merge
    from cxr_core.lifecycle.predict import load_model
    from cxr_core.lifecycle.tracking import make_client
    from flows.retrain import retrain_flow

    # Calibration and test-time augmentation on: the wrapped model must survive logging,
    # registration, Grad-CAM figures and loading through models:/. An external set with a
    # gate, and a site-calibration sample, ride along (scored after training: no extra run),
    # and unlabeled site images add a pseudo-label round to the final training.
    config = _config(tmp_path, **deep_merge(LEARNABLE, {
        "train": {"calibrate": True, "tta": True},
        "gates": {"external": {"site-b": {"min_roc_auc": 0.3}}}}))
    state = retrain_flow(data_dir=str(learnable_data), profile="quick", config=config,
                         external={"site-b": str(site_data["site-b"])},
                         calibration=str(site_data["calibration"]),
                         unlabeled=str(site_data["unlabeled"]), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["model_version"] == "1" and result["gate_passed"] is True
    # The registered model learned: well above chance on the held-out synthetic test images.
    assert result["test_metrics"]["roc_auc"] >= 0.7, result["test_metrics"]
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
    assert loaded.image_size == 96 and 0 < loaded.threshold < 1
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
    _check_external_results(result, client, parent, final, keys, loaded)


def _check_external_results(result, client, parent, final, keys, loaded) -> None:
    """The external set and the site threshold of the end-to-end run, wherever they show."""
    from typer.testing import CliRunner

    ext = result["external_metrics"]["site-b"]
    assert 0 <= ext["roc_auc"] <= 1 and result["external_sets"]["site-b"]["scored"] == 40
    for run in (parent, final):  # logged with intervals on the parent and the final run
        assert {"external_site-b_roc_auc", "external_site-b_accuracy_ci_low",
                "external_site-b_recall_ci_high"} <= set(run.data.metrics)
    assert final.data.metrics["external_site-b_roc_auc"] == pytest.approx(ext["roc_auc"])
    assert any(k.endswith("evaluation/external/site-b/predictions.csv") for k in keys)
    assert any(k.endswith("evaluation/external/site-b/figures/roc_curve.png") for k in keys)
    contexts = {i.dataset.name: {t.value for t in i.tags} for i in final.inputs.dataset_inputs}
    assert contexts["external-site-b"] == {"external"}
    assert contexts["site-calibration"] == {"calibration"}
    assert contexts["site-unlabeled"] == {"unlabeled"}
    pseudo = result["pseudo_labels"]
    assert pseudo["unlabeled_images"] == 40 and pseudo["pseudo_normal"] + pseudo["pseudo_pneumonia"] >= 1
    assert final.data.metrics["pseudo_label_unlabeled_images"] == 40
    # Each self-training round's counts are kept, at its round number as the step.
    assert final.data.metrics["pseudo_label_rounds"] == pseudo["rounds"] == 2
    history = client.get_metric_history(final.info.run_id, "pseudo_label_pseudo_normal")
    assert sorted((m.step, m.value) for m in history) == [
        (r, c["pseudo_normal"]) for r, c in enumerate(pseudo["per_round"], start=1)]
    decision = json.loads(Path(client.download_artifacts(
        final.info.run_id, "gate_decision.json")).read_text())
    assert {"name": "external_site-b_min_roc_auc", "passed": True}.items() <= next(
        c for c in decision["checks"] if c["name"] == "external_site-b_min_roc_auc").items()
    card = Path(client.download_artifacts(final.info.run_id, "model_card.md")).read_text()
    assert "## External validation" in card and "| site-b | 40 |" in card
    # The site threshold: its own tag beside the unchanged one, and it travels with the model.
    site = result["site_threshold"]
    tags = client.get_model_version("cxr-pneumonia", "1").tags
    # Tags carry 6 decimals.
    assert float(tags["cxr.threshold"]) == pytest.approx(result["threshold"], abs=1e-6)
    assert float(tags["cxr.site_threshold"]) == pytest.approx(site["threshold"], abs=1e-6)
    assert tags["cxr.site_threshold_images"] == "40" and "cxr.external.site-b.roc_auc" in tags
    assert loaded.threshold == pytest.approx(result["threshold"])
    assert loaded.site_threshold == pytest.approx(site["threshold"])
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "external site-b: accuracy" in listed.output and "site threshold" in listed.output


def test_a_bad_external_set_fails_the_run_before_training(env, data, tmp_path) -> None:
    from cxr_core.errors import InputError
    from flows.retrain import retrain_flow

    one_class = tmp_path / "one-class"
    for i in range(3):
        write_image(one_class / "test" / "NORMAL" / f"IM-{8000 + i}-0001.jpeg", 8000 + i)
    state = retrain_flow(data_dir=str(data), profile="quick", config=_config(tmp_path),
                         external={"one": str(one_class)}, return_state=True)
    assert state.is_failed() and "external set 'one'" in state.message
    with pytest.raises(InputError) as failed:
        state.result()
    run_dir = Path(failed.value.details["run_dir"])
    assert (run_dir / "manifest.parquet").is_file()  # validated, then stopped
    assert not (run_dir / "prepared_manifest.parquet").exists() and not (run_dir / "tuner").exists()


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
    with pytest.raises(GateRejected) as rejected:
        state.result()
    # What `cxr run --json-out` writes for it: the verdict, the reason and the run's result.
    from flows.cli.run import failure_record

    record = failure_record(rejected.value)
    assert record["outcome"] == "gate_rejected" and record["exit_code"] == 1
    assert "min_accuracy" in record["reason"] and record["model_version"] is None
    assert record["gate_passed"] is False and "roc_auc" in record["test_metrics"]
    assert Path(record["run_dir"]).is_dir()
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


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    """`cxr` in a child process: its own state home, sqlite registry and Prefect server."""
    env = {**os.environ, "CXR_HOME": str(tmp_path / "home"),
           "CXR_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "TF_CPP_MIN_LOG_LEVEL": "2"}
    for key in ("PREFECT_API_URL", "CXR_S3_BUCKET", "CXR_S3_ENDPOINT_URL"):
        env.pop(key, None)
    return env


def test_flow_killed_during_tuning_resumes_without_rerunning_trials(data, tmp_path) -> None:
    """`cxr run` killed mid-search, then the resume command it printed, as printed: completed
    trials stay done, and the run goes on with its own data folder and config."""
    import signal
    import subprocess
    import sys
    import time

    from cxr_core.lifecycle.tracking import make_client

    home = tmp_path / "home"
    cfg = _config(tmp_path, tune={"algorithm": "random", "max_trials": 3, "max_epochs": 2})
    env = _subprocess_env(tmp_path)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data-dir", str(data), "--config", cfg,
           "--profile", "quick"]
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
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
    hints = re.findall(r"continue it with: (cxr run --resume \S+)", log.read_text(errors="replace"))
    assert hints == [f"cxr run --resume {run_dir.name}"], log.read_text(errors="replace")[-3000:]
    resume = [sys.executable, "-m", "flows.cli", *hints[0].split()[1:]]  # the hint, as printed
    out = subprocess.run(resume + ["--json-out", str(tmp_path / "r.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.parent.name} was rerun"
    trials = list(run_dir.glob("tuner/search/trial_*/epochs.json"))
    assert len(trials) == 3
    assert "registered models:/cxr-pneumonia/1" in out.stdout
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["model_version"] == "1" and written["trials"] == 3
    assert written["outcome"] == "registered" and written["exit_code"] == 0
    assert "tune" in written["stage_seconds"] and "stage times" in out.stdout
    # The run's own inputs, not the defaults of a bare `cxr run` (demo data, quick at 96 px).
    assert written["data_dir"] == str(data.resolve()) and written["profile"] == "quick"
    final = make_client(env["CXR_TRACKING_URI"]).get_run(written["mlflow_final_run_id"])
    assert final.data.params["data.image_size"] == "32"


def _cxr(args: list[str], capsys) -> tuple[int, str]:
    """`cxr ARGS` in this process on the real streams (captured by pytest): a flow run inside
    CliRunner would leave Prefect's console logging bound to the runner's closed stream."""
    code = app(args, standalone_mode=False, prog_name="cxr")
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_resume_refuses_changed_data_naming_it(env, tmp_path, capsys) -> None:
    from cxr_core.config import load_config
    from cxr_core.data.manifest import listing_fingerprint, manifest_hash
    from cxr_core.data.splits import scan_and_split
    from flows.run_spec import create_run, record_data

    data = make_good_dataset(tmp_path / "data", n_patients=6)
    cfg = load_config(Path(_config(tmp_path)), "quick")
    spec = create_run(Path(env["CXR_HOME"]) / "runs", data, "quick", cfg)
    spec = record_data(spec, manifest_hash(scan_and_split(data, cfg.data, cfg.seed).manifest),
                       listing_fingerprint(data))
    write_image(data / "train" / "NORMAL" / "IM-0999-0001.jpeg", 999)  # the data changed
    out = tmp_path / "r.json"
    code, output = _cxr(["run", "--resume", spec.name, "--json-out", str(out)], capsys)
    assert code == 2, output
    assert "changed since the run started" in output and str(data) in output
    record = json.loads(out.read_text())
    assert record["outcome"] == "error" and "manifest hash" in record["reason"]
    assert record["run_dir"] == str(spec.run_dir)
    assert not (spec.run_dir / "manifest.parquet").exists()  # the run was left as it was


def test_validation_failure_exits_1_with_json_and_no_traceback(env, malformed_corpus,
                                                               tmp_path) -> None:
    """The console as a user sees it: the offending files, no traceback, and the record. The
    command uses the harness's Prefect server: an ephemeral one would share the console, and
    under load it logs its own database errors there."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--data-dir",
                          str(malformed_corpus["root"]), "--config", _config(tmp_path),
                          "--json-out", str(out)],
                         env={**_subprocess_env(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()},
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    truncated = str(malformed_corpus["truncated"].resolve())
    assert "Traceback" not in res.stdout + res.stderr and truncated in res.stderr
    record = json.loads(out.read_text())
    assert record["outcome"] == "validation_failed" and record["exit_code"] == 1
    assert truncated in record["reason"] and Path(record["run_dir"]).is_dir()


def test_promote_flow_takes_regression_alpha_from_config(env, tracking, tmp_path,
                                                         monkeypatch) -> None:
    from cxr_core.lifecycle.registry import CHAMPION
    from cxr_core.lifecycle.tracking import make_client
    from flows.promote import promote_flow
    from support.registry import champion_and_weaker_challenger, tiny_model_dir

    monkeypatch.setenv("CXR_REGISTERED_MODEL_NAME", "cxr-alpha")
    client = make_client(tracking.url)
    v1, v2 = champion_and_weaker_challenger(client, tiny_model_dir(tmp_path / "m"), "cxr-alpha")
    refused = promote_flow(return_state=True)  # shipped alpha 0.05: p 0.031 is a regression
    assert refused.is_failed() and "regresses" in refused.message
    lenient = tmp_path / "alpha.yaml"
    lenient.write_text("gates: {regression_alpha: 0.01}\n")
    out = promote_flow(config=str(lenient))
    assert out["promoted_version"] == v2 and out["previous_champion"] == v1
    assert str(client.get_model_version_by_alias("cxr-alpha", CHAMPION).version) == v2


def test_a_tuner_worker_run_nobody_picks_up_is_cancelled_and_reported_gone(harness,
                                                                           tmp_path) -> None:
    """Item 4 of issue 14: with no worker polling the pool, the worker run is cancelled after
    the start timeout, named in the log, and reported gone to the chief (which then finishes
    without it) instead of the retrain waiting forever."""
    import subprocess
    import sys
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client

    from cxr_core.training.search import GONE_DIR
    from flows.deploy import ensure_work_pool
    from flows.tasks import FanOut, _watch_workers, start_tuner_worker
    from flows.tune_worker import tune_worker_flow

    ensure_work_pool("nobody-polls")
    tune_worker_flow.to_deployment("unpicked", work_pool_name="nobody-polls").apply()
    gone = tmp_path / "tuner" / GONE_DIR / "tuner0"
    # A stand-in chief that finishes once the worker is reported gone, as the real one does.
    chief = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\n"
        f"p = pathlib.Path({str(gone)!r})\n"
        "for _ in range(600):\n"
        "    if p.exists(): break\n"
        "    time.sleep(0.1)\n")])
    fan = FanOut("tune-worker/unpicked", "127.0.0.1", "127.0.0.1", start_timeout_s=3,
                 search_timeout_s=60)

    @flow
    def watch() -> str:
        run = start_tuner_worker.fn(fan.deployment, tmp_path, "tuner0", "127.0.0.1", 1, "quick",
                                    None)
        _watch_workers({"tuner0": run.id}, tmp_path, chief, fan)
        return str(run.id)

    started = time.monotonic()
    run_id = watch()
    assert time.monotonic() - started < 50  # bounded by the start timeout, not the search's
    assert chief.wait(timeout=10) == 0 and gone.exists()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_cancelled()


def test_prefect_deploy_all_and_cxr_deploy_register_the_same_set(harness, tmp_path) -> None:
    """Item 1 of issue 14 against a server: `prefect deploy --all` (prefect.yaml) then
    `cxr deploy` leave one set of four deployments, one weekly schedule, concurrency 1."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import ensure_work_pool

    repo = Path(__file__).resolve().parents[2]
    env = {**_subprocess_env(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}
    for pool in ("cpu", "gpu"):
        ensure_work_pool(pool)
    wanted = {"retrain/scheduled", "promote/promote", "batch-predict/batch-predict", "tune-worker/gpu"}

    def deployments() -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            flows = {f.id: f.name for f in client.read_flows()}
            found = {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}
        return {k: v for k, v in found.items() if k in wanted}

    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    first = deployments()
    assert set(first) == wanted
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--data-dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    second = deployments()
    assert {k: d.id for k, d in second.items()} == {k: d.id for k, d in first.items()}
    retrain = second["retrain/scheduled"]
    assert len(retrain.schedules) == 1 and retrain.global_concurrency_limit.limit == 1
    assert retrain.parameters["data_dir"] == str(tmp_path)  # cxr deploy updated it in place


def test_cxr_deploy_goes_to_the_server_it_is_given_not_the_active_one(harness, tmp_path) -> None:
    """`cxr deploy` in a process where a Prefect server is already active (here the test
    harness's settings context): CXR_PREFECT_API_URL names a dead server, so the command
    must fail naming it, not deploy to the active one. It once set os.environ instead of a
    settings context, which the active context overrode: exit 0, deployed elsewhere."""
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    def deployment_ids() -> set[str]:
        with get_client(sync_client=True) as client:
            return {str(d.id) for d in client.read_deployments()}

    before = deployment_ids()
    dead = f"http://127.0.0.1:{free_port()}/api"
    res = CliRunner().invoke(app, ["deploy", "--data-dir", str(tmp_path)],
                             env={"CXR_PREFECT_API_URL": dead, "PREFECT_API_URL": None,
                                  "CXR_HOME": str(tmp_path / "home")})
    assert res.exit_code == 2, res.output
    assert dead in res.output and "did not answer" in res.output
    assert deployment_ids() == before  # nothing landed on the harness's server
