"""Benchmark: scan (hash + full decode) and validate a data set; prints images/s.

Usage: python benchmarks/scan.py [DATA_DIR]   (default: $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results

from cxr_core.config import load_config
from cxr_core.data.manifest import scan_dataset
from cxr_core.data.validate import validate_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_and_json_args(parser, "scan")
    args = parse_with_data(parser)
    cores = os.cpu_count() or 1
    figures: dict[str, object] = {"data_dir": str(args.data_dir), "cpu_cores": cores}
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
    write_results(args.json, "scan", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
