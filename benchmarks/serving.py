"""Benchmark: the image-native model server (``mlflow models serve`` of a cxr model folder)
over HTTP on 127.0.0.1: single-image latency (p50/p95 of sequential requests, one base64
JPEG each) and batch throughput (requests of --batch images).

Usage: python benchmarks/serving.py [DATA_DIR] [--model DIR] [--requests N] [--batch B]
Without --model it serves the search space's default architecture at 96 px (the full
profile's size) with untrained weights and threshold 0.5: speed does not depend on weights.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from _common import add_data_and_json_args, parse_with_data, write_results


def _model_folder(model: str | None, size: int) -> Path:
    from cxr_core.lifecycle.serving import write_model_folder

    tmp = Path(tempfile.mkdtemp(prefix="cxr-serve-bench-"))
    if model:
        return write_model_folder(Path(model), tmp / "mlmodel")
    import keras_tuner as kt

    from cxr_core.training.fit import ThresholdChoice, save_threshold
    from cxr_core.training.model import CxrHyperModel

    CxrHyperModel(size).build(kt.HyperParameters()).save(tmp / "model.keras")
    save_threshold(tmp / "threshold.json", ThresholdChoice(0.5, 0.95, 0.9, 0.5, 0.95, 1, 1))
    return write_model_folder(tmp, tmp / "mlmodel")


def _post(url: str, images: list[str]) -> list[dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[b] for b in images]}}).encode()
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["predictions"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_and_json_args(parser, "serving")
    parser.add_argument("--model", help="a training output folder (model.keras, threshold.json)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parse_with_data(parser)
    from flows.servers import start_model_server

    files = sorted(glob.glob(str(Path(args.data_dir) / "**" / "*.jpeg"), recursive=True))
    payloads = [base64.b64encode(Path(f).read_bytes()).decode() for f in
                files[: max(args.requests, args.batch * args.batches)]]
    folder = _model_folder(args.model, args.size)
    server = start_model_server(str(folder), folder.parent / "serve.log")
    try:
        for p in payloads[:5]:  # warm-up: graph tracing
            _post(server.url, [p])
        latencies = []
        for p in payloads[: args.requests]:
            t = time.perf_counter()
            out = _post(server.url, [p])
            latencies.append((time.perf_counter() - t) * 1000)
            assert out[0]["error"] == "", out
        t0 = time.perf_counter()
        n = 0
        for i in range(args.batches):
            chunk = payloads[(i * args.batch) % len(payloads):][: args.batch]
            n += len(_post(server.url, chunk))
        batch_s = time.perf_counter() - t0
    finally:
        server.stop()
    p50, p95 = statistics.median(latencies), float(np.percentile(latencies, 95))
    rate = n / batch_s
    mean_kb = sum(len(p) for p in payloads) / len(payloads) / 1024
    print(f"single  : p50 {p50:.1f} ms, p95 {p95:.1f} ms per request of one image "
          f"({len(latencies)} sequential requests, base64 JPEG ~{mean_kb:.0f} KB)")
    print(f"batch   : {n} images in {batch_s:.2f} s = {rate:.0f} images/s "
          f"({args.batches} requests of {args.batch})")
    write_results(args.json, "serving", {
        "latency_p50_ms": p50, "latency_p95_ms": p95, "requests": len(latencies),
        "batch_images_per_s": rate, "batch_size": args.batch, "image_size": args.size,
        "model": args.model or "default architecture, untrained"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
