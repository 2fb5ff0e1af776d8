"""A model card (markdown) for every trained model: what it is for, what it saw, how it did,
and where it should not be trusted.

Every figure in a card comes from the model's own evaluation and data; the card names the
registry version and aliases once the model is registered (:func:`with_registration`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from cxr_core.data.labels import LABELS

MODEL_CARD_ARTIFACT = "model_card.md"
REGISTRY_HEADING = "## Registry"

INTENDED_USE = (
    "Screening aid for pediatric (1-5 years) anterior-posterior chest X-rays: flags images "
    "likely to show pneumonia for prioritised review by a clinician. It is not a diagnosis, "
    "does not distinguish bacterial from viral pneumonia, and must not be used on adults, "
    "lateral views, or as the sole basis of a clinical decision."
)
LIMITATIONS = [
    "Patient ids are inferred from file names; identical ids across folders may not be the "
    "same child, and different ids may be.",
    "The operating threshold was chosen on validation data for a recall target; prevalence "
    "different from the training data shifts precision and the meaning of the probability.",
    "Image-level labels only: the model cannot localise findings (Grad-CAM maps show where it "
    "looked, not where disease is).",
]
# How each manifest split_origin (cxr_core.data.splits / data.balance) reads in a card.
ORIGIN_WORDS = {
    "folder": "given (the data set's own folder)",
    "carved": "carved by cxr from the train folder, grouped by patient",
    "folded": "given val images folded into train (too few to validate on)",
    "augmented": "augmented copies written by balancing",
}
CARVED_TEST_LIMITATION = (
    "The test images were carved from the same source as the training images (grouped by "
    "patient, so no child is in both); figures on data acquired elsewhere are usually lower "
    "than the figures in this card.")
GIVEN_TEST_LIMITATION = (
    "The test images are the data set's own test folder, as given; the figures in this card "
    "hold for data like it, not necessarily for other hospitals, scanners or populations.")


def split_provenance(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """split -> split_origin -> number of readable, labelled images, from a manifest."""
    usable = manifest[manifest["readable"].astype(bool) & manifest["label"].isin(LABELS)]
    counts = usable.groupby(["split", "split_origin"]).size()
    out: dict[str, dict[str, int]] = {}
    for (split, origin), n in counts.items():
        out.setdefault(str(split), {})[str(origin)] = int(n)
    return out


def metrics_table(evaluation: Any) -> str:
    """Markdown table of every metric with its 95% interval."""
    rows = "\n".join(f"| {k} | {iv.value:.3f} | {iv.low:.3f} - {iv.high:.3f} |"
                     for k, iv in evaluation.metrics.items())
    return f"| metric | value | 95% interval |\n| --- | --- | --- |\n{rows}"


def _provenance_section(origins: Mapping[str, Mapping[str, int]]) -> str:
    if not origins:
        return "Split provenance was not recorded."
    rows = "\n".join(f"| {split} | {origin} | {n} | {ORIGIN_WORDS.get(origin, origin)} |"
                     for split, by_origin in sorted(origins.items())
                     for origin, n in sorted(by_origin.items()))
    return f"| split | origin | images | meaning |\n| --- | --- | --- | --- |\n{rows}"


def _limitations(origins: Mapping[str, Mapping[str, int]]) -> list[str]:
    test = origins.get("test", {})
    if not test:
        return LIMITATIONS
    return [CARVED_TEST_LIMITATION if "carved" in test else GIVEN_TEST_LIMITATION, *LIMITATIONS]


def _robustness_section(robustness: Mapping[str, float] | None) -> str:
    worst = {k.removeprefix("robust_worst_"): v for k, v in (robustness or {}).items()
             if k.startswith("robust_worst_")}
    if not worst:
        return "No robustness report was made for this model."
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(worst.items()))
    return ("The test split scored again under simulated acquisition changes (exposure, "
            "contrast, blur, noise, JPEG quality, resolution, rotation, crops); the worst value "
            f"of each metric over those shifts:\n\n| metric | worst |\n| --- | --- |\n{rows}")


def shortcut_section(data_summary: Mapping[str, Any]) -> str:
    """How well each shortcut score (burned-in annotations, field of view) alone separates
    the classes per split, flagged above the warning level, and the mitigations in use."""
    rows = [r for r in data_summary.get("shortcut_scores") or [] if r.get("auc") is not None]
    warn = data_summary.get("shortcut_auc_warn")
    mitigations = data_summary.get("shortcut_mitigations") or "none"
    if not rows:
        return f"No shortcut scores were audited for this data. Mitigations: {mitigations}."
    table = "\n".join(
        f"| {r['score']} | {r['split']} | {r['auc']:.3f} | {r['higher_in']} |"
        f"{' **above ' + format(warn, '.2f') + '**' if warn is not None and r['auc'] > warn else ''} |"
        for r in rows)
    return ("How well each score alone separates NORMAL from PNEUMONIA (ROC-AUC, 0.5 = no "
            "information): a high value is a cue a model can learn instead of the lungs "
            "(README, \"Shortcut audit\").\n\n| score | split | ROC-AUC | higher in | flag |\n"
            f"| --- | --- | --- | --- | --- |\n{table}\n\nMitigations in this model: {mitigations}.")


EXTERNAL_INTRO = ("Image sets from other sites or devices, scored at the model's threshold "
                  "after training (never used to fit it, select trials, stop early or choose "
                  "the threshold). Gap: external minus test (negative: worse than the test "
                  "split suggests).")


def gap_table(test: Any, external: Mapping[str, Any]) -> str:
    """Markdown table: per external set, the gap to the test split of each key metric."""
    from cxr_core.evaluation.external import GAP_METRICS, gap_to_test

    head = "| external set | n | " + " | ".join(f"{m} gap" for m in GAP_METRICS) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in GAP_METRICS) + " |"
    rows = []
    for name, ev in external.items():
        gap = gap_to_test(test, ev)
        rows.append(f"| {name} | {ev.n} | " + " | ".join(
            f"{gap[m]:+.3f}" if m in gap else "n/a" for m in GAP_METRICS) + " |")
    return "\n".join([head, rule, *rows])


def external_section(test: Any, external: Mapping[str, Any] | None) -> str:
    """The external sets' metrics beside the test split's, and the gaps between them."""
    if not external:
        return ("No external set was scored (give one with `cxr run --external NAME=DIR` or "
                "the config's `data.external`).")
    rows = metrics_rows({"test split": test, **{f"external: {k}": v for k, v in external.items()}})
    return f"{EXTERNAL_INTRO}\n\n{rows}\n\n{gap_table(test, external)}"


def site_threshold_text(site: Any | None) -> str:
    """A paragraph on the site threshold, when a calibration sample chose one."""
    if site is None:
        return ""
    return (f"\n\nSite threshold {site.threshold:.4f} for `{site.source}`, chosen by the same rule "
            f"on {site.images} labelled images of that site ({site.n_positive} PNEUMONIA / "
            f"{site.n_negative} NORMAL: recall {site.recall:.3f}, specificity "
            f"{site.specificity:.3f}); the version tag `cxr.site_threshold`, used by "
            "`cxr predict --threshold site`. The threshold above is unchanged.")


def title(name: str, version: str | None) -> str:
    """The card's first line."""
    return f"# Model card: {name}{f' version {version}' if version else ''}"


