"""Benchmark: training images/s, validation ROC-AUC and peak memory of the default CNN
against the seed baseline, on the same training images in the same order.

Both models train on an identical stream: the project's ``make_dataset`` over the carved
train split (cached, reshuffled each pass with the config seed), re-batched into full
batches, repeated to ``--images`` images. The seed baseline sees the same gray images
repeated to three channels (``tf.image.grayscale_to_rgb``). Each model trains in its own
subprocess, so its peak RSS is its own. No validation runs during training; ROC-AUC on the
carved validation split is computed once, after the last step.

Timing: the first epoch (graph tracing and filling the decode cache) is excluded; images/s
is the images of epochs 2..E over their time (epoch begin to epoch end; no validation runs
inside an epoch). At least two epochs always run.

Usage: python benchmarks/train_throughput.py [DATA_DIR] [--images N] [--image-size 128]
           [--mixed-precision | --no-mixed-precision] [--json FILE]
       (DATA_DIR defaults to $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 32
TARGET_SPEEDUP = 8.0
MODELS = ("default", "seed")


def default_arch() -> dict:
    """The default architecture: the CxrHyperModel search space's default hyperparameters
    (what a search starts from), without in-model augmentation."""
    import keras_tuner as kt

    from cxr_core.training.model import CxrHyperModel

    hp = kt.HyperParameters()
    CxrHyperModel(32).build(hp)  # registers the space's defaults in hp
    return {**hp.values, "augment": None}


# ---------------------------------------------------------------------------- shared helpers

def _split_from_json(obj: dict):
    import numpy as np

    from cxr_core.data.inputs import SplitData

    return SplitData(list(obj["paths"]), np.asarray(obj["labels"], np.int32))


def training_stream(train, image_size: int, seed: int, steps: int, rgb: bool):
    """The project's pipeline, re-batched into full batches, repeated, ``steps`` batches long.

    Built afresh with the same seed, it yields the same images in the same order."""
    import tensorflow as tf

    from cxr_core.data.inputs import make_dataset

    ds = make_dataset(train, image_size, BATCH, shuffle=True, seed=seed)
    ds = ds.unbatch().repeat().batch(BATCH, drop_remainder=True).take(steps)
    if rgb:
        ds = ds.map(lambda x, y: (tf.image.grayscale_to_rgb(x), y),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def stream_fingerprint(train, image_size: int, seed: int, steps: int) -> str:
    """Hash of the labels and per-image pixel sums of the stream, in order."""
    import numpy as np

    h = hashlib.sha256()
    for x, y in training_stream(train, image_size, seed, steps, rgb=False):
        h.update(np.asarray(y, np.float32).tobytes())
        h.update(np.asarray(x, np.float64).sum(axis=(1, 2, 3)).tobytes())
    return h.hexdigest()[:16]


class RssSampler:
    """Peak resident set size by sampling /proc/self/statm (TF allocates outside Python, so
    tracemalloc sees little of it)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# ---------------------------------------------------------------------------- worker

