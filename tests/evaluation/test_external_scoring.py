"""Scoring an external set at the model's threshold, and choosing a site threshold on a
calibration sample: files in the places the comparison report and `cxr predict` read them,
and the stage that does both after the model exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.config import load_config
from cxr_core.data.external import scan_external_set
from cxr_core.data.splits import scan_and_split
from cxr_core.evaluation.external import (
    PREDICTIONS_FILE,
    choose_site_threshold,
    external_metrics,
    external_tags,
    load_site_threshold,
    save_site_threshold,
    score_external,
)
from cxr_core.evaluation.metrics import evaluate_predictions
from cxr_core.lifecycle.comparison_report import EXTERNAL_DIR, EXTERNAL_FILE, paired_rows
from cxr_core.training.fit import THRESHOLD_FILE, ThresholdChoice, choose_threshold, save_threshold
from support.images import make_good_dataset, spread_outputs, write_image

SIZE = 32
TEST_COLUMNS = ["path", "sha256", "patient_id", "label", "probability", "prediction"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny untrained model whose outputs spread over (0, 1) on images of any brightness."""
    from cxr_core.training.model import build_cnn

    d = tmp_path_factory.mktemp("model")
    model = build_cnn(SIZE, blocks=2, base_filters=8, dense_units=0, seed=0)
    levels = np.linspace(10, 245, 32, dtype="float32")[:, None, None, None]
    spread_outputs(model, np.clip(levels + np.random.default_rng(0).normal(
        0, 20, (32, SIZE, SIZE, 1)), 0, 255).astype("float32"))
    model.save(d / "model.keras")
    save_threshold(d / THRESHOLD_FILE, ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20))
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's data and manifest, an external set and a calibration sample (both labelled)."""
    root = tmp_path_factory.mktemp("ext")
    data = make_good_dataset(root / "data", n_patients=4, imgs=1)
    manifest = scan_and_split(data, load_config(profile="quick").data, 0).manifest
    for name, seed0 in (("site-b", 3000), ("cal", 4000)):
        for i in range(8):
            write_image(root / name / "test" / "NORMAL" / f"IM-{seed0 + i:04d}-0001.jpeg", seed0 + i)
            write_image(root / name / "test" / "PNEUMONIA" / f"person{seed0 + i}_virus_1.jpeg",
                        seed0 + 50 + i)
    return root, data, manifest


def test_external_set_is_scored_like_the_test_split(model_dir, run, tmp_path) -> None:
    import keras

    root, _, manifest = run
    scan = scan_external_set("site-b", root / "site-b", manifest, workers=1)
    out = tmp_path / EXTERNAL_DIR / "site-b"
    result = score_external(keras.models.load_model(model_dir / "model.keras"), 0.5, "site-b",
                            scan.usable, SIZE, out, seed=0)
    preds = pd.read_csv(out / PREDICTIONS_FILE)
    assert PREDICTIONS_FILE == EXTERNAL_FILE and result.predictions_path == out / EXTERNAL_FILE
    assert list(preds.columns) == TEST_COLUMNS and len(preds) == 16
    assert (preds["prediction"] == (preds["probability"] >= 0.5)).all()
    assert preds["probability"].std() > 0.01  # the model's outputs, not a constant
    # Patients resampled, as for the test split; the same numbers from the written rows.
    expected = evaluate_predictions(preds["label"], preds["probability"], 0.5, seed=0,
                                    groups=preds["patient_id"].astype(str))
    assert result.evaluation.metrics == expected.metrics
    assert (result.evaluation.resampled, result.evaluation.n_clusters) == ("patients", 16)
    assert json.loads((out / "metrics.json").read_text())["n"] == 16
    assert {"roc_curve", "confusion_matrix"} <= set(result.figures)
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.figures.values())
    # The comparison report joins these rows with another version's on sha256.
    assert len(paired_rows(preds, preds)) == 16
    flat = external_metrics({"site-b": result.evaluation})
    assert flat["external_site-b_accuracy"] == result.evaluation.metrics["accuracy"].value
    assert {"external_site-b_roc_auc_ci_low", "external_site-b_recall_ci_high"} <= set(flat)
    tags = external_tags({"site-b": result.evaluation})
    assert set(tags) == {f"cxr.external.site-b.{m}" for m in
                         ("accuracy", "recall", "specificity", "roc_auc")}


