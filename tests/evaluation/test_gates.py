"""Gate decisions: table-driven pass, each failure, and the no-champion case."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from cxr_core.evaluation.gates import (
    GateThresholds,
    PairedComparison,
    decide,
    mcnemar_clustered,
    mcnemar_exact,
    paired_comparison,
)


@dataclass(frozen=True)
class I:  # noqa: E742 - an interval stand-in
    value: float
    low: float
    high: float


def metrics(recall=(0.97, 0.95, 0.99), accuracy=(0.93, 0.91, 0.95)):
    return {"recall": I(*recall), "accuracy": I(*accuracy)}


NO_REGRESSION = [PairedComparison("all", 500, 10, 12, mcnemar_exact(10, 12)),
                 PairedComparison("positives", 300, 3, 4, mcnemar_exact(3, 4))]
REGRESSION = [PairedComparison("all", 500, 40, 10, mcnemar_exact(40, 10)),
              PairedComparison("positives", 300, 3, 4, mcnemar_exact(3, 4))]


@pytest.mark.parametrize(
    "name, cand, thr, comps, passed, failing",
    [
        ("pass, no champion", metrics(), GateThresholds(), None, True, []),
        ("recall too low", metrics(recall=(0.90, 0.85, 0.94)), GateThresholds(), None, False,
         ["min_recall"]),
        ("accuracy too low", metrics(accuracy=(0.80, 0.75, 0.85)), GateThresholds(), None, False,
         ["min_accuracy"]),
        ("both too low", metrics((0.5, 0.4, 0.6), (0.5, 0.4, 0.6)), GateThresholds(), None, False,
         ["min_recall", "min_accuracy"]),
        ("lower bound mode fails what the point passes", metrics(recall=(0.96, 0.93, 0.99)),
         GateThresholds(use_lower_ci_bound=True), None, False, ["min_recall"]),
        ("pass vs champion", metrics(), GateThresholds(), NO_REGRESSION, True, []),
        ("significant regression vs champion", metrics(), GateThresholds(), REGRESSION, False,
         ["no_accuracy_regression"]),
        ("nan recall fails", metrics(recall=(float("nan"),) * 3), GateThresholds(), None, False,
         ["min_recall"]),
    ],
)
def test_decide_table(name, cand, thr, comps, passed, failing) -> None:
    d = decide(cand, thr, comps, champion_version="3" if comps else None)
    assert d.passed is passed, name
    assert [c.name for c in d.failed] == failing, name
    names = [c.name for c in d.checks]
    assert names[:2] == ["min_recall", "min_accuracy"]
    if comps is None:
        assert "no champion" in d.notes[0] and len(d.checks) == 2
    else:
        assert {"no_accuracy_regression", "no_recall_regression"} <= set(names)
    assert ("PASSED" if passed else "REJECTED") in d.summary()
    assert d.to_dict()["passed"] is passed


def test_missing_metric_fails() -> None:
    d = decide({"recall": I(0.99, 0.98, 1.0)}, GateThresholds())
    assert not d.passed and d.failed[0].name == "min_accuracy"


def test_mcnemar_exact_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # b=0, c=6: two-sided exact p = 2 * 0.5**6
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5**6)
    assert mcnemar_exact(40, 10) < 0.001


def test_paired_comparison_counts() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    champ = np.array([1, 1, 1, 0, 0, 1])   # 5 right
    cand = np.array([1, 0, 1, 0, 1, 0])    # 4 right
    comp = paired_comparison(y, cand, champ)
    assert (comp.champion_only, comp.candidate_only, comp.n) == (2, 1, 6)
    pos = paired_comparison(y, cand, champ, subset="positives")
    assert (pos.champion_only, pos.candidate_only, pos.n) == (1, 0, 3)
    with pytest.raises(ValueError):
        paired_comparison(y, cand[:3], champ)


def _discordant(per_patient: list[tuple[int, int, int]]) -> tuple[np.ndarray, ...]:
    """y, candidate, champion and patient ids from (champion-only, candidate-only, both
    right) image counts per patient; every image is a PNEUMONIA one."""
    champ_ok, cand_ok, patient = [], [], []
    for k, (b, c, same) in enumerate(per_patient):
        champ_ok += [True] * b + [False] * c + [True] * same
        cand_ok += [False] * b + [True] * c + [True] * same
        patient += [f"p{k}"] * (b + c + same)
    y = np.ones(len(patient), int)
    return y, np.where(cand_ok, 1, 0), np.where(champ_ok, 1, 0), np.array(patient, object)


def test_one_image_per_patient_keeps_the_exact_test() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    champ = np.where(rng.random(200) < 0.9, y, 1 - y)
    cand = np.where(rng.random(200) < 0.8, y, 1 - y)
    ids = np.array([f"patient-{i}" for i in range(200)], object)
    for subset in ("all", "positives"):
        before = paired_comparison(y, cand, champ, subset)
        after = paired_comparison(y, cand, champ, subset, groups=ids)
        assert before.test == after.test == "exact" and before.n_patients is None
        assert after.n_patients == after.n == before.n
        assert (after.champion_only, after.candidate_only) == (before.champion_only,
                                                              before.candidate_only)
        assert after.p_value == before.p_value == mcnemar_exact(before.champion_only,
                                                                before.candidate_only)
    assert before.champion_only + before.candidate_only > 10  # a real test, not p = 1
    # Images without a patient id are patients of their own: still the exact test.
    unknown = paired_comparison(y, cand, champ, groups=[None] * 200)
    assert unknown.test == "exact" and unknown.p_value == paired_comparison(y, cand, champ).p_value


def test_clustered_statistic_by_hand() -> None:
    # Per patient (b_k, c_k): (2, 0), (1, 1), (0, 1), (3, 0), plus a concordant patient.
    # d_k = b_k - c_k = 2, 0, -1, 3, 0: sum 4, sum of squares 4 + 0 + 1 + 9 = 14,
    # X^2 = 4^2 / 14 = 8/7 = 1.142857. Chi-square(1): p = erfc(sqrt(X^2 / 2)) = 0.28505.
    expected = math.erfc(math.sqrt(8 / 7 / 2))
    assert expected == pytest.approx(0.28505, abs=1e-5)
    assert mcnemar_clustered([2, 1, 0, 3, 0], [0, 1, 1, 0, 0]) == pytest.approx(expected)
    y, cand, champ, ids = _discordant([(2, 0, 1), (1, 1, 0), (0, 1, 2), (3, 0, 0), (0, 0, 4)])
    comp = paired_comparison(y, cand, champ, groups=ids)
    assert (comp.test, comp.n, comp.n_patients) == ("clustered", 15, 5)
    assert (comp.champion_only, comp.candidate_only) == (6, 2)  # image counts, as before
    assert comp.p_value == pytest.approx(expected)
    # One image per patient: (b - c)^2 / (b + c), the uncorrected McNemar statistic.
    assert mcnemar_clustered([1] * 6 + [0] * 2, [0] * 6 + [1] * 2) == pytest.approx(
        math.erfc(math.sqrt((6 - 2) ** 2 / 8 / 2)))
    # No discordant pairs, or none unbalanced within a patient: p = 1.
    assert mcnemar_clustered([0, 0], [0, 0]) == 1.0 and mcnemar_clustered([2, 1], [2, 1]) == 1.0
    with pytest.raises(ValueError):
        mcnemar_clustered([1, 2], [1])
    with pytest.raises(ValueError):
        paired_comparison(y, cand, champ, groups=ids[:3])


def test_many_images_of_few_patients_do_not_inflate_the_evidence() -> None:
    # Three patients with ten images each that only the champion gets right (b = 30); five
    # patients with three images each that only the candidate gets right (c = 15); 40
    # patients with two images both get right. Image-level: exact p = 0.036, a "regression";
    # by patient: d = 10, 10, 10, -3 x 5, X^2 = 15^2 / 345 = 0.652, p = 0.42.
    y, cand, champ, ids = _discordant([(10, 0, 0)] * 3 + [(0, 3, 0)] * 5 + [(0, 0, 2)] * 40)
    by_image = paired_comparison(y, cand, champ)
    by_patient = paired_comparison(y, cand, champ, groups=ids)
    assert (by_image.champion_only, by_image.candidate_only) == (30, 15)
    assert by_image.test == "exact" and by_image.p_value == pytest.approx(0.0357, abs=1e-4)
    assert by_image.p_value < 0.05
    assert by_patient.test == "clustered" and by_patient.n_patients == 48
    assert by_patient.p_value == pytest.approx(math.erfc(math.sqrt(225 / 345 / 2)))
    assert by_patient.p_value > 0.4 > 10 * by_image.p_value
    # The gate: a regression by images, none by patients; the detail says which test.
    reg = GateThresholds(min_recall=0.0, min_accuracy=0.0)
    assert [c.name for c in decide({}, reg, [by_image]).failed if c.name.startswith("no_")] == \
        ["no_accuracy_regression"]
    clustered = decide({}, reg, [by_patient])
    check = next(c for c in clustered.checks if c.name == "no_accuracy_regression")
    assert check.passed and check.value == by_patient.p_value
    assert ("patient-clustered McNemar (Durkalski) on 125 all images of 48 patients: "
            "champion-only correct 30, candidate-only correct 15") in clustered.summary()
    assert "exact McNemar on 125 all images:" in decide({}, reg, [by_image]).summary()
    # The same patients each on one image: the exact test, and a regression again.
    y, cand, champ, ids = _discordant([(1, 0, 0)] * 30 + [(0, 1, 0)] * 15)
    one_each = paired_comparison(y, cand, champ, groups=ids)
    assert one_each.test == "exact" and one_each.p_value == by_image.p_value
    assert "(45 patients, one image each)" in decide({}, reg, [one_each]).summary()


def test_optional_robustness_gate() -> None:
    thr = GateThresholds(min_robust_accuracy=0.85)
    assert decide(metrics(), thr, robust_worst_accuracy=0.9).passed
    d = decide(metrics(), thr, robust_worst_accuracy=0.6)
    assert not d.passed and [c.name for c in d.failed] == ["min_robust_accuracy"]
    assert not decide(metrics(), thr, robust_worst_accuracy=None).passed  # not measured
    assert decide(metrics(), GateThresholds(), robust_worst_accuracy=0.1).passed  # off


def test_lower_bound_gate_counts_patients_not_images() -> None:
    from cxr_core.evaluation.metrics import evaluate_predictions

    # 30 patients of 20 images each; the model misses every image of 3 positive patients
    # (recall 0.8 on 15 positive patients). 300 positive images make the image bootstrap
    # confident; 15 positive patients do not.
    patient = np.repeat(np.arange(30), 20)
    y = (patient < 15).astype(int)
    p = np.where((y == 1) & (patient >= 3), 0.9, 0.1)
    thr = GateThresholds(min_recall=0.7, min_accuracy=0.5, use_lower_ci_bound=True)
    by_image = evaluate_predictions(y, p, 0.5, n_bootstrap=500, seed=0)
    by_patient = evaluate_predictions(y, p, 0.5, n_bootstrap=500, seed=0, groups=patient)
    assert by_image.metrics["recall"].value == by_patient.metrics["recall"].value == 0.8
    assert decide(by_image.metrics, thr).passed           # over-confident
    failed = decide(by_patient.metrics, thr).failed
    assert [c.name for c in failed] == ["min_recall"]
    assert failed[0].value == by_patient.metrics["recall"].low < 0.7


def test_external_gates_judge_each_configured_set() -> None:
    from cxr_core.config import ExternalGateConfig, load_config
    from cxr_core.evaluation.gates import thresholds_from_config

    site_b = {"accuracy": I(0.84, 0.80, 0.88), "recall": I(0.99, 0.97, 1.0),
              "roc_auc": I(0.96, 0.94, 0.98)}
    thr = GateThresholds(external={"site-b": {"accuracy": 0.82, "roc_auc": 0.95}})
    ok = decide(metrics(), thr, external={"site-b": site_b})
    assert ok.passed
    assert [c.name for c in ok.checks[2:]] == ["external_site-b_min_accuracy",
                                                "external_site-b_min_roc_auc"]
    # The lower interval bound when the config says so: 0.80 < 0.82 fails what 0.84 passed.
    strict = GateThresholds(use_lower_ci_bound=True,
                            external={"site-b": {"accuracy": 0.82, "roc_auc": 0.9}})
    d = decide(metrics(), strict, external={"site-b": site_b})
    assert not d.passed and [c.name for c in d.failed] == ["external_site-b_min_accuracy"]
    assert d.failed[0].value == 0.80 and "'site-b'" in d.failed[0].detail
    assert "external_site-b_min_accuracy: 0.8000 >= 0.8200" in d.summary()
    # A gated set that was not scored fails its checks; sets without gates are not judged.
    missing = decide(metrics(), thr, external={"other": site_b})
    assert [c.name for c in missing.failed] == ["external_site-b_min_accuracy",
                                                "external_site-b_min_roc_auc"]
    assert "not measured" in missing.failed[0].detail
    assert decide(metrics(), GateThresholds(), external={"site-b": site_b}).checks == ok.checks[:2]
    # From the config: only the minimums that are set become checks.
    gates = load_config().gates.model_copy(
        update={"external": {"site-b": ExternalGateConfig(min_recall=0.9)}})
    assert thresholds_from_config(gates).external == {"site-b": {"recall": 0.9}}
