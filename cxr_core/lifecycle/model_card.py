"""A model card (markdown) for every trained model: what it is for, what it saw, how it did,
and where it should not be trusted."""

from __future__ import annotations

from typing import Any

INTENDED_USE = (
    "Screening aid for pediatric (1-5 years) anterior-posterior chest X-rays: flags images "
    "likely to show pneumonia for prioritised review by a clinician. It is not a diagnosis, "
    "does not distinguish bacterial from viral pneumonia, and must not be used on adults, "
    "lateral views, or as the sole basis of a clinical decision."
)
LIMITATIONS = [
    "Validation and test images are carved from the same source as training (grouped by "
    "patient); numbers on data acquired elsewhere are usually lower. On the public Kermany "
    "data a CNN scoring 0.977 accuracy on a carved split scored 0.867 on the official test "
    "split, mostly by reading NORMAL images as pneumonia.",
    "Patient ids are inferred from file names; identical ids across folders may not be the "
    "same child, and different ids may be.",
    "The operating threshold was chosen on validation data for a recall target; prevalence "
    "different from the training data shifts precision and the meaning of the probability.",
    "Image-level labels only: the model cannot localise findings (Grad-CAM maps show where it "
    "looked, not where disease is).",
]


def metrics_table(evaluation: Any) -> str:
    """Markdown table of every metric with its 95% interval."""
    rows = "\n".join(f"| {k} | {iv.value:.3f} | {iv.low:.3f} - {iv.high:.3f} |"
                     for k, iv in evaluation.metrics.items())
    return f"| metric | value | 95% interval |\n| --- | --- | --- |\n{rows}"


def render_model_card(name: str, version: str | None, evaluation: Any, threshold: Any,
                      decision: Any, data_summary: dict[str, Any], hyperparameters: dict[str, Any],
                      profile: str) -> str:
    """Markdown model card. ``evaluation`` is a cxr_core.evaluation.metrics.Evaluation, ``threshold`` a
    ThresholdChoice, ``decision`` a GateDecision."""
    splits = "\n".join(f"| {split} | {counts.get('NORMAL', 0)} | {counts.get('PNEUMONIA', 0)} |"
                       for split, counts in data_summary.get("split_counts", {}).items())
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(hyperparameters.items()))
    lims = "\n".join(f"- {x}" for x in LIMITATIONS)
    cm = evaluation.confusion
    return f"""# Model card: {name}{f' version {version}' if version else ''}

## Intended use
{INTENDED_USE}

## Model
Convolutional network on one-channel (grayscale) images of {data_summary.get('image_size')} px,
taking raw 0-255 pixels (rescaling and training-time augmentation are inside the model).
Profile `{profile}`. Output: probability of PNEUMONIA.

| hyperparameter | value |
| --- | --- |
{hp}

## Operating threshold
{threshold.threshold:.4f}, the highest threshold whose recall on the validation split meets
{threshold.recall_target:.2f} (validation recall {threshold.recall:.3f}, specificity
{threshold.specificity:.3f}, on {threshold.n_positive} PNEUMONIA / {threshold.n_negative}
NORMAL images).

## Training data
Data set `{data_summary.get('data_root')}`, manifest hash `{data_summary.get('manifest_hash')}`.
Balancing: {data_summary.get('balancing')}.

| split | NORMAL | PNEUMONIA |
| --- | --- | --- |
{splits}

## Test metrics (at the threshold, 95% bootstrap intervals)
{evaluation.n} test images ({evaluation.n_positive} PNEUMONIA, {evaluation.n_negative} NORMAL).
Confusion matrix: TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}.

{metrics_table(evaluation)}

## Gates
```
{decision.summary()}
```

## Limitations
{lims}
"""
