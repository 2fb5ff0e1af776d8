"""The registered model as an image-native pyfunc: the same files through `cxr predict`, the
pyfunc in process and a real `mlflow models serve` over HTTP give the same probabilities."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.lifecycle.predict import load_model_dir, predict_paths
from cxr_core.lifecycle.serving import OUTPUT_COLUMNS, write_model_folder
from support.dicom import gradient, write_dicom
from support.images import spread_outputs, write_image

SIZE = 32
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, files) -> Path:
    """A tiny model whose outputs on ``files`` spread over (0, 1), so parity is a real
    comparison."""
    from cxr_core.data.inputs import load_images
    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import build_cnn

    d = tmp_path_factory.mktemp("trained")
    model = build_cnn(SIZE, blocks=2, base_filters=4, dense_units=0)
    spread_outputs(model, load_images([str(f) for f in files], SIZE))
    model.save(d / "model.keras")
    save_threshold(d / "threshold.json", ThresholdChoice(0.5, 0.9, 0.8, 0.7, 0.9, 10, 10))
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """JPEG, colour and 16-bit PNG, and every DICOM variant (one without an extension)."""
    d = tmp_path_factory.mktemp("incoming")
    out = [write_image(d / f"gray{i}.jpeg", i, size=48 + 8 * i) for i in range(3)]
    out.append(write_image(d / "rgb.png", 7, mode="RGB", fmt="PNG"))
    out.append(write_image(d / "deep.png", 8, mode="I;16", fmt="PNG"))
    rng = np.random.default_rng(3)
    for i in range(6):
        pixels = np.clip(gradient(40, 36).astype(int) + rng.integers(-40, 40, (40, 36)), 0, 255)
        name = f"dcm{i}.dcm" if i != 5 else "dcm5"
        out.append(write_dicom(d / name, pixels.astype(np.uint8), index=i))
    return out


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_pyfunc_in_process_matches_cxr_predict(model_dir, files, tmp_path) -> None:
    import mlflow.keras
    import mlflow.pyfunc

    folder = write_model_folder(model_dir, tmp_path / "mlmodel")
    assert (folder / "code" / "cxr_core" / "data" / "dicom.py").is_file()
    reference, errors = predict_paths(load_model_dir(model_dir), [str(f) for f in files])
    assert errors.empty and reference["probability"].std() > 0.05  # outputs really differ
    pyfunc = mlflow.pyfunc.load_model(str(folder))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    by_path = pyfunc.predict(pd.DataFrame({"path": [str(f) for f in files]}))
    for out in (by_bytes, by_path):
        assert list(out.columns) == OUTPUT_COLUMNS and (out["error"] == "").all()
        assert np.abs(out["probability"].to_numpy() - reference["probability"].to_numpy()).max() \
            < TOLERANCE
        assert (out["label"] == reference["label"]).all() and (out["threshold"] == 0.5).all()
    # Base64 strings (what a JSON client sends) and a broken row next to good ones.
    mixed = pyfunc.predict(pd.DataFrame({"image": [_b64(files[0]), b"\xff\xd8 not an image",
                                                   files[6].read_bytes()]}))
    assert mixed["error"][0] == "" and mixed["error"][2] == ""
    assert mixed["error"][1].startswith("cannot decode image: Unknown image file format")
    assert pd.isna(mixed["label"][1])
    assert np.isnan(mixed["probability"][1])
    assert abs(mixed["probability"][2] - reference["probability"][6]) < TOLERANCE
    # The keras flavor still loads the network itself (pixel tensors in).
    net = mlflow.keras.load_model(str(folder))
    assert net.predict(np.full((2, SIZE, SIZE, 1), 100.0, np.float32), verbose=0).shape == (2, 1)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


@pytest.mark.integration
def test_registered_model_served_over_http_matches_cxr_predict(model_dir, files, tmp_path,
                                                               monkeypatch) -> None:
    from typer.testing import CliRunner

    from cxr_core.lifecycle.registry import log_keras_model
    from cxr_core.lifecycle.tracking import ensure_experiment, make_client, start_run
    from flows.cli import app
    from flows.servers import start_model_server

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = make_client(uri)
    exp = ensure_experiment(client, "serve", (tmp_path / "artifacts").as_uri())
    run_id = start_run(client, exp, "final")
    log_keras_model(client, run_id, model_dir, SIZE)
    client.create_registered_model("cxr-serve")
    client.create_model_version("cxr-serve", f"runs:/{run_id}/model", run_id=run_id)
    model_uri = "models:/cxr-serve/1"

    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_TRACKING_URI", uri)
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", *map(str, files), "--model", model_uri,
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    cli = pd.read_csv(out).set_index("path").loc[[str(f.resolve()) for f in files]]

    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    in_process = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"image": [f.read_bytes() for f in files]}))

    server = start_model_server(model_uri, tmp_path / "serve.log",
                                env={"MLFLOW_TRACKING_URI": uri})
    try:
        split = _post(server.url, {"dataframe_split": {
            "columns": ["image"], "data": [[_b64(f)] for f in files]}})["predictions"]
        records = _post(server.url, {"dataframe_records": [{"path": str(f)} for f in files]})[
            "predictions"]
    finally:
        server.stop()
    http = pd.DataFrame(split)
    assert list(http.columns) == OUTPUT_COLUMNS and (http["error"] == "").all()
    expected = cli["probability"].to_numpy()
    for got in (in_process["probability"], http["probability"],
                pd.DataFrame(records)["probability"]):
        assert np.abs(np.asarray(got, float) - expected).max() < TOLERANCE
    assert list(http["label"]) == list(cli["label"])
    assert http["threshold"].eq(0.5).all()
