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

Runs whose result already exists under ``--work`` are not run again, so an interrupted
benchmark resumes.

Usage: python benchmarks/flow_crossfit.py [DATA_DIR] --site DIR --work DIR [--seed N]
           [--config FILE] [--profile full] [--json FILE]     (DATA_DIR: $CXR_REAL_DATA)
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


def write_halves(site: Path, work: Path) -> list[Path]:
    """The site set's two halves (:func:`site_halves`) as folders of symbolic links
    (NORMAL/, PNEUMONIA/) under ``work``; written once, reused after."""
    from external import _external_rows

    rows, _ = _external_rows(site, work)
    folders = []
    for k, half in enumerate(site_halves(rows)):
        folder = work / f"half{k}"
        if not folder.is_dir():
            for r in half.itertuples():
                link = folder / r.label / Path(r.path).name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(r.path).resolve())
        folders.append(folder)
    return folders


def run_fold(k: int, unlabeled: Path, held: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One flow run (skipped when its figures exist): unlabeled = one half, held = the other."""
    home = Path(args.work) / f"seed{args.seed}" / f"fold{k}"
    figures = home / "full_flow.json"
    if not figures.is_file():
        cmd = [sys.executable, str(HERE / "full_flow.py"), args.data_dir,
               "--profile", args.profile, "--seed", str(args.seed), "--home", str(home),
               "--unlabeled", str(unlabeled), "--external", f"held={held}",
               "--json", str(figures)]
        if args.config:
            cmd += ["--config", args.config]
        print(f"[crossfit] fold {k}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return {"home": str(home), **json.loads(figures.read_text())}


def held_predictions(fold: dict[str, Any], held: Path) -> Any:
    """The fold's registered model's predictions on its held half, aligned to its threshold."""
    from external import _aligned, _external_rows, _predict

    from cxr_core.lifecycle.predict import load_model

    home = Path(fold["home"])
    loaded = load_model(fold["model_uri"], f"sqlite:///{home / 'mlflow.db'}")
    rows, _ = _external_rows(held, home)
    return _aligned(_predict(loaded, rows), loaded.threshold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_json_args(parser, "flow_crossfit")
    parser.add_argument("--site", required=True, help="the labelled site set to split")
    parser.add_argument("--work", required=True, help="folder for the halves and the runs")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--config", help="an experiment config file to pass on")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parse_with_data(parser, argv)

    import pandas as pd
    from external import _score

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    halves = write_halves(Path(args.site), work)
    folds = [run_fold(k, halves[k], halves[1 - k], args) for k in (0, 1)]
    pooled = pd.concat([held_predictions(f, halves[1 - k]) for k, f in enumerate(folds)],
                       ignore_index=True).sort_values("path")
    out = work / f"seed{args.seed}" / "held_predictions.csv"
    pooled.to_csv(out, index=False)
    figures = {
        "site": str(Path(args.site).resolve()), "seed": args.seed, "config": args.config,
        "pooled_held": _score(pooled, 0.5, args.n_bootstrap, 0.97),
        "folds": [{key: f.get(key) for key in ("wall_seconds", "peak_rss_mb", "trials",
                                               "model_version", "threshold", "test_metrics",
                                               "robust_worst", "external_metrics",
                                               "best_hyperparameters")} for f in folds],
        "predictions": str(out),
    }
    print(json.dumps(figures, indent=2, default=str))
    write_results(args.json, "flow_crossfit", figures, argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.exit(main())
