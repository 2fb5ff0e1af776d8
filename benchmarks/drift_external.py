"""Drift check on the real data: a model trained on the train folder, its reference from the
validation split carved from it; then (a) the test split carved from the same folder and
(b) an external development set acquired elsewhere, each checked against the reference, as
`cxr predict` would. Also (c): the same checks against a reference drawn from the training
images themselves, to measure why cxr draws references from held-out images.

Usage: python benchmarks/drift_external.py [DATA_DIR] --external DIR [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results


def _train(manifest, size: int, epochs: int, seed: int):
    import keras

    from cxr_core.data.inputs import make_dataset, split_data
    from cxr_core.training.model import build_cnn

    keras.utils.set_random_seed(seed)
    train, val = split_data(manifest, "train"), split_data(manifest, "val")
    n_pos = int(train.labels.sum())
    weights = {0: len(train) / (2 * (len(train) - n_pos)), 1: len(train) / (2 * n_pos)}
    model = build_cnn(size, blocks=3, base_filters=16, intensity_norm="standardize", seed=seed)
    model.fit(make_dataset(train, size, 32, True, seed), epochs=epochs, class_weight=weights,
              validation_data=make_dataset(val, size, 64, False, seed), verbose=2)
    return model


def _check(model, size, reference, files, threshold):
    from cxr_core.evaluation.drift import compare, compute_features

    batch, _ = compute_features(model, size, files)
    return compare(reference, batch, threshold, seed=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_and_json_args(parser, "drift_external")
    parser.add_argument("--external", required=True, help="external data folder (test/...)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    args = parse_with_data(parser)
    from cxr_core.config import DataConfig
    from cxr_core.data.inputs import split_rows
    from cxr_core.data.splits import scan_and_split
    from cxr_core.evaluation.drift import compute_features, load_reference, save_reference

    t0 = time.perf_counter()
    manifest = scan_and_split(Path(args.data_dir), DataConfig(), seed=42).manifest
    model = _train(manifest, args.size, args.epochs, seed=42)
    threshold = 0.5
    tmp = Path(tempfile.mkdtemp())
    rows = {s: split_rows(manifest, s) for s in ("train", "val", "test")}
    val = rows["val"].sample(min(600, len(rows["val"])), random_state=42)["path"].tolist()
    train = rows["train"].sample(600, random_state=42)["path"].tolist()
    refs = {}
    for name, files in (("val", val), ("train", train)):
        feats, _ = compute_features(model, args.size, files)
        refs[name] = load_reference(save_reference(tmp / f"{name}.npz", feats, threshold, name))
    external = sorted(str(p) for p in Path(args.external).rglob("*.jpeg"))
    batches = {"carved_test": rows["test"]["path"].tolist(), "external_dev": external}
    figures: dict[str, dict] = {}
    for ref_name, ref in refs.items():
        for batch_name, files in batches.items():
            report = _check(model, args.size, ref, files, threshold)
            key = f"{batch_name}_vs_{ref_name}_reference"
            figures[key] = {"drifted": report.drifted, "reasons": report.reasons,
                            "n_images": report.n_images, "n_reference": report.n_reference,
                            "positive_share": report.positive_share,
                            "histogram_js_distance": report.histogram_js_distance,
                            "tests": {t.name: {"statistic": t.statistic, "p_adjusted": t.p_adjusted}
                                      for t in report.tests}}
            print(f"\n== {key}: {'DRIFTED' if report.drifted else 'no drift'} "
                  f"({report.n_images} images vs {report.n_reference})")
            print(report.summary())
    figures["seconds"] = time.perf_counter() - t0
    figures["model"] = (f"build_cnn 3 blocks/16 filters, standardize, {args.size} px, "
                        f"{args.epochs} epochs, class-weighted, threshold {threshold}")
    write_results(args.json, "drift_external", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
