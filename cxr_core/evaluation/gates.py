"""Evaluation gates: value thresholds plus a no-regression check against the champion.

A pure function turns (candidate metrics, champion comparison or None, thresholds) into a
GateDecision listing every check with its value, threshold and verdict. Only a model whose
decision passed is ever registered (the TFX Evaluator's "blessing").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from math import comb
from typing import Any, Protocol

import numpy as np


class _IntervalLike(Protocol):
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class GateThresholds:
    """What a candidate must reach. ``use_lower_ci_bound`` judges the lower end of the
    bootstrap interval instead of the point value (stricter on small test sets). The
    evaluation resamples patients, so that bound reflects how many patients, not images,
    the test set holds (:func:`cxr_core.evaluation.metrics.evaluate_predictions`)."""

    min_recall: float = 0.95
    min_accuracy: float = 0.90
    use_lower_ci_bound: bool = False
    regression_alpha: float = 0.05
    min_robust_accuracy: float | None = None  # worst accuracy over acquisition shifts
    # External set name -> metric (accuracy, recall, roc_auc) -> minimum on that set.
    external: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PairedComparison:
    """McNemar's exact test of candidate vs champion on the same images.

    ``champion_only``: images the champion got right and the candidate wrong (b);
    ``candidate_only``: the reverse (c). A regression is b > c with p < alpha.
    """

    subset: str              # "all" (accuracy) or "positives" (recall)
    n: int
    champion_only: int
    candidate_only: int
    p_value: float


@dataclass(frozen=True)
class ChampionComparison:
    """Candidate vs champion on the test images both were tested on (matched by sha256).

    ``skipped`` says why no test was run (e.g. too few shared images); ``comparisons`` is
    then empty and only the value gates decide.
    """

    champion_version: str
    shared_images: int
    comparisons: tuple[PairedComparison, ...] = ()
    skipped: str | None = None


@dataclass(frozen=True)
class GateCheck:
    name: str
    value: float | None
    threshold: float | None
    comparison: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: tuple[GateCheck, ...]
    champion_version: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    shared_test_images: int | None = None  # images the champion comparison was made on

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = [asdict(c) for c in self.checks]
        return d

    def summary(self) -> str:
        lines = [f"Gate decision: {'PASSED' if self.passed else 'REJECTED'}"
                 + (f" (champion: version {self.champion_version})" if self.champion_version
                    else " (no champion)")]
        for c in self.checks:
            value = "n/a" if c.value is None else f"{c.value:.4f}"
            limit = "" if c.threshold is None else f" {c.comparison} {c.threshold:.4f}"
            lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {value}{limit}"
                         + (f" ({c.detail})" if c.detail else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def mcnemar_exact(champion_only: int, candidate_only: int) -> float:
    """Two-sided exact McNemar p-value (binomial test on the discordant pairs)."""
    n = champion_only + candidate_only
    if n == 0:
        return 1.0
    k = min(champion_only, candidate_only)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def paired_comparison(y_true: np.ndarray, candidate_pred: np.ndarray, champion_pred: np.ndarray,
                      subset: str = "all") -> PairedComparison:
    """Compare two models' 0/1 predictions on the same images (``subset`` all or positives)."""
    y_true = np.asarray(y_true).astype(int)
    cand_ok = np.asarray(candidate_pred).astype(int) == y_true
    champ_ok = np.asarray(champion_pred).astype(int) == y_true
    if not (len(y_true) == len(cand_ok) == len(champ_ok)):
        raise ValueError("predictions must cover the same images")
    mask = y_true == 1 if subset == "positives" else np.ones(len(y_true), bool)
    b = int((champ_ok & ~cand_ok & mask).sum())
    c = int((cand_ok & ~champ_ok & mask).sum())
    return PairedComparison(subset, int(mask.sum()), b, c, mcnemar_exact(b, c))