def test_site_threshold_uses_the_main_rule_and_leaves_the_model_threshold(model_dir, run,
                                                                          tmp_path) -> None:
    import shutil

    import keras

    from cxr_core.lifecycle.predict import load_model_dir

    root, _, manifest = run
    work = tmp_path / "model"
    shutil.copytree(model_dir, work)
    before = (work / THRESHOLD_FILE).read_bytes()
    scan = scan_external_set("calibration", root / "cal", manifest, workers=1)
    site = choose_site_threshold(keras.models.load_model(work / "model.keras"), scan.usable, SIZE,
                                 0.9, scan.root, tmp_path / "site")
    preds = pd.read_csv(tmp_path / "site" / PREDICTIONS_FILE)
    rule = choose_threshold(preds["label"], preds["probability"], 0.9)
    assert (site.threshold, site.recall, site.specificity) == (rule.threshold, rule.recall,
                                                               rule.specificity)
    assert site.recall >= 0.9 and site.images == 16 and site.source == scan.root
    assert site.tags()["cxr.site_threshold"] == f"{rule.threshold:.6f}"
    save_site_threshold(work, site)
    assert load_site_threshold(work / "site_threshold.json") == site
    loaded = load_model_dir(work)
    assert loaded.threshold == 0.5 and loaded.site_threshold == site.threshold
    assert loaded.at_site_threshold().threshold == site.threshold
    assert (work / THRESHOLD_FILE).read_bytes() == before  # the model's own threshold stays


def test_a_model_without_site_threshold_says_so(model_dir) -> None:
    from cxr_core.errors import InputError
    from cxr_core.lifecycle.predict import load_model_dir

    loaded = load_model_dir(model_dir)
    assert loaded.site_threshold is None
    with pytest.raises(InputError, match="no site threshold"):
        loaded.at_site_threshold()


def test_external_stage_scores_after_the_model_and_gates_see_it(model_dir, run, tmp_path) -> None:
    """The stage functions the flow calls: scan (before training), then score (after)."""
    import shutil

    from cxr_core import stages
    from cxr_core.data.manifest import write_manifest
    from cxr_core.evaluation.metrics import Interval
    from cxr_core.evaluation.scoring import EvaluatedModel

    root, _, manifest = run
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "model")
    manifest_path = write_manifest(manifest, run_dir / "manifest.parquet")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{image_size: {SIZE}}}\ngates: {{min_recall: 0, min_accuracy: 0, "
                      "external: {site-b: {min_roc_auc: 1.0}}}\n")
    cfg = load_config(config, "quick")
    data = stages.external_scan_stage({"site-b": str(root / "site-b")}, str(root / "cal"),
                                      manifest_path, cfg, run_dir)
    assert (run_dir / "evaluation/external/site-b/scan_report.json").is_file()
    test = {"recall": Interval(1, 1, 1), "accuracy": Interval(1, 1, 1)}
    evaluated = stages.external_stage(run_dir, cfg, EvaluatedModel(
        type("E", (), {"metrics": test})(), run_dir / "p.csv"), data)
    assert set(evaluated.external) == {"site-b"} and evaluated.external["site-b"].n == 16
    assert (run_dir / "evaluation/external/site-b/predictions.csv").is_file()
    assert (run_dir / "model/site_threshold.json").is_file()
    assert evaluated.site_threshold.images == 16
    decision = stages.gate_stage(evaluated, cfg, None, None)
    # An untrained model does not rank perfectly: the set's ROC-AUC gate rejects it.
    assert [c.name for c in decision.failed] == ["external_site-b_min_roc_auc"]
    inputs = stages.external_inputs(data)
    assert [(i.name, i.context) for i in inputs] == [("external-site-b", "external"),
                                                      ("site-calibration", "calibration")]
