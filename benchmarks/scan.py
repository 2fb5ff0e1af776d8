"""Benchmark: scan (hash + full decode) and validate a data set; prints images/s.

Usage: python benchmarks/scan.py [DATA_DIR]   (default: $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from cxr_core.config import load_config
from cxr_core.dataset import validate_dataset
from cxr_core.manifest import scan_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", nargs="?", default=os.environ.get("CXR_REAL_DATA"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/scan.json"),
                        help="where the figures are written (JSON)")
    args = parser.parse_args()
    if not args.data_dir:
        print("give DATA_DIR or set CXR_REAL_DATA", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    figures: dict[str, object] = {"data_dir": str(args.data_dir), "cpu_cores": cores,
                                  "machine": platform.processor() or platform.machine()}
    for workers in sorted({1, cores}):
        t0 = time.perf_counter()
        scan = scan_dataset(Path(args.data_dir), workers=workers)
        dt = time.perf_counter() - t0
        n = len(scan.manifest)
        figures[f"scan_{workers}_workers_s"] = round(dt, 2)
        figures[f"scan_{workers}_workers_img_per_s"] = round(n / dt, 1)
        figures["images"] = n
        print(f"scan   workers={workers}: {n} images in {dt:6.2f} s = {n / dt:7.1f} images/s")
    cfg = load_config(profile="full")
    t0 = time.perf_counter()
    _, report = validate_dataset(Path(args.data_dir), cfg.data, cfg.validation, cfg.seed)
    dt = time.perf_counter() - t0
    figures["validate_total_s"] = round(dt, 2)
    print(f"validate (scan + splits + GX, all cores): {dt:6.2f} s, passed={report.passed}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
