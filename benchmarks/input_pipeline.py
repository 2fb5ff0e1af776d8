"""Benchmark: images/s of the tf.data input pipeline, iterated without a model.

Compares the project's pipeline (``make_dataset`` over the carved train split: decode, gray,
antialiased resize, in-memory cache, shuffle, batch, prefetch) for a cold epoch (decode and
resize, filling the cache) and a warm epoch (from the cache), with
``keras.utils.image_dataset_from_directory`` over ``DATA/train`` for two epochs (it has no
cache: every epoch decodes every file again).

Usage: python benchmarks/input_pipeline.py [DATA_DIR] [--image-size 128] [--json FILE]
       (DATA_DIR defaults to $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_core.config import load_config  # noqa: E402
from cxr_core.data.inputs import configure_tensorflow, make_dataset, split_data
from cxr_core.data.manifest import find_data_root
from cxr_core.data.splits import scan_and_split

BATCH = 32


def _epoch(ds) -> tuple[int, float]:
    """Iterate one epoch, touching every batch; returns (images, seconds)."""
    n = 0
    t0 = time.perf_counter()
    for x, _ in ds:
        n += int(x.shape[0])
    return n, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_json_args(parser, "input_pipeline")
    parser.add_argument("--image-size", type=int, default=128)
    args = parse_with_data(parser)
    size = args.image_size
    configure_tensorflow()  # TensorFlow's default thread pools, set before the first op
    import keras

    cores = os.cpu_count() or 1
    figures: dict[str, object] = {"data_dir": str(args.data_dir), "cpu_cores": cores,
                                  "image_size": size, "batch_size": BATCH}
    cfg = load_config(profile="full")
    # The scan reads every file once, so both pipelines below start with a warm OS page cache.
    scan = scan_and_split(Path(args.data_dir), cfg.data, cfg.seed)
    train = split_data(scan.manifest, "train")
    print(f"carved train split: {len(train)} images; image size {size}, batch {BATCH}, "
          f"{cores} CPU cores")

    rows: list[tuple[str, str, int, float]] = []
    ds = make_dataset(train, size, BATCH, shuffle=True, seed=cfg.seed)
    for name in ("cold (decode+resize, fills cache)", "warm (from cache)"):
        n, dt = _epoch(ds)
        rows.append(("cxr make_dataset", name, n, dt))

    train_dir = find_data_root(Path(args.data_dir)) / "train"
    kds = keras.utils.image_dataset_from_directory(
        train_dir, image_size=(size, size), color_mode="grayscale", batch_size=BATCH,
        label_mode="binary", verbose=False)
    kds = kds.prefetch(-1)  # tf.data.AUTOTUNE, as the project's pipeline does
    for epoch in (1, 2):
        n, dt = _epoch(kds)
        rows.append(("keras image_dataset_from_directory", f"epoch {epoch} (no cache)", n, dt))

    print()
    print(f"{'pipeline':36s} {'epoch':36s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
    for pipe, epoch, n, dt in rows:
        print(f"{pipe:36s} {epoch:36s} {n:7d} {dt:8.2f} {n / dt:9.1f}")
    cold = rows[0][2] / rows[0][3]
    warm = rows[1][2] / rows[1][3]
    keras_rate = sum(r[2] for r in rows[2:]) / sum(r[3] for r in rows[2:])
    print()
    print(f"warm / cold (cxr):                       {warm / cold:6.1f}x")
    print(f"cxr cold / keras (mean of its 2 epochs): {cold / keras_rate:6.2f}x")
    print(f"cxr warm / keras (mean of its 2 epochs): {warm / keras_rate:6.1f}x")
    print("note: image_dataset_from_directory has no cache (every epoch re-decodes) and reads all "
          f"of train/ ({rows[2][2]} images), not the carved train split; its resize is bilinear "
          "without antialiasing. Rates are per image, so the counts differ but compare.")

    figures["train_split_images"] = len(train)
    figures["rows"] = [{"pipeline": p, "epoch": e, "images": n, "seconds": round(dt, 3),
                        "img_per_s": round(n / dt, 1)} for p, e, n, dt in rows]
    figures["cxr_cold_img_per_s"] = round(cold, 1)
    figures["cxr_warm_img_per_s"] = round(warm, 1)
    figures["keras_img_per_s"] = round(keras_rate, 1)
    figures["ratio_warm_over_cold"] = round(warm / cold, 2)
    figures["ratio_cxr_cold_over_keras"] = round(cold / keras_rate, 2)
    figures["ratio_cxr_warm_over_keras"] = round(warm / keras_rate, 2)
    write_results(args.json, "input_pipeline", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
