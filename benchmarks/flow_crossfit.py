"""Benchmark: the whole retraining flow with pseudo-labels (`cxr run --unlabeled`), scored
on site images it never saw, cross-fitted over the site set's patient halves.

The site set (e.g. the external development half) is split in two by patient, stratified by
label, identical images kept on one side (the flow refuses unlabeled images identical to
an external set's). Each half becomes a folder of symbolic
links (the images are never copied). The flow runs twice, as `benchmarks/full_flow.py`
runs it (fresh state home, `cxr run --profile PROFILE`): once given half 0 as unlabeled
images with half 1 as its external set `held`, once the reverse. The held-out halves'
predictions (the registered models, as `cxr predict` scores) are pooled, each aligned to
its own model's threshold, and scored with patient-bootstrap intervals.

With ``--calibration`` each held half is split in two again (the same way): the flow is
also given one part as its site-calibration sample (``--calibration``) and scores the other
as its external set, so the site threshold it stores is measured on images it never saw.
The benchmark then swaps the parts (the registered model's scores on the scored part
choose the threshold, with the flow's rule, for the calibration part), and the four parts,
each aligned to its own site threshold, are pooled and scored beside the model-threshold
figures: what a site gets from `cxr run --unlabeled A --calibration B` on images in neither.

Runs whose result already exists under ``--work`` are not run again, so an interrupted
benchmark resumes.

Usage: python benchmarks/flow_crossfit.py [DATA_DIR] --site DIR --work DIR [--seed N]
           [--config FILE] [--profile full] [--calibration] [--folds 0,1]
           [--json FILE]
           (DATA_DIR: $CXR_REAL_DATA)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import add_data_and_json_args, parse_with_data, write_results

HERE = Path(__file__).resolve().parent


def linked_groups(rows: Any) -> list[int]:
    """A group per row such that rows sharing a patient id or identical bytes (sha256) share
    a group: the flow refuses unlabeled images identical to an external set's, and the
    external development half holds identical images under different patient ids."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rows)
    # One graph of rows and values (node n + a patient id's number, 2n + a digest's): rows
    # that share a value are connected.
    values = [k * n + rows.groupby(rows[c].astype(str), sort=False).ngroup().to_numpy()
              for k, c in ((1, "patient_id"), (2, "sha256"))]
    graph = coo_matrix((np.ones(2 * n), (np.tile(np.arange(n), 2), np.concatenate(values))),
                       shape=(3 * n, 3 * n))
    _, labels = connected_components(graph, directed=False)
    return labels[:n].tolist()


def site_halves(rows: Any) -> list[Any]:
    """Two halves of ``rows`` by :func:`linked_groups`, stratified by label (fixed seed)."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=0)
    return [rows.iloc[idx].reset_index(drop=True) for _, idx in
            folds.split(np.zeros(len(rows)), rows["label"], linked_groups(rows))]


def write_links(rows: Any, folder: Path) -> Path:
    """``rows`` as a folder of symbolic links (NORMAL/, PNEUMONIA/); written once, reused."""
    if not folder.is_dir():
        for r in rows.itertuples():
            link = folder / r.label / Path(r.path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(r.path).resolve())
    return folder


def write_halves(site: Path, work: Path) -> tuple[list[Path], list[list[Path]]]:
    """The site set's two halves (:func:`site_halves`) and each half's two parts (the same
    split again) as folders of symbolic links under ``work``: ([half 0, half 1],
    [[half 0 part 0, half 0 part 1], [half 1 part 0, half 1 part 1]])."""
    from external import _external_rows

    rows, _ = _external_rows(site, work)
    halves, parts = [], []
    for k, half in enumerate(site_halves(rows)):
        halves.append(write_links(half, work / f"half{k}"))
        parts.append([write_links(part, work / f"half{k}-part{j}")
                      for j, part in enumerate(site_halves(half))])
    return halves, parts


def run_dir(args: argparse.Namespace) -> Path:
    """The folder of this seed's runs (apart for ``--calibration``: other flow arguments)."""
    return Path(args.work) / f"seed{args.seed}{'-calibration' if args.calibration else ''}"


