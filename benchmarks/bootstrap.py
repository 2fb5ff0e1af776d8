"""Benchmark: seconds for the evaluation's bootstrap intervals (every metric, 1,000 resamples)
of a test set's predictions, resampling images and resampling patients.

Synthetic predictions (the time does not depend on the images): labels, overlapping scores
and a patient id per image. The evaluate stage runs this once per model on the test split
(624 images in the real data); it used to be a wall-clock assertion in the unit tests,
which failed on a loaded machine.

Usage: python benchmarks/bootstrap.py [--images 1000] [--per-patient 5] [--resamples 1000]
       [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, write_results

from cxr_core.evaluation.metrics import evaluate_predictions


def _predictions(n: int, per_patient: int, seed: int = 8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1)
    return y, p, np.arange(n) // per_patient


def _seconds(repeats: int, **kwargs) -> list[float]:
    evaluate_predictions(**{**kwargs, "n_bootstrap": 10})  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_predictions(**kwargs)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-patient", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "bootstrap.json")
    args = parser.parse_args(argv)
    y, p, patient = _predictions(args.images, args.per_patient)
    common = dict(y_true=y, y_prob=p, threshold=0.5, n_bootstrap=args.resamples)
    figures: dict[str, object] = {"images": args.images, "patients": int(patient.max()) + 1,
                                  "resamples": args.resamples, "repeats": args.repeats}
    for unit, groups in (("images", None), ("patients", patient)):
        times = _seconds(args.repeats, **common, groups=groups)
        figures[f"{unit}_median_s"] = round(statistics.median(times), 4)
        figures[f"{unit}_max_s"] = round(max(times), 4)
        print(f"bootstrap over {unit:8s}: {args.images} images, {args.resamples} resamples: "
              f"median {statistics.median(times):.3f} s, max {max(times):.3f} s "
              f"({args.repeats} runs)")
    write_results(args.json, "bootstrap", figures, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
