"""Evaluation: metrics, bootstrap intervals and calibration (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxr_core.evaluation.metrics import (
    METRICS,
    Evaluation,
    _draw_counts,
    _Prepared,
    evaluate_predictions,
    expected_calibration_error,
    point_metrics,
)

NAN = float("nan")


def _scores(n: int, seed: int, separation: float = 0.25, decimals: int | None = 2):
    """Labels and overlapping scores (rounded, so there are ties)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.4 + separation * y, 0.2), 0, 1)
    return y, (p.round(decimals) if decimals is not None else p)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


# ------------------------------------------------------------------ point metrics

CASES = [
    # y, p, threshold, expected (a subset of metrics, hand computed)
    pytest.param([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], 0.5,
                 dict(accuracy=0.5, recall=0.5, specificity=0.5, precision=0.5, f1=0.5,
                      balanced_accuracy=0.5, roc_auc=0.75, tn=1, fp=1, fn=1, tp=1), id="mixed"),
    pytest.param([1, 0], [0.5, 0.2], 0.5,  # p == threshold is positive
                 dict(accuracy=1.0, recall=1.0, specificity=1.0, precision=1.0, f1=1.0,
                      roc_auc=1.0, pr_auc=1.0, tn=1, fp=0, fn=0, tp=1), id="at-threshold"),
    pytest.param([1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.6], 0.65,
                 dict(accuracy=5 / 7, recall=2 / 3, specificity=3 / 4, precision=2 / 3, f1=2 / 3,
                      balanced_accuracy=(2 / 3 + 3 / 4) / 2, tn=3, fp=1, fn=1, tp=2),
                 id="3x4"),
    pytest.param([1, 0, 0], [0.1, 0.2, 0.3], 0.9,  # no positive predictions
                 dict(accuracy=2 / 3, recall=0.0, specificity=1.0, precision=NAN, f1=0.0,
                      balanced_accuracy=0.5, roc_auc=0.0, tn=2, fp=0, fn=1, tp=0),
                 id="no-positive-predictions"),
    pytest.param([0, 0], [0.1, 0.8], 0.5,  # one class: recall and AUCs undefined
                 dict(accuracy=0.5, recall=NAN, specificity=0.5, precision=0.0, f1=0.0,
                      balanced_accuracy=NAN, roc_auc=NAN, pr_auc=NAN, tn=1, fp=1, fn=0, tp=0),
                 id="only-normal"),
    pytest.param([1, 1], [0.7, 0.2], 0.5,
                 dict(recall=0.5, specificity=NAN, precision=1.0, roc_auc=NAN, pr_auc=1.0,
                      balanced_accuracy=NAN, tn=0, fp=0, fn=1, tp=1), id="only-pneumonia"),
    pytest.param([0, 0, 0], [0.1, 0.2, 0.3], 0.5,  # f1 undefined: nothing positive anywhere
                 dict(accuracy=1.0, precision=NAN, f1=NAN, recall=NAN), id="all-true-negatives"),
    pytest.param([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5,  # all tied: AUC 0.5
                 dict(roc_auc=0.5, pr_auc=0.5, recall=1.0, specificity=0.0), id="ties"),
]


@pytest.mark.parametrize(("y", "p", "t", "expected"), CASES)
def test_point_metrics_against_hand_computed_confusion(y, p, t, expected) -> None:
    got = point_metrics(np.array(y), np.array(p), t)
    assert set(got) == set(METRICS)
    for name, value in expected.items():
        if name in ("tn", "fp", "fn", "tp"):
            continue
        assert _same(got[name], value), (name, got[name], value)
    counts = {k: expected[k] for k in ("tn", "fp", "fn", "tp") if k in expected}
    if counts:
        ev = evaluate_predictions(y, p, t, n_bootstrap=20)
        assert ev.confusion == counts


def test_brier_and_ece_by_hand() -> None:
    y, p = np.array([1, 0, 1, 0]), np.array([0.95, 0.05, 0.15, 0.15])
    m = point_metrics(y, p, 0.5)
    assert m["brier"] == pytest.approx((0.05**2 + 0.05**2 + 0.85**2 + 0.15**2) / 4)
    # bins: [0.9,1): 1 image, gap 0.05; [0,0.1): 1 image, gap 0.05; [0.1,0.2): 2, |0.15-0.5|
    assert m["ece"] == pytest.approx((0.05 + 0.05 + 2 * 0.35) / 4)
    assert expected_calibration_error(y, p) == pytest.approx(m["ece"])


def test_aucs_match_scikit_learn_with_ties() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = _scores(500, 3, decimals=1)  # heavy ties
    m = point_metrics(y, p, 0.5)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))


