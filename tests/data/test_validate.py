"""great_expectations validation: pass on good data, precise failures on the malformed corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_core.config import DataConfig, ValidationConfig
from cxr_core.data.validate import validate_dataset
from cxr_core.evaluation.shortcuts import shortcut_auc
from support.images import chest_like, tree_digest, with_text, write_image

# Tiny test images: relax size bounds and counts, keep given val (no carving).
DATA = DataConfig(min_val_images=0)
VALID = ValidationConfig(min_width=16, min_height=16, min_images_per_class=2)


def check(report, name):
    (c,) = [c for c in report.checks if c.name == name]
    return c


def test_good_dataset_passes_and_writes_reports(good_dataset: Path, tmp_path: Path) -> None:
    _, report = validate_dataset(good_dataset, DATA, VALID, seed=0, report_dir=tmp_path / "r")
    assert report.passed, report.summary_text()
    assert not report.warnings
    assert report.split_counts["train"] == {"NORMAL": 16, "PNEUMONIA": 16}
    summary = json.loads((tmp_path / "r" / "validation_summary.json").read_text())
    assert summary["passed"] is True and summary["n_images"] == 96
    assert (tmp_path / "r" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "r" / "manifest.parquet").is_file()
    assert "PASSED" in report.summary_text()


def test_malformed_corpus_fails_naming_each_file(malformed_corpus: dict[str, Path],
                                                 tmp_path: Path) -> None:
    root = malformed_corpus["root"]
    before = tree_digest(root)
    _, report = validate_dataset(root, DATA, VALID, seed=0, report_dir=tmp_path / "r")
    assert not report.passed

    def named(name: str, *keys: str) -> None:
        c = check(report, name)
        assert not c.success, name
        for key in keys:
            assert str(malformed_corpus[key].resolve()) in c.offending, (name, key, c.offending)

    named("readable", "truncated", "zero_byte", "text")
    assert check(report, "readable").severity == "error"
    assert check(report, "readable").n_offending == 3
    named("width_in_bounds", "tiny")
    named("height_in_bounds", "tiny")
    named("no_duplicates_across_splits", "leak_train", "leak_test")
    named("no_patient_in_given_splits", "patient_train", "patient_val")
    assert check(report, "no_patient_in_given_splits").severity == "warning"
    named("eight_bit_gray_or_rgb", "rgba", "png16")
    named("format_matches_extension", "png_as_jpeg")
    named("label_not_null", "unknown_file")
    named("no_empty_class_folders", "empty_dir")
    named("no_unknown_class_folders", "unknown_dir")
    counts = check(report, "min_images_per_class")
    assert not counts.success
    assert any(item.startswith("val/NORMAL: 0 images") for item in counts.offending)
    assert any(p.endswith(".DS_Store") for p, _ in report.skipped)
    text = report.summary_text()
    assert "FAILED" in text
    for key in ("truncated", "zero_byte", "text", "tiny", "leak_test", "unknown_file"):
        assert str(malformed_corpus[key].resolve()) in text
    # The quarantine list holds the three undecodable files, and no source file changed.
    q = pd.read_csv(tmp_path / "r" / "quarantine.csv")
    assert len(q) == 3
    assert tree_digest(root) == before


def test_carved_patient_leak_is_an_error(good_dataset: Path, tmp_path: Path) -> None:
    from cxr_core.data.manifest import scan_dataset
    from cxr_core.data.splits import assign_splits
    from cxr_core.data.validate import validate_scan

    scan = scan_dataset(good_dataset, workers=1)
    scan.manifest = assign_splits(scan.manifest, min_val_images=1000, seed=0)  # carve val
    m = scan.manifest
    val_row = m.index[m["split"] == "val"][0]
    m.loc[val_row, "patient_id"] = m.loc[m["split"] == "train", "patient_id"].iloc[0]
    report = validate_scan(scan, VALID)
    c = check(report, "no_patient_in_carved_splits")
    assert not c.success and c.severity == "error" and m.loc[val_row, "path"] in c.offending


def test_patient_in_both_classes_is_a_named_warning(good_dataset: Path) -> None:
    # IM-0001 is a NORMAL patient; a PNEUMONIA file with the same name pattern shares its id.
    normal = sorted((good_dataset / "train" / "NORMAL").glob("IM-0001-*.jpeg"))
    collision = write_image(good_dataset / "train" / "PNEUMONIA" / "IM-0001-0003.jpeg", 4242)
    carve = DataConfig(min_val_images=1000)  # fold the given val into train and carve val
    scan, report = validate_dataset(good_dataset, carve, VALID, seed=0)
    c = check(report, "no_patient_in_both_classes")
    assert not c.success and c.severity == "warning"
    assert "IM-0001" in c.observed
    assert set(c.offending) == {str(f.resolve()) for f in [*normal, collision]}
    assert "IM-0001" in report.summary_text()
    assert report.passed, report.summary_text()  # a warning does not fail the data set
    m = scan.manifest
    assert (m["split_origin"] == "carved").any()
    assert m.loc[m["patient_id"] == "IM-0001", "split"].nunique() == 1


def test_duplicates_within_split_are_a_warning(good_dataset: Path) -> None:
    src = next((good_dataset / "train" / "NORMAL").iterdir())
    copy = good_dataset / "train" / "NORMAL" / "IM-0999-0001.jpeg"
    copy.write_bytes(src.read_bytes())
    _, report = validate_dataset(good_dataset, DATA, VALID, seed=0)
    c = check(report, "no_duplicates_within_split")
    assert not c.success and c.severity == "warning"
    assert {str(src.resolve()), str(copy.resolve())} <= set(c.offending)
    assert report.passed  # a warning does not fail the data set


def test_class_fraction_bounds(good_dataset: Path) -> None:
    strict = VALID.model_copy(update={"min_class_fraction": 0.6})
    _, report = validate_dataset(good_dataset, DATA, strict, seed=0)
    assert not check(report, "class_fraction_in_bounds").success and not report.passed


def test_shortcut_audit_flags_size_that_gives_the_class_away() -> None:
    rng = np.random.default_rng(0)
    n = 200
    label = np.array(["NORMAL", "PNEUMONIA"] * (n // 2))
    width = np.where(label == "PNEUMONIA", 1800, 1200) + rng.integers(-100, 100, n)
    m = pd.DataFrame({"label": label, "width": width, "height": rng.integers(900, 1100, n),
                      "readable": True})
    assert shortcut_auc(m) > 0.95
    m["width"] = rng.integers(1000, 2000, n)
    assert shortcut_auc(m) < 0.7
    m["width"], m["height"] = 224, 224
    assert shortcut_auc(m) == 0.5
    assert shortcut_auc(m.head(10)) is None


def text_shortcut_dataset(root: Path, n: int = 14) -> Path:
    """Chest-like 224 px images; every PNEUMONIA image carries an "R" in the top-left corner
    and no NORMAL image does: burned-in text gives the class away."""
    for label in ("NORMAL", "PNEUMONIA"):
        for i in range(n):
            img = chest_like(seed=i)
            if label == "PNEUMONIA":
                img = with_text(img, "R", (8, 6))
            name = f"IM-{i:04d}-0001.png" if label == "NORMAL" else f"person{i}_virus_1.png"
            out = root / "train" / label / name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out)
    return root


def test_shortcut_audit_warns_when_burned_in_text_gives_the_class_away(tmp_path: Path) -> None:
    root = text_shortcut_dataset(tmp_path / "text")
    scan, report = validate_dataset(root, DATA, VALID, seed=0, report_dir=tmp_path / "r")
    assert report.passed  # a warning, never an error
    c = check(report, "image_score_shortcut")
    assert not c.success and c.severity == "warning"
    assert any(o.startswith("annotation_top_px in train: ROC-AUC 1.000, higher in PNEUMONIA")
               for o in c.offending), c.offending
    assert "annotation_top_px" in c.observed
    assert not any(o.startswith("abdomen_fraction") for o in c.offending)  # same anatomy
    assert "[WARN ] image_score_shortcut" in report.summary_text()
    summary = json.loads((tmp_path / "r" / "validation_summary.json").read_text())
    top = [r for r in summary["shortcut_scores"] if r["score"] == "annotation_top_px"]
    assert {r["split"] for r in top} == set(scan.manifest["split"])
    # The per-image scores are in the manifest, for inspection.
    m = pd.read_parquet(tmp_path / "r" / "manifest.parquet")
    assert (m.loc[m["label"] == "PNEUMONIA", "annotation_top_px"] > 0).all()
    assert (m.loc[m["label"] == "NORMAL", "annotation_top_px"] == 0).all()


def test_shortcut_audit_passes_without_a_shortcut(tmp_path: Path) -> None:
    root = text_shortcut_dataset(tmp_path / "text")
    for f in (root / "train" / "PNEUMONIA").iterdir():  # the same images, without the text
        Image.fromarray(chest_like(seed=int(f.name.split("_")[0][6:]))).save(f)
    _, report = validate_dataset(root, DATA, VALID, seed=0)
    assert check(report, "image_score_shortcut").success


@pytest.mark.realdata
def test_real_train_split_passes_and_finds_26_duplicates(real_data: Path, tmp_path: Path) -> None:
    from cxr_core.config import load_config

    cfg = load_config(profile="full")
    scan, report = validate_dataset(real_data, cfg.data, cfg.validation, cfg.seed, tmp_path / "r")
    m = scan.manifest
    train_folder = m[m["folder_split"] == "train"]
    assert len(train_folder) == 5216
    # 26 images are exact byte copies of another train image.
    assert len(train_folder) - train_folder["sha256"].nunique() == 26
    dup = check(report, "no_duplicates_within_split")
    assert not dup.success and dup.n_offending >= 26 + 1
    assert report.passed, report.summary_text()
    # Shortcut scores (benchmarks/shortcuts.py): top-corner text marks PNEUMONIA, side
    # markers and a wider field of view NORMAL.
    train = {r["score"]: r for r in report.shortcut_scores if r["split"] == "train"}
    assert train["annotation_top_px"]["higher_in"] == "PNEUMONIA"
    assert train["annotation_top_px"]["auc"] > 0.7
    assert train["annotation_side_px"]["higher_in"] == "NORMAL"
    assert train["abdomen_fraction"]["higher_in"] == "NORMAL"
    # val and test were carved by patient from train.
    assert set(m["split"]) == {"train", "val", "test"}
    assert m.groupby("patient_id")["split"].nunique().max() == 1