def registry_section(name: str, version: str | None, aliases: Sequence[str] = (),
                     passed: bool | None = None) -> str:
    """The card's last section: the registered version and its aliases, or why there is none."""
    if version is None:
        why = ("not registered: the gates rejected it" if passed is False else
               "not registered yet (registration follows a passing gate decision)")
        return f"{REGISTRY_HEADING}\nThis model is {why}.\n"
    alias_text = ", ".join(f"`{a}`" for a in sorted(aliases)) or "none"
    return (f"{REGISTRY_HEADING}\nRegistered model `{name}`, version {version}. "
            f"Aliases: {alias_text}.\n")


def with_registration(card: str, name: str, version: str, aliases: Sequence[str]) -> str:
    """``card`` with its title and registry section naming ``version`` and ``aliases``."""
    body = card.split(f"\n{REGISTRY_HEADING}\n", 1)[0]
    lines = body.split("\n", 1)
    rest = lines[1] if len(lines) > 1 else ""
    return f"{title(name, version)}\n{rest}\n{registry_section(name, version, aliases)}"


def render_model_card(name: str, version: str | None, evaluation: Any, threshold: Any,
                      decision: Any, data_summary: dict[str, Any], hyperparameters: dict[str, Any],
                      profile: str, aliases: Sequence[str] = (),
                      robustness: Mapping[str, float] | None = None,
                      external: Mapping[str, Any] | None = None,
                      site_threshold: Any | None = None) -> str:
    """Markdown model card. ``evaluation`` is a cxr_core.evaluation.metrics.Evaluation,
    ``threshold`` a ThresholdChoice, ``decision`` a GateDecision; ``data_summary`` may carry
    ``split_origins`` (:func:`split_provenance`); ``robustness`` the robust_* metrics;
    ``external`` set name -> Evaluation; ``site_threshold`` a SiteThreshold."""
    splits = "\n".join(f"| {split} | {counts.get('NORMAL', 0)} | {counts.get('PNEUMONIA', 0)} |"
                       for split, counts in data_summary.get("split_counts", {}).items())
    origins = data_summary.get("split_origins") or {}
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(hyperparameters.items()))
    lims = "\n".join(f"- {x}" for x in _limitations(origins))
    cm = evaluation.confusion
    return f"""{title(name, version)}

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
NORMAL images).{site_threshold_text(site_threshold)}

## Training data
Data set `{data_summary.get('data_root')}`, manifest hash `{data_summary.get('manifest_hash')}`.
Balancing: {data_summary.get('balancing')}.

| split | NORMAL | PNEUMONIA |
| --- | --- | --- |
{splits}

### Split provenance
{_provenance_section(origins)}

## Shortcut audit
{shortcut_section(data_summary)}

## Test metrics (at the threshold, 95% bootstrap intervals)
{evaluation.n} test images ({evaluation.n_positive} PNEUMONIA, {evaluation.n_negative} NORMAL).
Confusion matrix: TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}.

{metrics_table(evaluation)}

## Robustness
{_robustness_section(robustness)}

## External validation
{external_section(evaluation, external)}

## Gates
```
{decision.summary()}
```

## Limitations
{lims}

{registry_section(name, version, aliases, getattr(decision, 'passed', None))}"""


