"""Scanning: layout tolerance, patient ids, decode errors, junk, and no writes to sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from cxr_core.data.manifest import (
    MANIFEST_COLUMNS,
    SHORTCUT_SCORE_COLUMNS,
    find_data_root,
    inspect_image,
    manifest_hash,
    patient_id_from_name,
    read_manifest,
    scan_dataset,
    write_manifest,
)
from cxr_core.errors import DataLayoutError
from support.images import tree_digest, write_image


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person12_bacteria_3.jpeg", "12"),
        ("person1_virus_7.jpeg", "1"),
        ("PERSON0045_virus_7.jpeg", "45"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),
        ("scan_001.png", "scan_001"),
    ],
)
def test_patient_id_from_name(name: str, expected: str) -> None:
    assert patient_id_from_name(name) == expected


def test_scan_good_dataset_rows(good_dataset: Path) -> None:
    scan = scan_dataset(good_dataset, workers=1)
    m = scan.manifest
    assert list(m.columns) == MANIFEST_COLUMNS + SHORTCUT_SCORE_COLUMNS
    assert m[SHORTCUT_SCORE_COLUMNS].notna().all().all()  # every readable image is scored
    assert len(m) == 3 * 8 * 2 * 2
    assert m["readable"].all()
    assert set(m["split"]) == {"train", "val", "test"}
    assert set(m["label"]) == {"NORMAL", "PNEUMONIA"}
    assert (m["width"] == 64).all() and (m["mode"] == "L").all() and (m["channels"] == 1).all()
    assert m["sha256"].str.len().eq(64).all()
    assert scan.quarantine.empty


def test_parallel_scan_matches_serial(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(300):  # above the serial threshold, so the process pool is used
        label = "NORMAL" if i % 2 else "PNEUMONIA"
        write_image(root / "train" / label / f"IM-{i:04d}-0001.jpeg", i, size=32)
    serial = scan_dataset(root, workers=1).manifest
    parallel = scan_dataset(root, workers=2).manifest
    assert serial.equals(parallel)


@pytest.mark.parametrize("wrap", ["chest_xray/chest_xray", "chest_xray", ""])
def test_find_root_tolerates_nesting_and_case(tmp_path: Path, wrap: str) -> None:
    base = tmp_path / wrap if wrap else tmp_path
    write_image(base / "TRAIN" / "Normal" / "IM-0001-0001.jpeg", 1)
    write_image(base / "TRAIN" / "PNEUMONIA" / "person1_virus_1.jpeg", 2)
    assert find_data_root(tmp_path) == base
    m = scan_dataset(tmp_path, workers=1).manifest
    assert sorted(m["label"]) == ["NORMAL", "PNEUMONIA"]
    assert set(m["split"]) == {"train"}  # val/ and test/ may be missing


def test_class_folders_directly_under_root_are_train(tmp_path: Path) -> None:
    write_image(tmp_path / "NORMAL" / "IM-0001-0001.jpeg", 1)
    write_image(tmp_path / "PNEUMONIA" / "person1_virus_1.jpeg", 2)
    m = scan_dataset(tmp_path, workers=1).manifest
    assert set(m["split"]) == {"train"} and len(m) == 2


def test_not_a_dataset_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataLayoutError, match="no train/"):
        scan_dataset(tmp_path)
    with pytest.raises(DataLayoutError, match="not a directory"):
        scan_dataset(tmp_path / "missing")


def test_malformed_corpus_each_file_reported(malformed_corpus: dict[str, Path]) -> None:
    root = malformed_corpus["root"]
    before = tree_digest(root)
    scan = scan_dataset(root, workers=1)
    m = scan.manifest.set_index("path")

    def row(key: str):
        return m.loc[str(malformed_corpus[key].resolve())]

    assert not row("truncated")["readable"] and "truncated" in row("truncated")["error"]
    assert row("zero_byte")["error"] == "zero-byte file" and row("zero_byte")["bytes"] == 0
    assert "not an image" in row("text")["error"]
    assert row("png_as_jpeg")["readable"] and row("png_as_jpeg")["format"] == "PNG"
    assert row("rgba")["mode"] == "RGBA" and row("rgba")["channels"] == 4
    assert row("png16")["mode"].startswith("I") and row("png16")["readable"]
    assert row("tiny")["width"] == 8
    assert pd.isna(row("unknown_file")["label"])
    assert str(malformed_corpus["ds_store"].resolve()) not in m.index
    assert [reason for path, reason in scan.skipped if path.endswith(".DS_Store")]
    assert scan.empty_class_dirs == [str(malformed_corpus["empty_dir"].resolve())]
    assert scan.unknown_class_dirs == [str(malformed_corpus["unknown_dir"].resolve())]
    quarantined = set(scan.quarantine["path"])
    assert quarantined == {str(malformed_corpus[k].resolve()) for k in ("truncated", "zero_byte", "text")}
    # Nothing was moved, rewritten or deleted.
    assert tree_digest(root) == before


def test_inspect_unreadable_path_records_error(tmp_path: Path) -> None:
    row = inspect_image(str(tmp_path / "gone.jpeg"))
    assert row["readable"] is False and row["error"].startswith("cannot read file")


def test_manifest_roundtrip_and_hash(good_dataset: Path, tmp_path: Path) -> None:
    m = scan_dataset(good_dataset, workers=1).manifest
    for suffix in (".parquet", ".csv"):
        back = read_manifest(write_manifest(m, tmp_path / f"m{suffix}"))
        assert len(back) == len(m) and list(back.columns) == MANIFEST_COLUMNS + SHORTCUT_SCORE_COLUMNS
    h = manifest_hash(m)
    assert h == manifest_hash(m.sample(frac=1, random_state=0))  # order-free
    changed = m.copy()
    changed.loc[0, "sha256"] = "0" * 64
    assert manifest_hash(changed) != h


def test_copy_elsewhere_gives_same_hash(good_dataset: Path, tmp_path: Path) -> None:
    # relpaths, not absolute paths, enter the hash: a moved data set is the same data set.
    copy = shutil.copytree(good_dataset, tmp_path / "copy")
    assert manifest_hash(scan_dataset(copy, workers=1).manifest) == manifest_hash(
        scan_dataset(good_dataset, workers=1).manifest)
