"""The side-by-side report behind a promotion decision: both versions' metrics with
intervals on the images both were scored on (the shared test images, and each external set
both were scored on), McNemar's test (patients as the unit when the predictions carry patient
ids and a patient has several images), both confusion matrices and each model's worst
cases. Logged to the challenger's run and linked from its registry version, so a reader of
the MLflow UI alone sees why a model was or was not promoted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.evaluation.gates import paired_comparison
from cxr_core.evaluation.metrics import evaluate_predictions
from cxr_core.lifecycle.model_card import metrics_rows

REPORT_DIR = "promotion"
# Where a run keeps per-image predictions on an external set NAME (same columns as the test
# predictions): evaluation/external/NAME/predictions.csv. Each one found on both versions'
# runs is one more section of the report.
EXTERNAL_DIR = "evaluation/external"
EXTERNAL_FILE = "predictions.csv"
N_WORST = 8
ROLES = ("candidate", "champion")
# PairedComparison.test -> how the report names it.
_TESTS = {"exact": "exact McNemar", "clustered": "patient-clustered McNemar (Durkalski)"}


def paired_rows(candidate: pd.DataFrame, champion: pd.DataFrame) -> pd.DataFrame:
    """The images both versions were scored on, joined by sha256: label, and per role its
    probability and prediction (each at its own threshold), plus path and patient id."""
    keep = [c for c in ("sha256", "label", "path", "patient_id") if c in candidate]
    cand = candidate.drop_duplicates("sha256")[[*keep, "probability", "prediction"]]
    champ = champion.drop_duplicates("sha256")[["sha256", "probability", "prediction"]]
    return cand.merge(champ, on="sha256", suffixes=("_candidate", "_champion"))


def _evaluation(joined: pd.DataFrame, role: str, threshold: float, seed: int) -> Any:
    groups = joined["patient_id"].to_numpy(object) if "patient_id" in joined else None
    return evaluate_predictions(joined["label"].to_numpy(int),
                                joined[f"probability_{role}"].to_numpy(float), threshold,
                                seed=seed, groups=groups)


def worst_cases(joined: pd.DataFrame, role: str, k: int = N_WORST) -> pd.DataFrame:
    """The ``k`` images ``role`` got wrong most confidently (farthest from the label), with
    what the other model said about them."""
    other = ROLES[1 - ROLES.index(role)]
    wrong = joined[joined[f"prediction_{role}"] != joined["label"]]
    miss = (wrong[f"probability_{role}"] - wrong["label"]).abs()
    cols = [c for c in ("path", "sha256") if c in wrong][:1]
    return (wrong.assign(miss=miss).sort_values("miss", ascending=False, kind="stable").head(k)
            [[*cols, "label", f"probability_{role}", f"probability_{other}"]])


def compare_set(joined: pd.DataFrame, thresholds: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """One image set's side-by-side: metrics with intervals, confusion matrices, McNemar
    (all images and PNEUMONIA images; patient-clustered when ``patient_id`` is there and a
    patient has several images), worst cases of each model."""
    y = joined["label"].to_numpy(int)
    evals = {role: _evaluation(joined, role, thresholds[role], seed) for role in ROLES}
    groups = joined["patient_id"].to_numpy(object) if "patient_id" in joined else None
    mcnemar = [asdict(paired_comparison(y, joined["prediction_candidate"].to_numpy(int),
                                        joined["prediction_champion"].to_numpy(int), subset,
                                        groups))
               for subset in ("all", "positives")] if len(joined) else []
    return {"images": len(joined), "evaluations": evals, "mcnemar": mcnemar,
            "worst": {role: worst_cases(joined, role) for role in ROLES}}


def _confusion_table(evals: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {role} | {ev.confusion['tn']} | {ev.confusion['fp']} | "
                     f"{ev.confusion['fn']} | {ev.confusion['tp']} |" for role, ev in evals.items())
    return f"| model | TN | FP | FN | TP |\n| --- | --- | --- | --- | --- |\n{rows}"


def _mcnemar_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No shared images: no test."
    body = "\n".join(f"| {r['subset']} | {r['n']} | {_patients(r)} | {r['champion_only']} | "
                     f"{r['candidate_only']} | {_TESTS.get(r.get('test'), r.get('test'))} | "
                     f"{r['p_value']:.4g} |" for r in rows)
    return ("| images | n | patients | champion right, candidate wrong | candidate right, "
            "champion wrong | test | p |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            f"{body}")


def _patients(row: Mapping[str, Any]) -> str:
    return "n/a" if row.get("n_patients") is None else str(row["n_patients"])


def _worst_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "none (no misclassified image)"

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = "\n".join("| " + " | ".join(cell(v) for v in rec) + " |"
                     for rec in frame.itertuples(index=False))
    return ("| " + " | ".join(frame.columns) + " |\n|" + " --- |" * len(frame.columns) + "\n" + rows)


def _set_section(title: str, result: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    evals = {labels[r]: ev for r, ev in result["evaluations"].items()}
    worst = "\n\n".join(f"**{labels[r]}'s worst cases**\n\n{_worst_table(result['worst'][r])}"
                        for r in ROLES)
    return (f"## {title} ({result['images']} images both were scored on)\n\n"
            f"{metrics_rows(evals)}\n\n### Confusion matrices\n{_confusion_table(evals)}\n\n"
            f"### McNemar\n{_mcnemar_table(result['mcnemar'])}\n\n### Worst cases\n{worst}\n")


def render_report(name: str, candidate: str, champion: str, decision: Mapping[str, Any],
                  sets: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown report. ``decision``: the promotion's verdict (``passed``, ``alpha``,
    ``outcome`` text); ``sets``: title -> :func:`compare_set` result, the shared test
    images first, then each external set."""
    labels = {"candidate": f"v{candidate} (candidate)", "champion": f"v{champion} (champion)"}
    head = (f"# Promotion of {name} version {candidate} against champion version {champion}\n\n"
            f"**Outcome: {decision['outcome']}.** Regression checks (McNemar, alpha "
            f"{decision['alpha']}) on the shared test images: "
            f"{'passed' if decision['passed'] else 'FAILED'}. Each model is judged at its own "
            "threshold; metrics with 95% bootstrap intervals (patients resampled).\n")
    return head + "\n" + "\n".join(_set_section(t, r, labels) for t, r in sets.items())


