"""Search, resume, final training and distributed tuning on tiny images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_core.config import ExperimentConfig, load_config
from cxr_core.data.balance import BalancedTrainSet
from cxr_core.data.inputs import make_datasets
from cxr_core.data.splits import scan_and_split
from cxr_core.training.fit import train_best
from cxr_core.training.search import best_hyperparameters, tune
from support.images import make_good_dataset

TINY = {
    "data": {"image_size": 32, "min_val_images": 0},
    "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
    "tune": {"algorithm": "random", "max_trials": 2, "max_epochs": 2},
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 1},
    "balance": {"strategy": "class_weight"},
    "gates": {"recall_target_for_threshold": 0.9},
}


def tiny_config(**overrides: dict) -> ExperimentConfig:
    from cxr_core.config import deep_merge

    base = load_config(profile="quick").model_dump()
    return ExperimentConfig.model_validate(deep_merge(deep_merge(base, TINY), overrides))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_good_dataset(tmp_path_factory.mktemp("tiny") / "data", n_patients=10, imgs=2)


def _datasets(data_dir: Path, cfg: ExperimentConfig):
    scan = scan_and_split(data_dir, cfg.data, cfg.seed)
    return make_datasets(BalancedTrainSet(scan.manifest, None, None), cfg)


def test_search_returns_per_trial_results(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    tuner, trials = tune(_datasets(tiny_data, cfg), cfg, tmp_path)
    assert len(trials) == 2
    for t in trials:
        assert t.status == "COMPLETED" and t.score is not None
        assert len(t.metrics["val_auc"]) >= 1 and "loss" in t.metrics
        assert "learning_rate" in t.hyperparameters
    assert (tmp_path / "tuner" / "search").is_dir()  # state under the run's work dir
    assert "blocks" in best_hyperparameters(tuner)


def test_a_trial_trains_alike_whatever_ran_before_it(tiny_data: Path, tmp_path: Path) -> None:
    """Weights are initialised from the run's seed and the trial id, not from whatever global
    random state the process reached: two processes (or two workers) searching with the same
    seed train every trial alike, so the same trials win."""
    import random

    import tensorflow as tf

    cfg = tiny_config()
    _, first = tune(_datasets(tiny_data, cfg), cfg, tmp_path / "a")
    random.random(), np.random.random(), tf.random.uniform([3])  # other work in the process
    _, second = tune(_datasets(tiny_data, cfg), cfg, tmp_path / "b")
    assert [t.hyperparameters for t in first] == [t.hyperparameters for t in second]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a.metrics["loss"], b.metrics["loss"], rtol=1e-5)


def test_seed_zero_still_seeds_the_oracle_and_each_trial(tmp_path: Path) -> None:
    from cxr_core.training.search import ORACLE_SEED_FOR_ZERO, hypermodel_for, make_tuner, trial_seed

    cfg = tiny_config()
    tuners = [make_tuner(hypermodel_for(cfg), tmp_path / str(i), algorithm="random", seed=0)
              for i in range(2)]
    # Keras Tuner would draw a random oracle seed for 0: both searches would differ.
    assert [t.oracle.seed for t in tuners] == [ORACLE_SEED_FOR_ZERO] * 2
    assert trial_seed(0, "00") != trial_seed(0, "01")
    assert trial_seed(42, "00") != trial_seed(43, "00")


def test_fixed_hyperparameters_hold_in_every_trial(tiny_data: Path, tmp_path: Path) -> None:
    from cxr_core.config import SEARCH_HYPERPARAMETERS

    cfg = tiny_config(tune={"fixed": {"residual": True, "convs_per_block": 2}})
    _, trials = tune(_datasets(tiny_data, cfg), cfg, tmp_path)
    assert len(trials) == 2
    for t in trials:
        assert t.hyperparameters["residual"] is True and t.hyperparameters["convs_per_block"] == 2
        # The rest is still searched, and the config's list names the whole space.
        assert set(t.hyperparameters) == set(SEARCH_HYPERPARAMETERS)
    assert len({t.hyperparameters["learning_rate"] for t in trials}) == 2


def test_interrupted_search_resumes_without_rerunning(tiny_data: Path, tmp_path: Path) -> None:
    cfg1 = tiny_config(tune={"max_trials": 1})
    ds = _datasets(tiny_data, cfg1)
    _, first = tune(ds, cfg1, tmp_path)
    assert len(first) == 1
    done = tmp_path / "tuner" / "search" / f"trial_{first[0].trial_id}" / "epochs.json"
    stamp = done.stat().st_mtime_ns
    cfg2 = tiny_config(tune={"max_trials": 2})
    _, second = tune(ds, cfg2, tmp_path)
    assert len(second) == 2
    assert done.stat().st_mtime_ns == stamp  # the completed trial was not rerun
    assert second[0].hyperparameters == first[0].hyperparameters


@pytest.mark.parametrize("calibrate,tta", [(False, False), (True, True)])
def test_final_model_reloads_predicts_same_and_keeps_its_threshold(tiny_data: Path, tmp_path: Path,
                                                                   calibrate: bool, tta: bool) -> None:
    from cxr_core.lifecycle.predict import load_model_dir
    from cxr_core.training.calibrate import OUTPUT_LAYER
    from cxr_core.training.fit import choose_threshold, load_threshold, predict_proba
    from cxr_core.training.tta import WRAPPER_NAME

    cfg = tiny_config(train={"calibrate": calibrate, "tta": tta})
    ds = _datasets(tiny_data, cfg)
    hp = {"blocks": 3, "base_filters": 16, "separable": False, "residual": False,
          "dropout": 0.2, "dense_units": 0, "learning_rate": 1e-3}
    trained = train_best(hp, ds, cfg, tmp_path)
    assert trained.model_path.is_file() and (tmp_path / "model" / "threshold.json").is_file()
    loaded = load_model_dir(tmp_path / "model")
    model, threshold = loaded.model, load_threshold(tmp_path / "model")
    assert loaded.threshold == threshold.threshold
    assert threshold == trained.threshold
    p1 = predict_proba(model, ds.val)
    # The threshold belongs to the saved model's output: chosen on it, not on an earlier
    # stage (before TTA or calibration). (Recall on the set it was chosen on would hold by
    # construction; the chooser is checked on held-out data in test_threshold.py.)
    rechosen = choose_threshold(ds.val_data.labels, p1, cfg.gates.recall_target_for_threshold)
    assert rechosen.threshold == pytest.approx(threshold.threshold, abs=1e-6)
    # Reloaded model predicts the same as the one that chose the threshold.
    import keras

    p2 = predict_proba(keras.models.load_model(trained.model_path), ds.val)
    assert np.allclose(p1, p2, atol=1e-6)
    assert (trained.calibration is not None) == calibrate
    assert (model.name == WRAPPER_NAME) == tta
    if calibrate:
        # Calibration is the saved model's last step: sigmoid(a * z + b) of the logit z
        # that reaches its output layer (with TTA: the mean logit of the views).
        assert trained.calibration["a"] > 0
        z = keras.Model(model.inputs, model.get_layer(OUTPUT_LAYER).input).predict(ds.val, verbose=0)
        a, b = trained.calibration["a"], trained.calibration["b"]
        np.testing.assert_allclose(p1, 1 / (1 + np.exp(-(a * z.ravel() + b))), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_distributed_search_chief_and_two_workers(tiny_data: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({**TINY, "tune": {"algorithm": "random", "max_trials": 4,
                                                    "max_epochs": 1}}))
    work = tmp_path / "work"
    port = str(_free_port())
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    common = ["--work-dir", str(work), "--oracle-ip", "127.0.0.1", "--oracle-port", port,
              "--config", str(cfg_file), "--profile", "quick"]
    cli = [sys.executable, "-m", "flows.cli", "tune"]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("chief", "tuner0", "tuner1")}
    chief = subprocess.Popen(cli + ["chief", "--data-dir", str(tiny_data)] + common,
                             stdout=logs["chief"], stderr=subprocess.STDOUT, env=env)
    workers = [subprocess.Popen(cli + ["worker", "--tuner-id", wid] + common,
                                stdout=logs[wid], stderr=subprocess.STDOUT, env=env)
               for wid in ("tuner0", "tuner1")]
    try:
        for proc in workers + [chief]:
            proc.wait(timeout=240)
    finally:
        for proc in workers + [chief]:
            if proc.poll() is None:
                proc.kill()
    out = {k: (tmp_path / f"{k}.log").read_text() for k in logs}
    assert chief.returncode == 0, out["chief"][-3000:]
    assert all(w.returncode == 0 for w in workers), (out["tuner0"][-2000:], out["tuner1"][-2000:])
    ran_by = []
    for f in (work / "tuner" / "search").glob("trial_*/epochs.json"):
        ran_by.append(json.loads(f.read_text())["tuner_id"])
    assert len(ran_by) == 4
    assert ran_by.count("tuner0") >= 1 and ran_by.count("tuner1") >= 1, ran_by
    assert "4 trial(s), 4 scored" in out["chief"]


def test_a_role_is_given_back_after_its_block(monkeypatch) -> None:
    """A worker's role must not outlive it: a later search in the same process would
    otherwise dial a chief that is gone and wait for ever (seen in the suite)."""
    from cxr_core.training.search import ROLE_ENV, distributed_role, role

    for key in ROLE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1234")
    with pytest.raises(RuntimeError), role("tuner0", "10.0.0.1", 9999):
        assert distributed_role() == "tuner0"
        raise RuntimeError("the worker failed")
    assert distributed_role() is None
    assert os.environ["KERASTUNER_ORACLE_PORT"] == "1234"
    assert "KERASTUNER_ORACLE_IP" not in os.environ
