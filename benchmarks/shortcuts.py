"""Benchmark: the per-image shortcut scores on real data. For each score, how well it alone
separates NORMAL from PNEUMONIA (ROC-AUC, oriented: 0.5 = no information) on the train
split and on the external development set, how often annotations are found per class,
and what scoring costs per image (the scan computes the scores while it decodes).

Usage: python benchmarks/shortcuts.py [DATA_DIR] [--external DIR]
(DATA_DIR default: $CXR_REAL_DATA; --external default: DATA_DIR's sibling
chest_xray_224_external_dev when it exists)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import add_data_and_json_args, parse_with_data, write_results
from PIL import Image

from cxr_core.data.manifest import scan_dataset
from cxr_core.evaluation.shortcuts import (
    CORNER_REGIONS,
    SCORE_COLUMNS,
    region_slices,
    score_aucs,
    score_image,
    to_score_gray,
)

TIMED_IMAGES = 500


def issue_definition(path: str) -> bool:
    """The issue's measure of corner text: 20+ pixels of grey level 200+ in the top 15% rows
    and outer 20% columns (at 224 px)."""
    with Image.open(path) as img:
        gray = to_score_gray(img)
    return sum(int((gray[region_slices(r, gray.shape[0])] >= 200).sum())
               for r in CORNER_REGIONS) >= 20


def scoring_ms(paths: list[str]) -> float:
    """Milliseconds per image of the scoring alone (decoded images, as in the scan)."""
    images = []
    for p in paths:
        with Image.open(p) as img:
            img.load()
            images.append(img.copy())
    t0 = time.perf_counter()
    for img in images:
        score_image(img)
    return (time.perf_counter() - t0) / len(images) * 1e3


def audit(name: str, folder: Path, figures: dict[str, object]) -> pd.DataFrame:
    """Scan ``folder`` (one worker, timed), print and record every score's AUC per split."""
    t0 = time.perf_counter()
    manifest = scan_dataset(folder, workers=1).manifest
    dt = time.perf_counter() - t0
    figures[f"{name}_scan_ms_per_image"] = round(dt / len(manifest) * 1e3, 3)
    print(f"{name}: scanned {len(manifest)} images in {dt:.1f} s "
          f"({dt / len(manifest) * 1e3:.2f} ms/image, one worker, scores included)")
    ok = manifest[manifest["readable"]]
    for row in score_aucs(manifest):
        key = f"{name}_{row['split']}_{row['score']}"
        figures[f"{key}_auc"] = row["auc"]
        figures[f"{key}_higher_in"] = row["higher_in"]
        print(f"  {row['split']:5s} {row['score']:20s} ROC-AUC {row['auc']:.3f} (higher in "
              f"{row['higher_in']}); mean NORMAL {row['mean_NORMAL']:.3f}, "
              f"PNEUMONIA {row['mean_PNEUMONIA']:.3f}")
    for label, part in ok.groupby("label"):
        found = {c: float((part[c] > 0).mean()) for c in ("annotation_top_px", "annotation_side_px")}
        literal = float(np.mean([issue_definition(p) for p in part["path"]]))
        figures[f"{name}_{label}_with_top_annotation"] = round(found["annotation_top_px"], 3)
        figures[f"{name}_{label}_with_side_annotation"] = round(found["annotation_side_px"], 3)
        figures[f"{name}_{label}_issue_definition"] = round(literal, 3)
        print(f"  {label:9s} with top-corner annotation {found['annotation_top_px']:.0%}, "
              f"side annotation {found['annotation_side_px']:.0%}; issue's definition "
              f"(20+ px >= 200 in the corners) {literal:.0%}")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_and_json_args(parser, "shortcuts")
    parser.add_argument("--external", type=Path, default=None,
                        help="an external set (default: the sibling chest_xray_224_external_dev)")
    args = parse_with_data(parser)
    data_dir = Path(args.data_dir)
    external = args.external or data_dir.parent / "chest_xray_224_external_dev"
    figures: dict[str, object] = {"data_dir": str(data_dir), "scores": list(SCORE_COLUMNS)}
    train = audit("data", data_dir, figures)
    if external.is_dir():
        figures["external_dir"] = str(external)
        audit("external", external, figures)
    paths = train[train["readable"]]["path"].head(TIMED_IMAGES).tolist()
    ms = scoring_ms(paths)
    figures["scoring_ms_per_image"] = round(ms, 3)
    print(f"scoring alone: {ms:.2f} ms/image ({len(paths)} decoded images)")
    write_results(args.json, "shortcuts", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