def report_json(sets: Mapping[str, Mapping[str, Any]], decision: Mapping[str, Any]) -> dict[str, Any]:
    """The machine-readable twin of the report."""
    return {"decision": dict(decision), "sets": {
        title: {"images": r["images"], "mcnemar": r["mcnemar"],
                "evaluations": {role: ev.to_dict() for role, ev in r["evaluations"].items()},
                "worst": {role: w.to_dict(orient="records") for role, w in r["worst"].items()}}
        for title, r in sets.items()}}


def report_path(champion: str) -> str:
    """Where the report lies in the candidate's run."""
    return posixpath.join(REPORT_DIR, f"vs-champion-v{champion}.md")


def external_predictions(client: Any, run_id: str) -> dict[str, pd.DataFrame]:
    """External set name -> per-image predictions a run logged (none: an empty mapping)."""
    import tempfile

    names = [posixpath.basename(f.path) for f in client.list_artifacts(run_id, EXTERNAL_DIR) if f.is_dir]
    out = {}
    for set_name in names:
        path = posixpath.join(EXTERNAL_DIR, set_name, EXTERNAL_FILE)
        if path in {f.path for f in client.list_artifacts(run_id, posixpath.dirname(path))}:
            with tempfile.TemporaryDirectory() as tmp:
                out[set_name] = pd.read_csv(client.download_artifacts(run_id, path, tmp))
    return out


def with_threshold(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """``predictions`` with ``prediction`` at ``threshold`` (a version's own operating point)."""
    return predictions.assign(prediction=(predictions["probability"].to_numpy(float)
                                          >= threshold).astype(np.int64))
