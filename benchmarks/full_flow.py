"""Benchmark: the whole retraining flow (`cxr run`) on a data set: wall time, the time of
each stage, tuner trials, peak memory, and the registered model's test metrics.

Runs `cxr run --data-dir DATA --profile PROFILE` in a subprocess with a fresh state home
(its own sqlite MLflow store and a temporary Prefect server), so nothing of an earlier run
is reused. Peak RSS is the largest resident set of the flow process (and any child it
waited for).

Usage: python benchmarks/full_flow.py [DATA_DIR] [--profile full] [--config FILE]
           [--seed N] [--external NAME=DIR ...] [--unlabeled DIR] [--calibration DIR]
           [--json benchmarks/results/full_flow.json]    (DATA_DIR defaults to $CXR_REAL_DATA)

``--external``, ``--unlabeled`` and ``--calibration`` are passed on to ``cxr run``; the
external sets' metrics (scored at the model's threshold, never used to choose anything) and
the site threshold chosen on the calibration sample are printed with the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_data_and_json_args, parse_with_data, write_results


def _rounded(value: object) -> object:
    """``value`` with every float rounded to 4 places, nested dicts included."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def _config_with_seed(config: str | None, seed: int, home: Path) -> Path:
    """A copy of ``config`` (or an empty one) with ``seed`` set, written into ``home``."""
    import yaml

    doc = yaml.safe_load(Path(config).read_text()) if config else {}
    doc = {**(doc or {}), "seed": seed}
    home.mkdir(parents=True, exist_ok=True)
    out = home / "benchmark-config.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_json_args(parser, "full_flow")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--config", help="an experiment config file to pass on")
    parser.add_argument("--home", help="state home to use (default: a fresh temporary one)")
    parser.add_argument("--external", action="append", default=[], metavar="NAME=DIR",
                        help="an external validation set to score (repeatable)")
    parser.add_argument("--unlabeled", help="unlabeled site images for pseudo-labels")
    parser.add_argument("--calibration", help="a labelled site sample for the site threshold")
    parser.add_argument("--seed", type=int,
                        help="the experiment seed, set over --config's (default: the config's)")
    args = parse_with_data(parser, argv)

    home = Path(args.home or tempfile.mkdtemp(prefix="cxr-bench-home-"))
    result_file = home / "result.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--data-dir", args.data_dir,
           "--profile", args.profile, "--json-out", str(result_file)]
    config = _config_with_seed(args.config, args.seed, home) if args.seed is not None \
        else args.config
    if config:
        cmd += ["--config", str(config)]
    for spec in args.external:
        cmd += ["--external", spec]
    if args.unlabeled:
        cmd += ["--unlabeled", args.unlabeled]
    if args.calibration:
        cmd += ["--calibration", args.calibration]
    env = {**os.environ, "CXR_HOME": str(home)}
    env.pop("CXR_TRACKING_URI", None)  # the fresh home's own sqlite store
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    flow = json.loads(result_file.read_text()) if result_file.is_file() else {}
    figures = {
        "data_dir": args.data_dir, "profile": args.profile, "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak_mb),
        "trials": flow.get("trials"), "stage_seconds": flow.get("stage_seconds"),
        "model_version": flow.get("model_version"), "model_uri": flow.get("model_uri"),
        "threshold": flow.get("threshold"),
        "site_threshold": flow.get("site_threshold"),
        "test_metrics": {k: round(v, 4) for k, v in (flow.get("test_metrics") or {}).items()
                         if isinstance(v, float)},
        # Worst value of each metric over the robustness report's acquisition shifts.
        "robust_worst": {k: round(v, 4) for k, v in (flow.get("robust_worst") or {}).items()},
        "calibration": flow.get("calibration"),
        "external_metrics": _rounded(flow.get("external_metrics") or {}),
        "best_hyperparameters": flow.get("best_hyperparameters"),
    }
    print(json.dumps(figures, indent=2))
    if proc.returncode:
        print("\n".join(tail), file=sys.stderr)
    write_results(args.json, "full_flow", figures, argv)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