def test_vectorised_resample_metrics_match_scikit_learn_per_resample() -> None:
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y, p = _scores(60, 4)
    idx = np.random.default_rng(9).integers(0, 60, (5, 60))
    got = _Prepared(y, p, 0.45).metrics(_draw_counts(idx, 60))
    for b in range(5):
        yb, pb = y[idx[b]], p[idx[b]]
        pred = (pb >= 0.45).astype(int)
        assert got["roc_auc"][b] == pytest.approx(roc_auc_score(yb, pb))
        assert got["pr_auc"][b] == pytest.approx(average_precision_score(yb, pb))
        assert got["recall"][b] == pytest.approx(recall_score(yb, pred))
        assert got["precision"][b] == pytest.approx(precision_score(yb, pred))
        assert got["f1"][b] == pytest.approx(f1_score(yb, pred))
        assert got["brier"][b] == pytest.approx(brier_score_loss(yb, pb))
        assert got["ece"][b] == pytest.approx(expected_calibration_error(yb, pb))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="length"):
        point_metrics([0, 1], [0.5], 0.5)
    with pytest.raises(ValueError, match="0 \\(NORMAL\\)"):
        point_metrics([0, 2], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="probabilities"):
        point_metrics([0, 1], [0.5, np.nan], 0.5)
    with pytest.raises(ValueError, match="no predictions"):
        evaluate_predictions([], [], 0.5)
    assert all(math.isnan(v) for v in point_metrics([], [], 0.5).values())


# ------------------------------------------------------------------ bootstrap


