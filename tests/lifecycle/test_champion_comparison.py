"""The retrain flow's comparison with the champion, against a real `mlflow server`: only the
images both models were tested on count (by sha256, from the predictions the champion recorded
at registration), the gate decision says how many, and too few shared images skip the
comparison with a note instead of judging on the champion's training data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_core import stages
from cxr_core.evaluation.gates import GateThresholds, PairedComparison, decide
from cxr_core.evaluation.metrics import Interval
from cxr_core.lifecycle.comparison_report import compare_set, paired_rows, render_report
from cxr_core.lifecycle.promotion import champion_comparison, promote
from cxr_core.lifecycle.registry import TEST_PREDICTIONS_TAG

pytestmark = pytest.mark.integration
METRICS = {"recall": Interval(0.97, 0.96, 0.98), "accuracy": Interval(0.95, 0.94, 0.96)}


def _champion(client, registrar, name: str, hashes: list[str], correct: np.ndarray) -> str:
    _, version = registrar.candidate(name, registrar.predictions(hashes, correct),
                                     with_model=False)
    promote(client, name, version)
    return version


def test_partly_overlapping_test_sets_are_compared_on_the_shared_images(
        client, registrar, model_name, tmp_path) -> None:
    # The champion was tested on images 0-79 and wrong on 40-49; the candidate is tested on
    # 40-119 (80-119 were, say, the champion's training data) and wrong on 80-99 only.
    champ_ok = np.ones(80, bool)
    champ_ok[40:50] = False
    champion = _champion(client, registrar, model_name, registrar.hashes(0, 80), champ_ok)
    cand_ok = np.ones(80, bool)
    cand_ok[40:60] = False
    predictions = tmp_path / "test_predictions.csv"
    registrar.predictions(registrar.hashes(40, 120), cand_ok).to_csv(predictions, index=False)

    comparison = champion_comparison(client, model_name, predictions)
    assert comparison.champion_version == champion
    assert comparison.shared_images == 40 and comparison.skipped is None
    # On the 40 shared images the champion is wrong on 10 and the candidate on none.
    everything = comparison.comparisons[0]
    assert everything == PairedComparison("all", 40, 0, 10, everything.p_value)
    assert comparison.comparisons[1].subset == "positives" and comparison.comparisons[1].n == 20
    assert comparison.comparisons[1].candidate_only == 5
    decision = decide(METRICS, GateThresholds(), comparison)
    assert decision.passed and decision.shared_test_images == 40
    assert f"compared with champion version {champion} on 40 shared test images" in \
        decision.summary()
    assert "McNemar on 40 all images" in decision.summary()
    # The flow's current call (flows/tasks.py) goes the same way.
    assert stages.compare_stage(client, model_name, predictions) == (comparison, champion)


def test_too_few_shared_images_skip_the_comparison_with_a_note(client, registrar, model_name,
                                                              tmp_path) -> None:
    champion = _champion(client, registrar, model_name, registrar.hashes(0, 80),
                         np.ones(80, bool))
    # Ten shared images; the other 70 of the candidate's test set the champion never saw as
    # test images, and the candidate is wrong on 30 of them.
    cand_ok = np.ones(80, bool)
    cand_ok[10:40] = False
    predictions = tmp_path / "test_predictions.csv"
    registrar.predictions(registrar.hashes(70, 150), cand_ok).to_csv(predictions, index=False)

    comparison = champion_comparison(client, model_name, predictions)
    assert comparison.shared_images == 10 and comparison.comparisons == ()
    note = f"comparison with champion version {champion} skipped: 10 shared test images < 30"
    assert comparison.skipped == note
    decision = stages.gate_stage(_Evaluated(), _config(), comparison, None)
    assert decision.passed and decision.champion_version == champion
    assert decision.notes == (note,) and decision.shared_test_images == 10
    assert not [c for c in decision.checks if c.name.startswith("no_")]
    assert f"note: {note}" in decision.summary()


def test_champion_without_recorded_predictions_is_not_compared(client, registrar, model_name,
                                                               tmp_path) -> None:
    champion = _champion(client, registrar, model_name, registrar.hashes(0, 40),
                         np.ones(40, bool))
    # The version points at predictions its run does not hold (e.g. removed artifacts).
    client.set_model_version_tag(model_name, champion, TEST_PREDICTIONS_TAG, "evaluation/gone.csv")
    predictions = tmp_path / "test_predictions.csv"
    registrar.predictions(registrar.hashes(0, 40)).to_csv(predictions, index=False)
    comparison = champion_comparison(client, model_name, predictions)
    assert comparison.shared_images == 0
    assert comparison.skipped == (f"comparison with champion version {champion} skipped: it has "
                                  "no recorded test predictions")


def test_no_champion_no_comparison(client, registrar, model_name, tmp_path) -> None:
    registrar.candidate(model_name, registrar.predictions(registrar.hashes(0, 40)),
                        with_model=False)  # a challenger, never promoted
    predictions = tmp_path / "test_predictions.csv"
    registrar.predictions(registrar.hashes(0, 40)).to_csv(predictions, index=False)
    assert champion_comparison(client, model_name, predictions) is None
    assert stages.compare_stage(client, model_name, predictions) == (None, None)


def test_patient_ids_in_the_predictions_make_patients_the_unit(client, registrar, model_name,
                                                                tmp_path) -> None:
    # 80 shared images of 10 patients (8 each). The champion is right everywhere; the
    # candidate is wrong on all 8 images of patient 0 and 4 of patient 1: b = 12, c = 0.
    # By image, exact p = 2 * 0.5**12 = 0.0005, a regression; by patient d = 8, 4, 0 ...:
    # X^2 = 12^2 / (64 + 16) = 1.8, p = 0.18 (on the positives d = 4, 2: 36 / 20 = 1.8 too).
    hashes = registrar.hashes(0, 80)
    patients = [f"patient{i // 8}" for i in range(80)]
    champion_preds = registrar.predictions(hashes).assign(patient_id=patients)
    _, champion = registrar.candidate(model_name, champion_preds, with_model=False)
    promote(client, model_name, champion)
    cand_ok = np.ones(80, bool)
    cand_ok[:12] = False
    candidate = registrar.predictions(hashes, cand_ok).assign(patient_id=patients)
    clustered_p = math.erfc(math.sqrt(1.8 / 2))
    with_ids, without_ids = tmp_path / "with_ids.csv", tmp_path / "without_ids.csv"
    candidate.to_csv(with_ids, index=False)
    candidate.drop(columns="patient_id").to_csv(without_ids, index=False)

    by_patient = champion_comparison(client, model_name, with_ids)
    everything, positives = by_patient.comparisons
    assert (everything.test, everything.n, everything.n_patients) == ("clustered", 80, 10)
    assert (everything.champion_only, everything.candidate_only) == (12, 0)
    assert everything.p_value == pytest.approx(clustered_p)
    assert (positives.test, positives.n, positives.n_patients) == ("clustered", 40, 10)
    assert positives.champion_only == 6 and positives.p_value == pytest.approx(clustered_p)
    decision = decide(METRICS, GateThresholds(), by_patient)
    assert decision.passed
    assert "patient-clustered McNemar (Durkalski) on 80 all images of 10 patients" in \
        decision.summary()
    # Without a patient_id column: images are the unit, as before, and it is a regression.
    by_image = champion_comparison(client, model_name, without_ids).comparisons[0]
    assert by_image == PairedComparison("all", 80, 12, 0, 2 * 0.5**12)
    assert [c.name for c in decide(METRICS, GateThresholds(), (by_image,)).failed] == \
        ["no_accuracy_regression"]
    # `cxr promote` and its side-by-side report count patients too.
    _, version = registrar.candidate(model_name, candidate, with_model=False)
    result = promote(client, model_name, version)
    assert result.comparison["passed"]
    assert "patient-clustered" in result.comparison["checks"][0]["detail"]
    shared = compare_set(paired_rows(candidate, champion_preds), {"candidate": 0.5,
                                                                  "champion": 0.5})
    table = shared["mcnemar"]
    assert [(r["test"], r["n_patients"]) for r in table] == [("clustered", 10)] * 2
    assert table[0]["p_value"] == pytest.approx(clustered_p)
    report = render_report(model_name, version, champion,
                           {"outcome": "promoted", "alpha": 0.05, "passed": True},
                           {"Shared test images": shared})
    assert f"| all | 80 | 10 | 12 | 0 | patient-clustered McNemar (Durkalski) | " \
        f"{clustered_p:.4g} |" in report


class _Evaluated:
    """What gate_stage reads of an EvaluatedModel."""

    class evaluation:  # noqa: N801
        metrics = METRICS

    robustness: dict[str, float] = {}


def _config():
    from cxr_core.config import load_config

    return load_config(None, "quick")
