"""The model card carries this model's own figures, the split provenance as it was, and (once
registered, against a real `mlflow server`) its version and aliases."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.evaluation.gates import GateThresholds, decide
from cxr_core.evaluation.metrics import evaluate_predictions
from cxr_core.lifecycle.model_card import (
    CARVED_TEST_LIMITATION,
    GIVEN_TEST_LIMITATION,
    MODEL_CARD_ARTIFACT,
    render_model_card,
    split_provenance,
)
from cxr_core.lifecycle.promotion import promote, rollback
from cxr_core.training.fit import ThresholdChoice

OLD_HARD_CODED = ("0.977", "0.867")


def _manifest(test_origin: str) -> pd.DataFrame:
    rows = [("train", "folder")] * 6 + [("val", "carved")] * 2 + [("test", test_origin)] * 3
    frame = pd.DataFrame(rows, columns=["split", "split_origin"])
    frame["label"] = ["NORMAL", "PNEUMONIA"] * 5 + ["NORMAL"]
    frame["readable"] = True
    return frame


def _card(seed: int, test_origin: str = "carved", robustness: dict | None = None,
          **extra: object) -> str:
    rng = np.random.default_rng(seed)
    y = np.arange(60) % 2
    p = y * 0.3 + rng.uniform(0, 0.7, 60)  # overlapping classes: figures vary with the seed
    evaluation = evaluate_predictions(y, p, 0.5, n_bootstrap=50, seed=seed)
    decision = decide(evaluation.metrics, GateThresholds(0.5, 0.5))
    summary = {"data_root": "/data", "manifest_hash": "abc", "image_size": 16,
               "split_counts": {"test": {"NORMAL": 30, "PNEUMONIA": 30}},
               "split_origins": split_provenance(_manifest(test_origin)), "balancing": "none",
               **extra}
    return render_model_card("cxr-pneumonia", None, evaluation,
                             ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20), decision,
                             summary, {"blocks": 3}, "quick", robustness=robustness)


def test_cards_carry_their_own_figures_and_no_hard_coded_ones() -> None:
    first, second = _card(1), _card(2, robustness={"robust_worst_accuracy": 0.4321})
    table = [line for line in first.splitlines() if line.startswith("| accuracy |")]
    assert table and table[0] not in second  # different evaluations, different figures
    for card in (first, second):
        assert not any(number in card for number in OLD_HARD_CODED)
    assert "| accuracy | 0.432 |" in second and "No robustness report" in first


def test_card_states_given_or_carved_split_origin() -> None:
    carved, given = _card(1, "carved"), _card(1, "folder")
    assert "| test | carved | 3 |" in carved and CARVED_TEST_LIMITATION in carved
    assert "| test | folder | 3 | given" in given and GIVEN_TEST_LIMITATION in given
    assert CARVED_TEST_LIMITATION not in given
    assert "| val | carved | 2 |" in given  # each split says where it came from


def test_card_has_a_shortcut_audit_flagging_scores_above_the_warning_level() -> None:
    from cxr_core.config import ExperimentConfig
    from cxr_core.lifecycle.tracking import shortcut_summary

    rows = 40
    manifest = pd.DataFrame({
        "split": ["train"] * rows, "label": ["NORMAL", "PNEUMONIA"] * (rows // 2),
        "readable": True,
        "annotation_top_px": [0.0, 30.0] * (rows // 2),          # text marks PNEUMONIA
        "annotation_side_px": np.random.default_rng(0).uniform(0, 5, rows),
        "abdomen_fraction": [0.2] * rows})
    cfg = ExperimentConfig.model_validate({"train": {"mask_annotations": "borders",
                                                     "lung_crop": {"bottom": 0.15}}})
    summary = shortcut_summary(cfg, manifest)
    card = _card(1, **summary)
    section = card.split("## Shortcut audit", 1)[1].split("\n## ", 1)[0]
    assert "| annotation_top_px | train | 1.000 | PNEUMONIA | **above 0.75** |" in section
    assert "| abdomen_fraction | train | 0.500 | neither | |" in section
    assert "annotation mask `borders` (mean fill)" in section and "bottom 0.15" in section
    assert "No shortcut scores were audited" in _card(1).split("## Shortcut audit", 1)[1]


def test_split_provenance_counts_usable_labelled_images() -> None:
    manifest = _manifest("carved")
    manifest.loc[0, "readable"] = False
    manifest.loc[1, "label"] = "UNKNOWN"
    assert split_provenance(manifest) == {"train": {"folder": 4}, "val": {"carved": 2},
                                          "test": {"carved": 3}}


@pytest.mark.integration
def test_registered_card_names_version_and_aliases(client, registrar, model_name,
                                                   tmp_path) -> None:
    def card_of(run_id: str) -> str:
        path = client.download_artifacts(run_id, MODEL_CARD_ARTIFACT, tempfile.mkdtemp(dir=tmp_path))
        return Path(path).read_text()

    preds = registrar.predictions(registrar.hashes(0, 40))
    run1, v1 = registrar.candidate(model_name, preds, with_model=False, card=_card(1))
    assert "not registered yet" in _card(1)
    card = card_of(run1)
    assert card.startswith(f"# Model card: {model_name} version {v1}\n")
    assert f"Registered model `{model_name}`, version {v1}. Aliases: `challenger`." in card
    assert "not registered" not in card and card.count("## Registry") == 1
    promote(client, model_name, v1)
    assert f"version {v1}. Aliases: `champion`." in card_of(run1)
    run2, v2 = registrar.candidate(model_name, preds, with_model=False, card=_card(2))
    promote(client, model_name, v2)
    assert f"version {v2}. Aliases: `champion`." in card_of(run2)
    assert f"version {v1}. Aliases: `previous-champion`." in card_of(run1)
    rollback(client, model_name)
    assert f"version {v1}. Aliases: `champion`." in card_of(run1)
    assert f"version {v2}. Aliases: `previous-champion`." in card_of(run2)


def test_card_and_summary_show_external_sets_with_the_gap_to_the_test_split() -> None:
    from cxr_core.evaluation.external import SiteThreshold
    from cxr_core.lifecycle.model_card import card_summary

    y = np.arange(60) % 2
    test = evaluate_predictions(y, np.where(y == 1, 0.9, 0.1), 0.5, n_bootstrap=50)  # all right
    p = np.where(y == 1, 0.9, 0.1)
    p[:10:2] = 0.8  # 5 of 30 NORMAL images called PNEUMONIA: specificity 25/30
    external = {"site-b": evaluate_predictions(y, p, 0.5, n_bootstrap=50)}
    decision = decide(test.metrics, GateThresholds(0.5, 0.5))
    summary = {"data_root": "/data", "manifest_hash": "abc", "image_size": 16,
               "split_counts": {"test": {"NORMAL": 30, "PNEUMONIA": 30}}}
    site = SiteThreshold(0.85, 1.0, 0.9, 0.97, 30, 30, "/data/site-b-sample")
    card = render_model_card("cxr-pneumonia", None, test,
                             ThresholdChoice(0.5, 0.96, 0.5, 0.7, 0.95, 20, 20), decision,
                             summary, {"blocks": 3}, "quick", external=external,
                             site_threshold=site)
    gap_row = "| site-b | 60 | -0.083 | +0.000 | -0.167 | "
    assert "## External validation" in card and "| external: site-b | 60 |" in card
    assert gap_row in card
    assert "Site threshold 0.8500 for `/data/site-b-sample`" in card and "recall 1.000" in card
    short = card_summary(test, decision, summary, external)
    assert gap_row in short and "| external: site-b | 60 | 0.917" in short
    assert "No external set was scored" in _card(1) and "Site threshold" not in _card(1)
