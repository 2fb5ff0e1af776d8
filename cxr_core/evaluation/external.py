"""Scoring external validation sets, and choosing a site's own threshold.

Both happen only after the model and its threshold exist: an external set is scored at the
model's threshold (never used to fit, select trials, stop early or choose the threshold),
and a site-calibration sample re-chooses a threshold for its site with the same rule as the
main one (:func:`cxr_core.training.fit.choose_threshold`), stored beside it, never over it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.evaluation.metrics import Evaluation, evaluate_predictions
from cxr_core.evaluation.scoring import score_test_split

PREDICTIONS_FILE = "predictions.csv"  # read by cxr_core.lifecycle.comparison_report
GAP_METRICS = ("accuracy", "recall", "specificity", "roc_auc")
SITE_THRESHOLD_FILE = "site_threshold.json"  # beside threshold.json in the model folder
# Version tags: per set and metric cxr.external.<name>.<metric>; the site threshold's own.
EXTERNAL_TAG_PREFIX = "cxr.external."
SITE_THRESHOLD_TAG = "cxr.site_threshold"


@dataclass
class ExternalResult:
    """One external set scored: its metrics and where its files are."""

    name: str
    evaluation: Evaluation
    predictions_path: Path
    figures: dict[str, Path]


def score_external(model: Any, threshold: float, name: str, rows: pd.DataFrame, image_size: int,
                   out_dir: Path, seed: int) -> ExternalResult:
    """Score ``rows`` (scan rows of one set) at ``threshold``: per-image predictions in the test
    predictions' columns, metrics with patient-bootstrap intervals and the confusion-matrix,
    ROC, PR and calibration figures, all under ``out_dir``."""
    from cxr_core.evaluation.figures import write_figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = score_test_split(model, threshold, image_size, rows)
    predictions_path = out_dir / PREDICTIONS_FILE
    preds.to_csv(predictions_path, index=False)
    evaluation = evaluate_predictions(preds["label"].to_numpy(), preds["probability"].to_numpy(),
                                      threshold, seed=seed, groups=preds["patient_id"].to_numpy())
    (out_dir / "metrics.json").write_text(json.dumps(evaluation.to_dict(), indent=2))
    figures = write_figures(out_dir / "figures", preds["label"].to_numpy(),
                            preds["probability"].to_numpy(), threshold, preds["path"].tolist())
    return ExternalResult(name, evaluation, predictions_path, figures)


def gap_to_test(test: Evaluation, external: Evaluation,
                metrics: tuple[str, ...] = GAP_METRICS) -> dict[str, float]:
    """Metric -> external value minus test value (negative: worse on the external set)."""
    return {m: external.metrics[m].value - test.metrics[m].value for m in metrics
            if m in external.metrics and m in test.metrics}


def external_metrics(external: Mapping[str, Evaluation]) -> dict[str, float]:
    """MLflow metrics ``external_<name>_<metric>`` (with ``_ci_low``/``_ci_high`` bounds and
    the confusion counts) of every scored set."""
    return {f"external_{name}_{k}": v for name, ev in external.items() for k, v in ev.flat().items()}


def external_tags(external: Mapping[str, Evaluation]) -> dict[str, str]:
    """Short version tags ``cxr.external.<name>.<metric>`` (for ``cxr models list``)."""
    return {f"{EXTERNAL_TAG_PREFIX}{name}.{m}": f"{ev.metrics[m].value:.4f}"
            for name, ev in external.items() for m in GAP_METRICS if m in ev.metrics}


@dataclass(frozen=True)
class SiteThreshold:
    """A threshold chosen for one site on its labelled sample (the model's own stays)."""

    threshold: float
    recall: float
    specificity: float
    recall_target: float
    n_positive: int
    n_negative: int
    source: str

    @property
    def images(self) -> int:
        return self.n_positive + self.n_negative

    def tags(self) -> dict[str, str]:
        """Version tags beside ``cxr.threshold`` (which is left unchanged)."""
        return {SITE_THRESHOLD_TAG: f"{self.threshold:.6f}",
                "cxr.site_threshold_recall": f"{self.recall:.4f}",
                "cxr.site_threshold_specificity": f"{self.specificity:.4f}",
                "cxr.site_threshold_images": str(self.images),
                "cxr.site_calibration_source": self.source[:500]}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the site threshold and its figures on the sample."""
        return {"site_threshold": self.threshold, "site_recall_at_threshold": self.recall,
                "site_specificity_at_threshold": self.specificity,
                "site_calibration_images": float(self.images)}


def choose_site_threshold(model: Any, rows: pd.DataFrame, image_size: int, recall_target: float,
                          source: str, out_dir: Path) -> SiteThreshold:
    """Score the site's labelled sample and choose its threshold with the main rule (the
    highest threshold whose recall on the sample meets ``recall_target``); the sample's
    predictions go to ``out_dir``."""
    from cxr_core.training.fit import choose_threshold

    preds = score_test_split(model, 0.5, image_size, rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choice = choose_threshold(preds["label"].to_numpy(), preds["probability"].to_numpy(),
                              recall_target)
    preds.assign(prediction=(preds["probability"] >= choice.threshold).astype(int)).to_csv(
        out_dir / PREDICTIONS_FILE, index=False)
    return SiteThreshold(choice.threshold, choice.recall, choice.specificity, recall_target,
                         choice.n_positive, choice.n_negative, source)


def save_site_threshold(model_dir: Path, site: SiteThreshold) -> Path:
    """``site_threshold.json`` beside the model's ``threshold.json`` (it travels with the model)."""
    path = Path(model_dir) / SITE_THRESHOLD_FILE
    path.write_text(json.dumps(asdict(site), indent=2), encoding="utf-8")
    return path


def load_site_threshold(path: Path) -> SiteThreshold:
    """Read a ``site_threshold.json``."""
    return SiteThreshold(**json.loads(Path(path).read_text(encoding="utf-8")))
