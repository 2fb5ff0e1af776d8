"""Per-image shortcut scores (burned-in annotations, field of view) and their per-split AUCs,
on small synthetic chest-like images whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core.evaluation.shortcuts import (
    SCORE_COLUMNS,
    SCORE_SIZE,
    abdomen_fraction,
    image_scores,
    score_aucs,
    score_image,
)
from support.images import chest_like as chest
from support.images import with_text

S = SCORE_SIZE


def test_a_burned_in_letter_in_a_top_corner_is_found_only_there() -> None:
    plain = chest()
    assert image_scores(plain)["annotation_top_px"] == 0
    left = image_scores(with_text(plain, "R", (8, 6)))
    right = image_scores(with_text(plain, "A-P", (S - 40, 8)))
    assert left["annotation_top_px"] >= 10 and right["annotation_top_px"] >= 10
    assert left["annotation_side_px"] == 0  # the corner is not the side strip
    # The same letter in the middle of the image is not a border annotation.
    middle = image_scores(with_text(plain, "R", (S // 2, S // 2)))
    assert middle["annotation_top_px"] == 0 and middle["annotation_side_px"] == 0


def test_a_side_marker_is_found_in_the_side_strip() -> None:
    scores = image_scores(with_text(chest(), "R", (2, S // 2)))
    assert scores["annotation_side_px"] >= 10 and scores["annotation_top_px"] == 0


def test_broad_bright_anatomy_and_long_edges_are_not_annotations() -> None:
    img = chest()
    img[5:30, 10:40] = 230           # a broad bright structure (a shoulder, the chin)
    img[20, 0:45] = 250              # a long thin line (a cassette edge)
    scores = image_scores(img)
    assert scores["annotation_top_px"] == 0


def test_abdomen_fraction_follows_where_the_lungs_end() -> None:
    wide = abdomen_fraction(chest(lung_bottom=0.65))
    tight = abdomen_fraction(chest(lung_bottom=0.85))
    assert wide == pytest.approx(0.35, abs=0.05)
    assert tight == pytest.approx(0.15, abs=0.05)
    # Opaque (pneumonic) lower lobe on one side: the other lung still ends where it did.
    img = chest(lung_bottom=0.7)
    img[int(0.5 * S):int(0.7 * S), int(0.18 * S):int(0.46 * S)] = 150
    assert abdomen_fraction(img) == pytest.approx(0.3, abs=0.05)
    assert abdomen_fraction(np.full((S, S), 128, np.uint8)) == 0.0  # no lungs, no answer


def test_score_image_resizes_any_pillow_image_and_never_raises() -> None:
    small = Image.fromarray(chest()).resize((100, 100)).convert("RGB")
    scores = score_image(small)
    assert set(scores) == set(SCORE_COLUMNS) and all(v is not None for v in scores.values())
    sixteen = Image.fromarray(chest().astype(np.uint16) * 256)
    assert score_image(sixteen)["abdomen_fraction"] == pytest.approx(
        score_image(chest())["abdomen_fraction"], abs=0.02)
    assert score_image(np.zeros((10, 10, 5), np.uint8)) == dict.fromkeys(SCORE_COLUMNS)


def manifest(scores: dict[str, list[float]], labels: list[str], split: str = "train") -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"readable": [True] * n, "label": labels, "split": [split] * n, **scores})


def test_score_aucs_are_oriented_and_name_the_higher_class() -> None:
    labels = ["NORMAL"] * 10 + ["PNEUMONIA"] * 10
    rising = list(range(20))
    rows = score_aucs(manifest({"annotation_top_px": rising,
                                "annotation_side_px": rising[::-1],
                                "abdomen_fraction": [0.2] * 20}, labels))
    by = {r["score"]: r for r in rows}
    assert by["annotation_top_px"]["auc"] == 1.0
    assert by["annotation_top_px"]["higher_in"] == "PNEUMONIA"
    assert by["annotation_side_px"]["auc"] == 1.0
    assert by["annotation_side_px"]["higher_in"] == "NORMAL"
    assert by["abdomen_fraction"]["auc"] == 0.5  # a constant tells nothing
    assert by["abdomen_fraction"]["higher_in"] == "neither"
    assert by["annotation_top_px"]["mean_NORMAL"] == pytest.approx(4.5)


def test_score_aucs_skip_small_splits_and_missing_scores() -> None:
    few = manifest({"annotation_top_px": [1, 2, 3, 4]}, ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"])
    (row,) = score_aucs(few)
    assert row["auc"] is None and row["n"] == 4
    old = manifest({}, ["NORMAL"] * 10 + ["PNEUMONIA"] * 10)  # a manifest without scores
    assert score_aucs(old) == []
