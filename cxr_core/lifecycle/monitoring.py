"""Drift checks of prediction batches: compare with the model's reference, write
``<output>.drift.json`` and ``<output>.drift.md``, log the check to MLflow.

Used by ``cxr predict`` and the batch-predict flow; the Prefect event that can trigger a
retrain is emitted by the flows layer (flows/drift.py), since cxr_core never imports Prefect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.evaluation.drift import DriftReport, compare, compute_features, load_reference

MONITORING_SUFFIX = "-monitoring"  # experiment of drift checks: <experiment>-monitoring


@dataclass
class DriftOutcome:
    report: DriftReport
    json_path: Path
    summary_path: Path
    run_id: str | None = None


def drift_paths(output: Path) -> tuple[Path, Path]:
    """``preds.csv`` -> ``preds.drift.json``, ``preds.drift.md``."""
    output = Path(output)
    return (output.with_name(output.stem + ".drift.json"),
            output.with_name(output.stem + ".drift.md"))


def check_batch(loaded: Any, paths: list[str], output: Path, model_uri: str,
                alpha: float = 0.01, min_images: int = 20, seed: int = 0) -> DriftOutcome:
    """Compare the scored files with ``loaded``'s reference and write both reports. A model
    without a reference (trained before references existed) gets a skipped report."""
    if loaded.reference_path is None:
        report = DriftReport(False, [], len(paths), 0, alpha, [], {}, float("nan"), model_uri,
                             skipped="the model carries no drift reference (registered before "
                                     "drift references existed): retrain to get one")
    else:
        reference = load_reference(loaded.reference_path)
        batch, _ = compute_features(loaded.model, loaded.image_size, paths)
        report = compare(reference, batch, loaded.threshold, alpha=alpha,
                         min_images=min_images, seed=seed, model=model_uri)
    json_path, md_path = drift_paths(output)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(report.to_json(), encoding="utf-8")
    md_path.write_text(report.summary(), encoding="utf-8")
    return DriftOutcome(report, json_path, md_path)


def log_check(client: Any, experiment_name: str, outcome: DriftOutcome, output: Path,
              artifact_location: str | None = None) -> str:
    """One MLflow run per check in ``<experiment>-monitoring``: the verdict as tags, every
    test's statistic and adjusted p-value as metrics, both reports as artifacts."""
    from cxr_core.lifecycle.tracking import ensure_experiment, log_metrics, start_run

    r = outcome.report
    exp = ensure_experiment(client, experiment_name + MONITORING_SUFFIX, artifact_location)
    run_id = start_run(client, exp, f"drift-{Path(output).stem}",
                       params={"alpha": r.alpha, "n_reference": r.n_reference,
                               "model_uri": r.model},
                       tags={"cxr.stage": "monitoring", "cxr.drifted": str(r.drifted).lower(),
                             "cxr.model_uri": r.model, "cxr.predictions": str(output),
                             "cxr.drift_skipped": r.skipped or ""})
    metrics = {"drifted": float(r.drifted), "n_images": r.n_images,
               "histogram_js_distance": r.histogram_js_distance,
               **{f"positive_share_{k}": v for k, v in r.positive_share.items()}}
    for t in r.tests:
        metrics[f"drift_stat_{t.name}"] = t.statistic
        metrics[f"drift_p_{t.name}"] = t.p_adjusted
    log_metrics(client, run_id, {k: v for k, v in metrics.items()
                                 if v is not None and not math.isnan(float(v))})
    client.log_artifact(run_id, str(outcome.json_path), "drift")
    client.log_artifact(run_id, str(outcome.summary_path), "drift")
    client.set_terminated(run_id, "FINISHED")
    outcome.run_id = run_id
    return run_id
