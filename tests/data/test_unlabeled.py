"""Unlabeled site images (cxr run --unlabeled DIR): any layout, bad files named and left
out, and refused when they share an image with what selects or judges the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_core.data.external import write_scan
from cxr_core.data.splits import scan_and_split
from cxr_core.data.unlabeled import check_unlabeled_folder, scan_unlabeled
from cxr_core.errors import InputError
from support.images import make_good_dataset, write_image


def _run_manifest(tmp_path: Path):
    from cxr_core.config import load_config

    data = make_good_dataset(tmp_path / "data", n_patients=4, imgs=1)
    cfg = load_config(None, "quick")
    return scan_and_split(data, cfg.data, cfg.seed).manifest


def test_any_layout_is_scanned_and_bad_files_are_named_and_left_out(tmp_path) -> None:
    manifest = _run_manifest(tmp_path)
    site = tmp_path / "site"
    write_image(site / "a.jpeg", 9001)
    write_image(site / "day2" / "scanner-x" / "b.png", 9002, fmt="PNG")
    write_image(site / "PNEUMONIA" / "c.jpeg", 9003)  # a folder name is not a label here
    (site / "broken.jpeg").write_bytes(b"not an image")
    (site / "notes.txt").write_text("x")
    scan = scan_unlabeled(site, manifest, {}, workers=1)
    # Every image below the folder, in path order (PNEUMONIA/ sorts before a.jpeg).
    assert [Path(p).name for p in scan.paths] == ["c.jpeg", "a.jpeg", "b.png"]
    assert scan.report["usable"] == 3 and scan.report["files"] == 4
    excluded = scan.report["excluded"]
    assert [Path(e["path"]).name for e in excluded] == ["broken.jpeg"]
    assert "unreadable" in excluded[0]["reason"]
    assert any("broken.jpeg" in line for line in scan.findings())
    report = write_scan(scan, tmp_path / "out")
    assert json.loads(report.read_text())["usable"] == 3


def test_images_shared_with_validation_test_or_a_judge_are_refused_by_name(tmp_path) -> None:
    manifest = _run_manifest(tmp_path)
    site = tmp_path / "site"
    write_image(site / "own.jpeg", 9100)
    val_image = Path(manifest[manifest["split"] == "val"]["path"].iloc[0])
    (site / "from-val.jpeg").write_bytes(val_image.read_bytes())
    with pytest.raises(InputError) as err:
        scan_unlabeled(site, manifest, {}, workers=1)
    text = str(err.value)
    assert "--unlabeled" in text and "the validation split" in text and str(val_image) in text
    (site / "from-val.jpeg").unlink()
    # A copy of an external set's image: refused, naming that set.
    ext = tmp_path / "ext" / "NORMAL" / "e.jpeg"
    write_image(ext, 9200)
    (site / "from-ext.jpeg").write_bytes(ext.read_bytes())
    from cxr_core.data.manifest import scan_images

    judge = scan_images(tmp_path / "ext", workers=1).manifest
    with pytest.raises(InputError, match="external set 'site-b'"):
        scan_unlabeled(site, manifest, {"external set 'site-b'": judge}, workers=1)
    # A copy of a training image is no leak: reported, not refused.
    (site / "from-ext.jpeg").unlink()
    train_image = Path(manifest[manifest["split"] == "train"]["path"].iloc[0])
    (site / "from-train.jpeg").write_bytes(train_image.read_bytes())
    scan = scan_unlabeled(site, manifest, {"external set 'site-b'": judge}, workers=1)
    assert scan.report["shared_with_train"] == 1 and len(scan.paths) == 2


def test_a_missing_or_imageless_folder_is_an_input_error(tmp_path) -> None:
    manifest = _run_manifest(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        check_unlabeled_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert check_unlabeled_folder(empty) == str(empty.resolve())
    with pytest.raises(InputError, match=r"--unlabeled .*empty: no readable image .*0 image file"):
        scan_unlabeled(empty, manifest, {}, workers=1)