def run_worker(args: argparse.Namespace) -> int:
    """Train one model in this process and write its figures to ``--result-file``."""
    from cxr_core.data.inputs import configure_tensorflow

    configure_tensorflow()
    with RssSampler() as sampler:
        import keras
        import tensorflow as tf
        from seed_baseline import seed_baseline
        from sklearn.metrics import roc_auc_score

        from cxr_core.data.inputs import make_dataset
        from cxr_core.training.model import build_cnn

        plan = json.loads(Path(args.split_file).read_text())
        train, val = _split_from_json(plan["train"]), _split_from_json(plan["val"])
        size, seed = plan["image_size"], plan["seed"]
        epochs, spe = plan["epochs"], plan["steps_per_epoch"]
        rgb = args.worker == "seed"

        keras.utils.set_random_seed(seed)
        if rgb:
            model = seed_baseline(size, learning_rate=1e-3)
            precision = "float32"
        else:
            model = build_cnn(size, mixed_precision=plan["mixed_precision"], seed=seed,
                              **default_arch())
            precision = "mixed_bfloat16" if plan["mixed_precision"] else "float32"
        stream = training_stream(train, size, seed, epochs * spe, rgb=rgb)

        starts: list[float] = []
        ends: list[float] = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                starts.append(time.perf_counter())

            def on_epoch_end(self, epoch, logs=None):
                ends.append(time.perf_counter())

        t0 = time.perf_counter()
        model.fit(stream, epochs=epochs, steps_per_epoch=spe, callbacks=[Clock()], verbose=0,
                  shuffle=False)
        train_wall = time.perf_counter() - t0
        per_epoch = [spe * BATCH / (e - s) for s, e in zip(starts, ends)]
        timed_s = sum(e - s for s, e in zip(starts[1:], ends[1:]))
        timed_images = (epochs - 1) * spe * BATCH

        val_ds = make_dataset(val, size, 64, shuffle=False, seed=seed)
        if rgb:
            val_ds = val_ds.map(lambda x, y: (tf.image.grayscale_to_rgb(x), y))
        t1 = time.perf_counter()
        proba = model.predict(val_ds, verbose=0).ravel()
        predict_s = time.perf_counter() - t1
        val_auc = float(roc_auc_score(val.labels, proba))
        params = int(model.count_params())
    result = {
        "model": args.worker,
        "precision": precision,
        "params": params,
        "epochs": epochs,
        "steps_per_epoch": spe,
        "train_images": epochs * spe * BATCH,
        "timed_images": timed_images,
        "timed_s": round(timed_s, 2),
        "img_per_s": round(timed_images / timed_s, 1),
        "epoch_img_per_s": [round(r, 1) for r in per_epoch],
        "train_wall_s": round(train_wall, 1),
        "val_images": len(val),
        "val_predict_s": round(predict_s, 2),
        "val_auc": round(val_auc, 4),
        "peak_rss_mb_sampled": round(sampler.peak / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    Path(args.result_file).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------- driver

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_json_args(parser, "train_throughput")
    parser.add_argument("--images", type=int, default=None,
                        help="training images per model (default: 3 passes over the train split)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=False,
                        help="mixed_bfloat16 for the default model (the seed baseline is float32)")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--split-file", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parse_with_data(parser)
    if args.worker:
        return run_worker(args)

    from cxr_core.config import load_config
    from cxr_core.data.inputs import configure_tensorflow, split_data
    from cxr_core.data.splits import scan_and_split

    cfg = load_config(profile="full")
    scan = scan_and_split(Path(args.data_dir), cfg.data, cfg.seed)
    train, val = split_data(scan.manifest, "train"), split_data(scan.manifest, "val")
    size = args.image_size
    requested = args.images if args.images is not None else 3 * len(train)
    steps = requested // BATCH
    pass_steps = max(1, len(train) // BATCH)
    epochs = max(2, round(steps / pass_steps))
    spe = max(1, steps // epochs)
    n_images = epochs * spe * BATCH
    cores = os.cpu_count() or 1
    print(f"carved splits: train {len(train)}, val {len(val)} images; {size}x{size}, batch "
          f"{BATCH}, {cores} CPU cores")
    print(f"each model: {n_images} training images = {epochs} epochs x {spe} steps "
          f"(requested {requested}); default model precision: "
          f"{'mixed_bfloat16' if args.mixed_precision else 'float32'}, seed baseline: float32")

    configure_tensorflow()
    fingerprint = stream_fingerprint(train, size, cfg.seed, epochs * spe)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        split_file = Path(tmp) / "plan.json"
        split_file.write_text(json.dumps({
            "train": {"paths": train.paths, "labels": train.labels.tolist()},
            "val": {"paths": val.paths, "labels": val.labels.tolist()},
            "image_size": size, "seed": cfg.seed, "epochs": epochs, "steps_per_epoch": spe,
            "mixed_precision": args.mixed_precision,
        }))
        for name in MODELS:
            out = Path(tmp) / f"{name}.json"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                   "--worker", name, "--split-file", str(split_file),
                                   "--result-file", str(out)])
            if proc.returncode != 0 or not out.exists():
                print(f"{name}: worker failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results[name] = json.loads(out.read_text())
            r = results[name]
            print(f"  {name}: done in {time.perf_counter() - t0:.0f} s; images/s by epoch "
                  f"{r['epoch_img_per_s']}")

    d, s = results["default"], results["seed"]
    speedup = d["img_per_s"] / s["img_per_s"]
    print()
    print("images/s: epochs 2..E only (epoch 1 = graph tracing + decode-cache fill, excluded); "
          "no validation during training")
    print(f"{'model':9s} {'precision':15s} {'params':>10s} {'images':>7s} {'img/s':>8s} "
          f"{'val AUC':>8s} {'peak RSS MB':>12s} {'ru_maxrss MB':>13s}")
    for name in MODELS:
        r = results[name]
        print(f"{name:9s} {r['precision']:15s} {r['params']:10d} {r['train_images']:7d} "
              f"{r['img_per_s']:8.1f} {r['val_auc']:8.4f} {r['peak_rss_mb_sampled']:12.1f} "
              f"{r['ru_maxrss_mb']:13.1f}")
    print(f"ratio images/s default / seed: {speedup:.1f}x")
    print(f"both models saw the same {n_images} images in the same order "
          f"(stream fingerprint {fingerprint}); val AUC on {d['val_images']} carved val images")
    fast = speedup >= TARGET_SPEEDUP
    good = d["val_auc"] >= s["val_auc"]
    met = fast and good
    print(f"target (>= {TARGET_SPEEDUP:.0f}x images/s at equal or better val AUC): "
          f"{'MET' if met else 'NOT MET'} (speed {speedup:.1f}x: {'ok' if fast else 'short'}; "
          f"AUC {d['val_auc']:.4f} vs {s['val_auc']:.4f}: {'ok' if good else 'lower'})")

    if args.json:
        figures = {"data_dir": str(args.data_dir), "cpu_cores": cores, "image_size": size,
                   "batch_size": BATCH, "train_split_images": len(train),
                   "val_split_images": len(val), "train_images_per_model": n_images,
                   "epochs": epochs, "steps_per_epoch": spe,
                   "timing": "epochs 2..E, training steps only (epoch 1 excluded)",
                   "stream_fingerprint": fingerprint, "models": results,
                   "ratio_img_per_s_default_over_seed": round(speedup, 2),
                   "target_speedup": TARGET_SPEEDUP, "target_met": met}
        write_results(args.json, "train_throughput", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