def decide(
    candidate: Mapping[str, _IntervalLike],
    thresholds: GateThresholds,
    comparisons: Sequence[PairedComparison] | ChampionComparison | None = None,
    champion_version: str | None = None,
    robust_worst_accuracy: float | None = None,
    external: Mapping[str, Mapping[str, _IntervalLike]] | None = None,
) -> GateDecision:
    """Judge a candidate. ``comparisons`` (against the champion on the same test images) are
    None when there is no champion: the value checks alone decide then; a
    :class:`ChampionComparison` also carries the shared-image count and, when it was skipped,
    why (a note). With ``thresholds.min_robust_accuracy`` set, the worst accuracy over the
    robustness report's acquisition shifts must reach it too. ``external``: set name ->
    its metrics, judged against ``thresholds.external`` (a set with a gate but no metrics
    fails its checks)."""
    checks = _value_checks(candidate, thresholds, robust_worst_accuracy)
    checks += _external_checks(external or {}, thresholds)
    notes: list[str] = []
    shared = None
    if isinstance(comparisons, ChampionComparison):
        champion_version = champion_version or comparisons.champion_version
        shared = comparisons.shared_images
        notes.append(comparisons.skipped or f"compared with champion version "
                     f"{comparisons.champion_version} on {shared} shared test images")
        comparisons = None if comparisons.skipped else comparisons.comparisons
    elif comparisons is None:
        notes.append("no champion: regression checks skipped")
    checks += _regression_checks(comparisons or (), thresholds.regression_alpha)
    return GateDecision(all(c.passed for c in checks), tuple(checks), champion_version,
                        tuple(notes), shared)


def _value_checks(candidate: Mapping[str, _IntervalLike], thresholds: GateThresholds,
                  robust_worst_accuracy: float | None) -> list[GateCheck]:
    checks: list[GateCheck] = []
    bound = "lower 95% bound" if thresholds.use_lower_ci_bound else "point value"
    for metric, minimum in (("recall", thresholds.min_recall),
                            ("accuracy", thresholds.min_accuracy)):
        interval = candidate.get(metric)
        if interval is None:
            checks.append(GateCheck(f"min_{metric}", None, minimum, ">=", False,
                                    f"{metric} was not measured"))
            continue
        value = interval.low if thresholds.use_lower_ci_bound else interval.value
        ok = value is not None and np.isfinite(value) and value >= minimum
        checks.append(GateCheck(f"min_{metric}", float(value), minimum, ">=", bool(ok), bound))
    if thresholds.min_robust_accuracy is not None:
        value = robust_worst_accuracy
        ok = value is not None and np.isfinite(value) and value >= thresholds.min_robust_accuracy
        checks.append(GateCheck("min_robust_accuracy", None if value is None else float(value),
                                thresholds.min_robust_accuracy, ">=", bool(ok),
                                "worst accuracy over acquisition shifts"))
    return checks


def _external_checks(external: Mapping[str, Mapping[str, _IntervalLike]],
                     thresholds: GateThresholds) -> list[GateCheck]:
    """One check per configured minimum of each external set, named
    ``external_<set>_min_<metric>``; the lower interval bound when the thresholds say so."""
    checks = []
    bound = "lower 95% bound" if thresholds.use_lower_ci_bound else "point value"
    for name, minimums in sorted(thresholds.external.items()):
        for metric, minimum in sorted(minimums.items()):
            check = f"external_{name}_min_{metric}"
            interval = (external.get(name) or {}).get(metric)
            if interval is None:
                checks.append(GateCheck(check, None, minimum, ">=", False,
                                        f"external set {name!r}: {metric} was not measured"))
                continue
            value = interval.low if thresholds.use_lower_ci_bound else interval.value
            ok = value is not None and np.isfinite(value) and value >= minimum
            checks.append(GateCheck(check, float(value), minimum, ">=", bool(ok),
                                    f"external set {name!r}, {bound}"))
    return checks


def _regression_checks(comparisons: Sequence[PairedComparison], alpha: float) -> list[GateCheck]:
    checks = []
    for comp in comparisons:
        name = "no_accuracy_regression" if comp.subset == "all" else "no_recall_regression"
        regressed = comp.champion_only > comp.candidate_only and comp.p_value < alpha
        checks.append(GateCheck(
            name, comp.p_value, alpha, "not (worse and p <)", not regressed,
            f"McNemar on {comp.n} {comp.subset} images: champion-only correct "
            f"{comp.champion_only}, candidate-only correct {comp.candidate_only}"))
    return checks


def thresholds_from_config(cfg: Any) -> GateThresholds:
    """GateThresholds from the experiment config's ``gates`` section."""
    external = {name: {metric.removeprefix("min_"): value
                       for metric, value in gate.model_dump().items() if value is not None}
                for name, gate in (getattr(cfg, "external", None) or {}).items()}
    return GateThresholds(cfg.min_recall, cfg.min_accuracy, cfg.use_lower_ci_bound,
                          cfg.regression_alpha, cfg.min_robust_accuracy, external)