def run_fold(k: int, unlabeled: Path, held: Path, args: argparse.Namespace,
             calibration: Path | None = None) -> dict[str, Any]:
    """One flow run (skipped when its figures exist): unlabeled = one half, held = the other
    (or, with ``calibration``, the other's part that is not the calibration sample)."""
    home = run_dir(args) / f"fold{k}"
    figures = home / "full_flow.json"
    if not figures.is_file():
        cmd = [sys.executable, str(HERE / "full_flow.py"), args.data_dir,
               "--profile", args.profile, "--seed", str(args.seed), "--home", str(home),
               "--unlabeled", str(unlabeled), "--external", f"held={held}",
               "--json", str(figures)]
        if calibration is not None:
            cmd += ["--calibration", str(calibration)]
        if args.config:
            cmd += ["--config", args.config]
        print(f"[crossfit] fold {k}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return {"home": str(home), **json.loads(figures.read_text())}


def held_predictions(fold: dict[str, Any], held: Path) -> tuple[Any, float]:
    """The fold's registered model's predictions (as `cxr predict` computes them) on the
    images under ``held``, and the model's threshold."""
    from external import _external_rows, _predict

    from cxr_core.lifecycle.predict import load_model

    home = Path(fold["home"])
    loaded = load_model(fold["model_uri"], f"sqlite:///{home / 'mlflow.db'}")
    rows, _ = _external_rows(held, home)
    return _predict(loaded, rows), loaded.threshold


def recall_target(fold: dict[str, Any]) -> float:
    """The recall target the fold's flow chose its thresholds for (its run's resolved
    config: the ``full`` profile's is 0.98, not the shipped default's 0.97)."""
    import yaml

    (config,) = Path(fold["home"]).glob("runs/*/config.yaml")
    return float(yaml.safe_load(config.read_text())["gates"]["recall_target_for_threshold"])


def site_calibrated_parts(fold: dict[str, Any], preds: Any, parts: list[Path],
                          target: float) -> tuple[list[Any], dict[str, Any]]:
    """The fold's held half scored at site thresholds: part 1 at the threshold the flow
    chose on part 0 (its ``--calibration`` sample), part 0 at the one the same rule chooses
    on part 1's labels (the swap), each aligned to its threshold; with the thresholds, and
    the flow's choice recomputed from ``preds`` as a check."""
    from external import _aligned

    from cxr_core.training.fit import choose_threshold

    def key(path: Path) -> str:  # label folder and file name: the same in half and part
        return f"{path.parent.name}/{path.name}"

    def part(j: int) -> Any:
        keys = {key(p) for p in parts[j].glob("*/*")}
        return preds[preds["path"].map(lambda s: key(Path(s)) in keys)]

    flow_t = float(fold["site_threshold"]["threshold"])
    again = choose_threshold(part(0)["label"].to_numpy(), part(0)["probability"].to_numpy(),
                             target).threshold
    swapped = choose_threshold(part(1)["label"].to_numpy(), part(1)["probability"].to_numpy(),
                               target).threshold
    info = {"flow_site_threshold": flow_t, "recomputed_site_threshold": round(again, 6),
            "swapped_site_threshold": round(swapped, 6),
            "calibration_images": [len(part(0)), len(part(1))]}
    return [_aligned(part(1), flow_t), _aligned(part(0), swapped)], info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_json_args(parser, "flow_crossfit")
    parser.add_argument("--site", required=True, help="the labelled site set to split")
    parser.add_argument("--work", required=True, help="folder for the halves and the runs")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--config", help="an experiment config file to pass on")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--calibration", action="store_true",
                        help="also give each flow half of the held half as its site-"
                             "calibration sample and score the site thresholds")
    parser.add_argument("--folds", default="0,1",
                        help="the folds to run and pool (0: unlabeled half 0, scores half 1); "
                             "one fold scores one half only")
    args = parse_with_data(parser, argv)

    import pandas as pd
    from external import _aligned, _score

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    halves, parts = write_halves(Path(args.site), work)
    ks = sorted({int(k) for k in args.folds.split(",")})
    folds = [run_fold(k, halves[k], parts[1 - k][1] if args.calibration else halves[1 - k],
                      args, parts[1 - k][0] if args.calibration else None) for k in ks]
    held = [held_predictions(f, halves[1 - k]) for k, f in zip(ks, folds)]
    (target,) = {recall_target(f) for f in folds}
    pooled = pd.concat([_aligned(p, t) for p, t in held], ignore_index=True).sort_values("path")
    # Named by the folds pooled, so a one-fold run never overwrites the two-fold file.
    out = run_dir(args) / f"held_predictions-folds{'-'.join(map(str, ks))}.csv"
    pooled.to_csv(out, index=False)
    site: dict[str, Any] = {}
    if args.calibration:
        calibrated = [site_calibrated_parts(f, preds, parts[1 - k], target)
                      for k, f, (preds, _) in zip(ks, folds, held)]
        site_pooled = pd.concat([p for ps, _ in calibrated for p in ps], ignore_index=True)
        site = {"pooled_held_site_threshold": _score(site_pooled, 0.5, args.n_bootstrap,
                                                     target),
                "site_thresholds": [info for _, info in calibrated]}
    figures = {
        "site": str(Path(args.site).resolve()), "seed": args.seed, "config": args.config,
        "folds_pooled": ks,
        "recall_target": target,
        "pooled_held": _score(pooled, 0.5, args.n_bootstrap, target),
        **site,
        "folds": [{"fold": k, **{key: f.get(key) for key in (
            "wall_seconds", "peak_rss_mb", "trials", "model_version", "threshold",
            "site_threshold", "test_metrics", "robust_worst", "external_metrics",
            "best_hyperparameters")}} for k, f in zip(ks, folds)],
        "predictions": str(out),
    }
    print(json.dumps(figures, indent=2, default=str))
    write_results(args.json, "flow_crossfit", figures, argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.exit(main())
