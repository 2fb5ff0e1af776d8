"""Benchmark: robust-training options, each measured on the carved test split and on the
robustness report (the proxy for an external test set acquired differently).

Every variant trains the same fixed architecture (the search space's defaults) on the same
patient-grouped train/val/test carving of the real train split (shipped defaults, 128 px
unless a variant sets its size, offline balancing done once; the baseline is plain
training), picks its threshold on validation (recall target of the config), and is
scored on the test split clean and under the 12 acquisition shifts. Nothing is chosen
on the test split: it only reports.

Usage: python benchmarks/robust_training.py [DATA_DIR] [--epochs 12] [--variants a,b]
           [--work DIR] [--json FILE]      (DATA_DIR defaults to $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PHOTOMETRIC = {"balance": {"augment": {"random_gamma": True, "gamma_range": [0.6, 1.6],
                                       "max_contrast": 0.3, "max_brightness": 0.2,
                                       "max_blur_sigma": 1.0, "noise_std": 8.0}}}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "standardize": {"train": {"intensity_norm": "standardize"}},
    "photometric": PHOTOMETRIC,
    "standardize+photometric": {**PHOTOMETRIC, "train": {"intensity_norm": "standardize"}},
    "standardize+mixup": {"train": {"intensity_norm": "standardize", "mixup_alpha": 0.2}},
    "standardize+photometric+smoothing": {
        **PHOTOMETRIC, "train": {"intensity_norm": "standardize", "label_smoothing": 0.1}},
    "standardize+photometric+mixup": {
        **PHOTOMETRIC, "train": {"intensity_norm": "standardize", "mixup_alpha": 0.2}},
    # The full profile's recipe: the above plus Platt calibration (ranking and accuracy at
    # the threshold unchanged by construction; Brier and ECE are what it should move).
    "full-recipe": {**PHOTOMETRIC, "train": {"intensity_norm": "standardize",
                                             "mixup_alpha": 0.2, "calibrate": True}},
    # Test-time augmentation on top (same seed, so nearly the same weights as full-recipe).
    "full-recipe+tta": {**PHOTOMETRIC, "train": {"intensity_norm": "standardize",
                                                 "mixup_alpha": 0.2, "calibrate": True,
                                                 "tta": True}},
    # Input resolution: the same recipe at 96 and 160 px.
    "full-recipe@96px": {**PHOTOMETRIC, "data": {"image_size": 96},
                         "train": {"intensity_norm": "standardize", "mixup_alpha": 0.2,
                                   "calibrate": True}},
    "full-recipe@160px": {**PHOTOMETRIC, "data": {"image_size": 160},
                          "train": {"intensity_norm": "standardize", "mixup_alpha": 0.2,
                                    "calibrate": True}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_json_args(parser, "robust_training")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="/tmp/cxr-robust-bench")
    args = parse_with_data(parser, argv)

    import numpy as np

    from cxr_core.config import ExperimentConfig, deep_merge, load_config
    from cxr_core.data.balance import BalancedTrainSet
    from cxr_core.data.inputs import configure_tensorflow, load_images, make_datasets
    from cxr_core.data.manifest import read_manifest
    from cxr_core.evaluation.metrics import point_metrics
    from cxr_core.evaluation.robustness import robustness_report
    from cxr_core.evaluation.scoring import test_split
    from cxr_core.stages import prepare_stage
    from cxr_core.training.fit import train_best

    # The shipped defaults (plain training) are the baseline every variant changes; the
    # threshold target is the full profile's, as in a real run.
    full = load_config(profile="full")
    base = ExperimentConfig.model_validate(deep_merge(load_config().model_dump(), {
        "data": {"image_size": full.data.image_size},
        "gates": {"recall_target_for_threshold": full.gates.recall_target_for_threshold}}))
    configure_tensorflow(base.data.intra_op_threads, base.data.inter_op_threads)
    work = Path(args.work)
    manifest_path = prepare_stage(Path(args.data_dir), base, work)
    manifest = read_manifest(manifest_path)
    test = test_split(manifest_path)
    y_test = (test["label"] == "PNEUMONIA").to_numpy(int)
    x_test_at: dict[int, np.ndarray] = {}  # test images decoded once per input size
    hp = {"blocks": 3, "base_filters": 16, "convs_per_block": 1, "residual": False,
          "dropout": 0.3, "dense_units": 64, "learning_rate": 1e-3}

    rows = []
    for name in args.variants.split(","):
        override = deep_merge(VARIANTS[name], {"train": {"epochs": args.epochs,
                                                         "early_stopping_patience": args.patience}})
        cfg = ExperimentConfig.model_validate(deep_merge(base.model_dump(), override))
        datasets = make_datasets(BalancedTrainSet(manifest, None, None), cfg)
        t0 = time.perf_counter()
        trained = train_best(hp, datasets, cfg, work / name)
        seconds = time.perf_counter() - t0
        import keras

        model = keras.models.load_model(trained.model_path)
        t = trained.threshold.threshold

        def predict(x: np.ndarray, model=model) -> np.ndarray:
            return np.asarray(model.predict(x, batch_size=128, verbose=0), np.float64).ravel()

        size = cfg.data.image_size
        if size not in x_test_at:
            x_test_at[size] = load_images(test["path"].tolist(), size)
        x_test = x_test_at[size]
        clean = point_metrics(y_test, predict(x_test), t)
        report = robustness_report(predict, x_test, y_test, t, seed=cfg.seed)
        shifted = report.shifted.values()
        row = {
            "variant": name, "image_size": size, "train_seconds": round(seconds, 1),
            "epochs": trained.epochs_trained, "best_epoch": trained.best_epoch,
            "threshold": round(t, 4),
            "val_auc": round(max(trained.history.get("val_auc", [float("nan")])), 4),
            "val_shift_auc": round(max(trained.history.get("val_shift_auc", [float("nan")])), 4),
            **{f"test_{k}": round(float(clean[k]), 4)
               for k in ("accuracy", "recall", "specificity", "roc_auc", "brier", "ece")},
            "calibration": trained.calibration,
            "shift_mean_accuracy": round(float(np.mean([m["accuracy"] for m in shifted])), 4),
            "shift_worst_accuracy": round(report.worst("accuracy"), 4),
            "shift_worst_specificity": round(report.worst("specificity"), 4),
            "shift_worst_recall": round(report.worst("recall"), 4),
            "shift_mean_roc_auc": round(float(np.mean([m["roc_auc"] for m in shifted])), 4),
            "worst_shift": min(report.shifted, key=lambda k: report.shifted[k]["accuracy"]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        keras.backend.clear_session()

    write_results(args.json, "robust_training", {
        "data_dir": args.data_dir, "test_images": int(len(test)),
        "image_size": base.data.image_size, "hyperparameters": hp, "rows": rows,
    }, argv)
    cols = ("variant", "test_accuracy", "test_recall", "test_specificity", "test_roc_auc",
            "test_ece",
            "shift_mean_accuracy", "shift_worst_accuracy", "shift_worst_specificity",
            "train_seconds")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
