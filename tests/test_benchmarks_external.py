"""benchmarks/external.py end to end on two tiny synthetic sets (a train folder and an
"external" one drawn with another seed): one option, two seeds, one epoch, 32 px."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cxr_core.data.synth import synthesize_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("bench_external", BENCHMARKS / "external.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.slow
def test_external_benchmark_rows_with_intervals_and_resume(tmp_path: Path) -> None:
    train = tmp_path / "train"
    external = tmp_path / "external"
    # Everything in train/: validation and test are carved from it, as from the real data.
    synthesize_dataset(train, n_per_class=40, size=64, seed=0, split_fractions=(1.0, 0.0, 0.0))
    synthesize_dataset(external, n_per_class=40, size=64, seed=1, split_fractions=(0.0, 0.0, 1.0))
    out = tmp_path / "external.json"
    argv = [str(train), "--external", str(external), "--options", "baseline", "--seeds", "1,2",
            "--epochs", "1", "--image-size", "32", "--n-bootstrap", "200",
            "--work", str(tmp_path / "work"), "--json", str(out)]
    bench = _load_script()
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["external_images"] == 80
    rows = result["rows"]
    assert [(r["option"], r["seed"]) for r in rows] == [("baseline", 1), ("baseline", 2)]
    for row in rows:
        assert row["image_size"] == 32 and row["epochs"] == 1 and row["train_seconds"] > 0
        assert row["recall_target"] == 0.97
        for set_name in ("test", "external"):
            assert row[set_name]["resampled"] == "patients"
            for metric in ("roc_auc", "accuracy", "recall", "specificity"):
                m = row[set_name]["metrics"][metric]
                assert m["low"] <= m["value"] <= m["high"], (set_name, metric, m)
    (summary,) = result["summary"]
    assert summary["seeds"] == [1, 2]
    s = summary["external_accuracy"]
    assert s["min"] <= s["mean"] <= s["max"]
    assert len(result["seed_ensembles"]) == 1
    # Site calibration, cross-fitted over two patient halves of the external set: one entry
    # per row, a threshold per half, scored like a row.
    site = result["site_calibrated"]
    assert [(c["option"], c["seed"]) for c in site] == [("baseline", 1), ("baseline", 2)]
    for c in site:
        assert len(c["site_thresholds"]) == 2
        m = c["external"]["metrics"]["recall"]
        assert m["low"] <= m["value"] <= m["high"]
    # The smaller sample nested in the halves: a threshold per quarter.
    small = result["site_calibrated_small"]
    assert [len(c["site_thresholds"]) for c in small] == [4, 4]
    assert all(c["calibration_images"] == 20 for c in small)

    # A rerun resumes: the finished rows are read back, nothing is trained again.
    trained = sorted((tmp_path / "work" / "rows").rglob("trained.json"))
    stamps = [p.stat().st_mtime_ns for p in trained]
    assert bench.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in trained] == stamps
    assert json.loads(out.read_text())["rows"] == rows


def test_cross_fitting_halves_split_patients_and_alignment_keeps_decisions() -> None:
    import numpy as np
    import pandas as pd

    bench = _load_script()
    rows = pd.DataFrame({"path": [f"p{i}" for i in range(40)],
                         "patient_id": [f"pat{i // 2}" for i in range(40)],  # 2 images each
                         "label": ["NORMAL", "PNEUMONIA"] * 20})
    a, b = bench.patient_halves(rows)
    assert len(a) + len(b) == 40 and not set(a["path"]) & set(b["path"])
    assert not set(a["patient_id"]) & set(b["patient_id"])  # no patient on both sides
    assert set(a["label"]) == set(b["label"]) == {"NORMAL", "PNEUMONIA"}
    # Nested calibration: each half's quarters choose for each other; every image is scored
    # once, never by a threshold chosen on its own patient, never across the halves.
    halves = [set(a["path"]), set(b["path"])]
    pairs = bench.calibration_pairs(rows, small=True)
    assert len(pairs) == 4
    scored = [p for _, s in pairs for p in s]
    assert sorted(scored) == sorted(rows["path"])
    patient = dict(zip(rows["path"], rows["patient_id"]))
    for cal, sco in pairs:
        assert cal and sco and not cal & sco
        assert not {patient[p] for p in cal} & {patient[p] for p in sco}
        assert any(cal | sco <= h for h in halves)
    assert [len(c) for c, _ in bench.calibration_pairs(rows, small=False)] == [len(a), len(b)]
    # Aligning to a threshold moves it to 0.5: same decisions, same order within the model.
    preds = pd.DataFrame({"probability": [0.05, 0.2, 0.69, 0.7, 0.71, 0.99]})
    aligned = bench._aligned(preds, 0.7)["probability"].to_numpy()
    assert ((aligned >= 0.5) == (preds["probability"].to_numpy() >= 0.7)).all()
    assert (np.diff(aligned) > 0).all() and aligned[3] == pytest.approx(0.5)
    # Settings added later stay out of a cached row's key at the value they had before; the
    # pseudo-label settings count only for rows given unlabeled images.
    from cxr_core.config import ExperimentConfig

    cfg = ExperimentConfig()
    assert "ema_momentum" not in bench._key_config(cfg)["train"]
    changed = ExperimentConfig.model_validate({"train": {"ema_momentum": 0.99}})
    assert bench._key_config(changed)["train"]["ema_momentum"] == 0.99
    one_round = ExperimentConfig.model_validate({"train": {"pseudo_label": {"rounds": 1}}})
    two_rounds = ExperimentConfig.model_validate({"train": {"pseudo_label": {"rounds": 2}}})
    assert "pseudo_label" not in bench._key_config(one_round, "crossfit")["train"]
    assert bench._key_config(two_rounds, "crossfit")["train"]["pseudo_label"] == {
        "share": 0.5, "weight": 0.25, "epochs": 3, "rounds": 2}  # augment at its old value: out
    assert bench._key_config(one_round) == bench._key_config(two_rounds)
    assert "fixed" not in bench._key_config(cfg)["tune"]
    # A nested setting at its old value leaves its section's key as it was.
    augmented = ExperimentConfig.model_validate(
        {"train": {"pseudo_label": {"rounds": 1, "augment": True}}})
    assert bench._key_config(augmented, "crossfit")["train"]["pseudo_label"]["augment"] is True