SUMMARY_METRICS = ("accuracy", "recall", "specificity", "precision", "roc_auc")
MAX_DESCRIPTION = 4000  # well under MLflow's limit on a description


def _interval_cell(evaluation: Any, metric: str) -> str:
    iv = evaluation.metrics.get(metric)
    return "n/a" if iv is None else f"{iv.value:.3f} ({iv.low:.3f}-{iv.high:.3f})"


def metrics_rows(evaluations: Mapping[str, Any], metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """A markdown table, one row per named evaluation (test split, each external set), each
    key metric with its 95% interval."""
    head = "| images | n | " + " | ".join(metrics) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"
    rows = [f"| {name} | {ev.n} | " + " | ".join(_interval_cell(ev, m) for m in metrics) + " |"
            for name, ev in evaluations.items()]
    return "\n".join([head, rule, *rows])


def card_summary(evaluation: Any, decision: Any, data_summary: Mapping[str, Any],
                 external: Mapping[str, Any] | None = None) -> str:
    """The short form of the card, for the registry's version description and the run's
    description: intended use, data, test (and external) metrics with intervals, the gate
    verdict. ``external``: external set name -> its Evaluation (none yet: an empty mapping)."""
    counts = data_summary.get("split_counts") or {}
    split_text = ", ".join(f"{split} {sum(c.values())}" for split, c in counts.items()) or "n/a"
    verdict = "PASSED" if decision.passed else "REJECTED"
    failed = ", ".join(c.name for c in decision.failed) or "none"
    gaps = f"\nGap to the test split (external minus test):\n\n{gap_table(evaluation, external)}\n" \
        if external else ""
    text = f"""**Intended use.** {INTENDED_USE}

**Data.** `{data_summary.get('data_root')}` (manifest `{str(data_summary.get('manifest_hash'))[:16]}`;
images per split: {split_text}).

**Metrics** at the model's threshold, 95% bootstrap intervals:

{metrics_rows({'test split': evaluation, **{f'external: {k}': v for k, v in (external or {}).items()}})}
{gaps}
**Gates: {verdict}** (failed checks: {failed}{
    f'; compared with champion version {decision.champion_version}' if decision.champion_version else ''}).

Full model card: `{MODEL_CARD_ARTIFACT}` in the run's artifacts; gate detail in `gate_decision.md`."""
    return text[:MAX_DESCRIPTION]


def gate_markdown(decision: Any) -> str:
    """The gate decision as a readable artifact (the JSON twin stays for programs)."""
    rows = "\n".join(
        f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | "
        f"{'n/a' if c.value is None else f'{c.value:.4f}'} | "
        f"{'' if c.threshold is None else f'{c.comparison} {c.threshold:.4f}'} | {c.detail} |"
        for c in decision.checks)
    notes = "".join(f"\n- {n}" for n in decision.notes)
    return (f"# Gate decision: {'PASSED' if decision.passed else 'REJECTED'}\n\n"
            f"| check | result | value | limit | detail |\n| --- | --- | --- | --- | --- |\n{rows}\n"
            + (f"\nNotes:{notes}\n" if notes else ""))
