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
    """McNemar's test of candidate vs champion on the same images.

    ``champion_only``: images the champion got right and the candidate wrong (b);
    ``candidate_only``: the reverse (c). A regression is b > c with p < alpha.
    ``test``: "exact" (binomial test on b and c: images, or patients of one image each) or
    "clustered" (:func:`mcnemar_clustered`: some patient has several images, so patients,
    not images, are the unit). ``n_patients``: patients among the ``n`` images (None when
    no patient ids were given).
    """

    subset: str              # "all" (accuracy) or "positives" (recall)
    n: int
    champion_only: int
    candidate_only: int
    p_value: float
    test: str = "exact"
    n_patients: int | None = None


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


def mcnemar_clustered(champion_only: Sequence[int] | np.ndarray,
                      candidate_only: Sequence[int] | np.ndarray) -> float:
    """Two-sided p-value of McNemar's test for clustered matched pairs (Durkalski et al.
    2003, Stat Med 22:2417), from the discordant counts within each patient k:
    X^2 = (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2 against chi-square with 1 degree of
    freedom. A patient's images move together, so many images of one patient count as one
    patient's evidence, not as many independent pairs. With one image per patient it is
    the uncorrected McNemar statistic (b - c)^2 / (b + c). No imbalance within any patient
    (e.g. no discordant pairs): p = 1."""
    from scipy.stats import chi2

    b, c = np.asarray(champion_only, np.float64), np.asarray(candidate_only, np.float64)
    if b.ndim != 1 or b.shape != c.shape:
        raise ValueError("per-patient discordant counts must be two vectors of one length")
    d = b - c
    denominator = float((d**2).sum())
    if denominator == 0.0:
        return 1.0
    return float(chi2.sf(float(d.sum()) ** 2 / denominator, 1))


def paired_comparison(y_true: np.ndarray, candidate_pred: np.ndarray, champion_pred: np.ndarray,
                      subset: str = "all", groups: Any = None) -> PairedComparison:
    """Compare two models' 0/1 predictions on the same images (``subset`` all or positives).

    ``groups``: the patient id of each image (None: images are the unit). When a patient
    has more than one image in the subset the patient-clustered test decides
    (:func:`mcnemar_clustered`); otherwise McNemar's exact test on the image counts. An
    image without a patient id counts as a patient of its own."""
    y_true = np.asarray(y_true).astype(int)
    cand_ok = np.asarray(candidate_pred).astype(int) == y_true
    champ_ok = np.asarray(champion_pred).astype(int) == y_true
    if not (len(y_true) == len(cand_ok) == len(champ_ok)):
        raise ValueError("predictions must cover the same images")
    mask = y_true == 1 if subset == "positives" else np.ones(len(y_true), bool)
    champ_only, cand_only = champ_ok & ~cand_ok & mask, cand_ok & ~champ_ok & mask
    b, c = int(champ_only.sum()), int(cand_only.sum())
    if groups is None:
        return PairedComparison(subset, int(mask.sum()), b, c, mcnemar_exact(b, c))
    from cxr_core.evaluation.metrics import cluster_codes

    codes = cluster_codes(groups, len(y_true))[mask]
    _, codes = np.unique(codes, return_inverse=True)
    n_patients = int(codes.max()) + 1 if codes.size else 0
    if n_patients == codes.size:  # one image per patient: no clustering
        return PairedComparison(subset, int(mask.sum()), b, c, mcnemar_exact(b, c), "exact",
                                n_patients)
    per_b = np.bincount(codes, weights=champ_only[mask], minlength=n_patients)
    per_c = np.bincount(codes, weights=cand_only[mask], minlength=n_patients)
    return PairedComparison(subset, int(mask.sum()), b, c, mcnemar_clustered(per_b, per_c),
                            "clustered", n_patients)


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
            f"{_test_words(comp)}: champion-only correct {comp.champion_only}, "
            f"candidate-only correct {comp.candidate_only}"))
    return checks


def _test_words(comp: PairedComparison) -> str:
    """Which McNemar test judged ``comp`` and on how many images and patients."""
    if comp.test == "clustered":
        return (f"patient-clustered McNemar (Durkalski) on {comp.n} {comp.subset} images of "
                f"{comp.n_patients} patients")
    patients = "" if comp.n_patients is None else f" ({comp.n_patients} patients, one image each)"
    return f"exact McNemar on {comp.n} {comp.subset} images{patients}"


def thresholds_from_config(cfg: Any) -> GateThresholds:
    """GateThresholds from the experiment config's ``gates`` section."""
    external = {name: {metric.removeprefix("min_"): value
                       for metric, value in gate.model_dump().items() if value is not None}
                for name, gate in (getattr(cfg, "external", None) or {}).items()}
    return GateThresholds(cfg.min_recall, cfg.min_accuracy, cfg.use_lower_ci_bound,
                          cfg.regression_alpha, cfg.min_robust_accuracy, external)
