"""Benchmark: batch prediction images/s from 224 px JPEG files, and single-image latency.

Usage: python benchmarks/predict_throughput.py [DATA_DIR] [--model URI_OR_DIR] [--images N]
Without --model it uses the default architecture (128 px) with untrained weights: speed does
not depend on the weights. Targets (issue 4): >= 500 images/s, median latency < 20 ms.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_data_and_json_args, parse_with_data, write_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_and_json_args(parser, "predict_throughput")
    parser.add_argument("--model", help="models:/..., runs:/... or a model folder")
    parser.add_argument("--tracking-uri", default=os.environ.get("CXR_TRACKING_URI"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parse_with_data(parser)
    from cxr_core.lifecycle.predict import LoadedModel, load_model, predict_paths

    if args.model:
        loaded = load_model(args.model, args.tracking_uri)
    else:
        import keras_tuner as kt

        from cxr_core.training.model import CxrHyperModel

        # The search space's default hyperparameters: what a search starts from.
        model = CxrHyperModel(128).build(kt.HyperParameters())
        path = Path(tempfile.mkdtemp()) / "model.keras"
        model.save(path)
        import keras

        loaded = LoadedModel(keras.models.load_model(path), 0.5, 128, "default architecture")
    files = sorted(glob.glob(str(Path(args.data_dir) / "**" / "*.jpeg"), recursive=True))
    files = files[: args.images]
    predict_paths(loaded, files[:64], workers=2)  # warm-up: graph tracing
    t0 = time.perf_counter()
    preds, errors = predict_paths(loaded, files, batch_size=64)
    batch_s = time.perf_counter() - t0
    throughput = len(preds) / batch_s
    print(f"batch   : {len(preds)} files in {batch_s:.2f} s = {throughput:.0f} images/s "
          f"(tf.data decode/resize + model, batch 64, {loaded.source})")

    latencies = []
    for i, f in enumerate(files[: args.latency_samples + 5]):
        t = time.perf_counter()
        loaded.predict_file(f)
        if i >= 5:  # first calls trace the graph
            latencies.append((time.perf_counter() - t) * 1000)
    med = statistics.median(latencies)
    p95 = float(np.percentile(latencies, 95))
    print(f"latency : median {med:.1f} ms, p95 {p95:.1f} ms per image (decode + resize + model, "
          f"{len(latencies)} samples)")
    print(f"targets : >= 500 images/s {'MET' if throughput >= 500 else 'NOT MET'}; "
          f"median < 20 ms {'MET' if med < 20 else 'NOT MET'}")
    write_results(args.json, "predict_throughput", {
        "images_per_s": throughput, "latency_median_ms": med, "latency_p95_ms": p95,
        "images": len(preds)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