def _clustered(n_patients: int, per_patient: int, seed: int):
    """Predictions whose correctness is shared within a patient: 80% of patients are read
    well (each image right with p 0.95), the rest badly (0.35). Expected accuracy 0.83."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), per_patient)
    good = rng.random(n_patients) < 0.8
    y = np.repeat(rng.integers(0, 2, n_patients), per_patient)
    correct = rng.random(patient.size) < np.where(good[patient], 0.95, 0.35)
    p = np.where(correct == (y == 1), 0.8, 0.2)
    return y, p, patient


CLUSTERED_ACCURACY = 0.8 * 0.95 + 0.2 * 0.35


def _coverage(intervals: list, truth: float) -> float:
    return float(np.mean([iv.low <= truth <= iv.high for iv in intervals]))


def test_intervals_cover_the_true_value_at_about_the_nominal_rate() -> None:
    # Independent images: the image bootstrap's 95% interval holds the true accuracy (0.8)
    # in about 95% of repeated experiments. Too narrow or misplaced intervals fail this.
    hits = []
    for rep in range(80):
        rng = np.random.default_rng(1000 + rep)
        y = rng.integers(0, 2, 300)
        correct = rng.random(300) < 0.8
        p = np.where(correct == (y == 1), 0.8, 0.2)
        hits.append(evaluate_predictions(y, p, 0.5, n_bootstrap=100, seed=rep).metrics["accuracy"])
    assert _coverage(hits, 0.8) >= 0.88


def test_patient_bootstrap_covers_clustered_data_where_the_image_bootstrap_does_not() -> None:
    by_patient, by_image = [], []
    for rep in range(80):
        y, p, patient = _clustered(40, 8, seed=rep)
        by_patient.append(evaluate_predictions(y, p, 0.5, n_bootstrap=100, seed=rep,
                                               groups=patient).metrics["accuracy"])
        by_image.append(evaluate_predictions(y, p, 0.5, n_bootstrap=100, seed=rep)
                        .metrics["accuracy"])
    # 8 strongly correlated images per patient: treating them as independent gives
    # intervals about 2.5x too narrow, which miss the truth about half the time.
    assert _coverage(by_image, CLUSTERED_ACCURACY) < 0.75
    assert _coverage(by_patient, CLUSTERED_ACCURACY) >= 0.85


def test_patient_bootstrap_is_wider_on_clustered_data_and_repeatable() -> None:
    y, p, patient = _clustered(60, 10, seed=3)
    by_image = evaluate_predictions(y, p, 0.5, n_bootstrap=400, seed=1)
    by_patient = evaluate_predictions(y, p, 0.5, n_bootstrap=400, seed=1, groups=patient)
    ids = np.array([f"patient-{g}" for g in patient], dtype=object)  # any id type
    again = evaluate_predictions(y, p, 0.5, n_bootstrap=400, seed=1, groups=ids)
    assert by_patient.to_dict()["metrics"] == again.to_dict()["metrics"]  # same seed, same interval
    assert (by_patient.resampled, by_patient.n_clusters) == ("patients", 60)
    assert (by_image.resampled, by_image.n_clusters) == ("images", 600)
    assert by_patient.point() == by_image.point()  # only the intervals change
    for name in ("accuracy", "recall", "specificity", "roc_auc", "brier"):
        width = {k: ev.metrics[name].high - ev.metrics[name].low
                 for k, ev in (("image", by_image), ("patient", by_patient))}
        assert width["patient"] > 1.5 * width["image"], (name, width)
    other = evaluate_predictions(y, p, 0.5, n_bootstrap=400, seed=2, groups=patient)
    assert other.metrics["accuracy"] != by_patient.metrics["accuracy"]


def test_one_image_per_patient_or_no_id_is_the_image_bootstrap() -> None:
    y, p = _scores(200, 5)
    plain = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=4)
    distinct = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=4, groups=np.arange(200))
    no_ids = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=4, groups=[None] * 200)
    assert distinct.metrics == plain.metrics and no_ids.metrics == plain.metrics
    with pytest.raises(ValueError, match="groups"):
        evaluate_predictions(y, p, 0.5, groups=np.arange(199))


def test_intervals_shrink_with_more_data() -> None:
    small = evaluate_predictions(*_scores(100, 1), threshold=0.5, n_bootstrap=500)
    large = evaluate_predictions(*_scores(3000, 1), threshold=0.5, n_bootstrap=500)
    for ev in (small, large):
        assert set(ev.metrics) == set(METRICS)
        for name, iv in ev.metrics.items():
            assert iv.high > iv.low, name  # a real interval, not a point
    for name in ("accuracy", "recall", "specificity", "roc_auc", "pr_auc", "brier"):
        small_width = small.metrics[name].high - small.metrics[name].low
        large_width = large.metrics[name].high - large.metrics[name].low
        assert large_width < 0.5 * small_width, name  # ~ 1/sqrt(30) in theory


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    y, p = _scores(300, 2)
    a = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=5).to_dict()
    b = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=5).to_dict()
    c = evaluate_predictions(y, p, 0.5, n_bootstrap=200, seed=6).to_dict()
    assert a == b
    assert a["metrics"]["roc_auc"] != c["metrics"]["roc_auc"]
    assert a["metrics"]["roc_auc"]["value"] == c["metrics"]["roc_auc"]["value"]


def test_flat_point_and_json() -> None:
    y, p = _scores(200, 7)
    ev = evaluate_predictions(y, p, 0.5, n_bootstrap=100)
    assert isinstance(ev, Evaluation)
    assert (ev.n, ev.n_positive, ev.n_negative) == (200, int(y.sum()), int(200 - y.sum()))
    flat = ev.flat()
    expected = {k for m in METRICS for k in (m, f"{m}_ci_low", f"{m}_ci_high")}
    assert set(flat) == expected | {"tn", "fp", "fn", "tp"}
    assert sum(flat[k] for k in ("tn", "fp", "fn", "tp")) == 200
    assert ev.point() == {m: flat[m] for m in METRICS}
    assert ev.point() == pytest.approx(point_metrics(y, p, 0.5))
    json.dumps(ev.to_dict(), allow_nan=False)


def test_perfect_separation_and_undefined_metrics_stay_nan() -> None:
    y = np.array([0] * 50 + [1] * 50)
    p = np.r_[np.linspace(0.0, 0.4, 50), np.linspace(0.6, 1.0, 50)]
    ev = evaluate_predictions(y, p, 0.5, n_bootstrap=200)
    assert ev.metrics["roc_auc"].value == 1.0
    assert ev.metrics["roc_auc"].low == 1.0 and ev.metrics["pr_auc"].value == 1.0
    assert ev.confusion == {"tn": 50, "fp": 0, "fn": 0, "tp": 50}

    # No positive predictions: precision is nan in the point and every resample.
    ev = evaluate_predictions(y, p * 0.5, 0.9, n_bootstrap=50)
    iv = ev.metrics["precision"]
    assert math.isnan(iv.value) and math.isnan(iv.low) and math.isnan(iv.high)
    assert ev.to_dict()["metrics"]["precision"] == {"value": None, "low": None, "high": None}
    json.dumps(ev.to_dict(), allow_nan=False)


@pytest.mark.parametrize("clustered", [False, True])
def test_bootstrap_result_does_not_depend_on_chunking(monkeypatch, clustered: bool) -> None:
    # Chunks bound memory; they must not change which resamples are drawn. (The speed of a
    # 1000-image bootstrap is measured by benchmarks/bootstrap.py, not asserted here.)
    from cxr_core.evaluation import metrics

    y, p = _scores(1000, 8, decimals=None)
    groups = np.arange(1000) // 4 if clustered else None
    whole = evaluate_predictions(y, p, 0.5, n_bootstrap=300, seed=2, groups=groups)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * 1000)  # 43 chunks of 7 resamples
    chunked = evaluate_predictions(y, p, 0.5, n_bootstrap=300, seed=2, groups=groups)
    # Equal up to summation order (a chunk's matrix product may add in another order).
    assert chunked.flat() == pytest.approx(whole.flat(), rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------ calibration


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    # Overconfident: says 0.01 / 0.99 when the truth is 0.3 / 0.7.
    truth = np.where(rng.uniform(size=p.size) < 0.5, 0.3, 0.7)
    y = (rng.uniform(size=p.size) < truth).astype(int)
    over = np.where(truth > 0.5, 0.99, 0.01)
    assert expected_calibration_error(y, over) == pytest.approx(0.29, abs=0.02)
    assert expected_calibration_error(y, truth) < 0.02
    assert expected_calibration_error([1, 0], [1.0, 0.0], n_bins=5) == 0.0
