"""DICOM input: real files written with pydicom, read by every stage the same way; header
checks; patient ids that leave only as salted hashes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_core.config import DataConfig, ValidationConfig
from cxr_core.data import dicom
from cxr_core.data.balance import load_gray
from cxr_core.data.manifest import inspect_image, scan_dataset, write_manifest
from cxr_core.data.synth import _plan, synthesize_dataset
from cxr_core.data.synth_dicom import VARIANTS, file_name, planted_identifiers
from cxr_core.data.validate import validate_dataset
from support.dicom import gradient, stored_dicom, write_dicom
from support.images import tree_digest

DATA = DataConfig(min_val_images=0)
VALID = ValidationConfig(min_width=16, min_height=16, min_images_per_class=2)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own state home (where the pseudonym salt is created)."""
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    return tmp_path / "home"


def _tf_pixels(paths: list[Path], size: int) -> np.ndarray:
    from cxr_core.data.inputs import load_images

    return load_images([str(p) for p in paths], size)


def test_every_variant_decodes_to_its_pixels_in_every_reader(tmp_path: Path) -> None:
    pixels = gradient()
    files = [write_dicom(tmp_path / file_name(i), pixels, index=i) for i in range(len(VARIANTS))]
    assert files[5].suffix == ""  # the extensionless variant, found by its preamble
    png = tmp_path / "same.png"
    Image.fromarray(pixels).save(png)
    for f in files:
        assert np.array_equal(dicom.read_gray(f), pixels), f.name   # pydicom path
        assert np.array_equal(load_gray(f), pixels), f.name         # balancing (Pillow side)
    tf = _tf_pixels([*files, png], 32)                               # the tf.data pipeline
    for i in range(len(files)):
        assert np.array_equal(tf[i], tf[-1]), VARIANTS[i]
    ts = {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in files}
    assert pydicom.uid.RLELossless in ts


def test_window_centre_and_width_clip_and_scale(tmp_path: Path) -> None:
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    f = stored_dicom(tmp_path / "w.dcm", ramp, 12, WindowCenter=1000, WindowWidth=501)
    # DICOM LINEAR window: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1].
    expected = np.clip((ramp - 999.5) / 500 + 0.5, 0, 1)
    assert np.array_equal(dicom.read_gray(f), np.rint(expected * 255).astype(np.uint8))
    out = dicom.read_gray(f)
    assert out[0, 0] == 0 and out[-1, -1] == 255 and 0 < out.ravel()[1000] < 255


def test_monochrome1_is_inverted_and_no_window_uses_the_value_range(tmp_path: Path) -> None:
    x = gradient()
    mono1 = stored_dicom(tmp_path / "m1.dcm", x, 8, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(dicom.read_gray(mono1), 255 - x)
    # 12 bits in a 16-bit container with values 1000-3000 and no window: the value range
    # maps onto 0-255 (the nominal 0-65535 would give an almost black image).
    stored = (1000 + x.astype(np.int64) * 2000 // 255).astype(np.uint16)
    deep = stored_dicom(tmp_path / "deep.dcm", stored, 16)
    out = dicom.read_gray(deep)
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out.astype(int) - x.astype(int)).max() <= 1


def test_jpeg2000_compressed_pixels_decode_losslessly(tmp_path: Path) -> None:
    pixels = gradient()
    f = write_dicom(tmp_path / "j2k.dcm", pixels, index=0)
    ds = pydicom.dcmread(f)
    ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(f, enforce_file_format=True)
    assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert np.array_equal(dicom.read_gray(f), pixels)
    assert np.array_equal(_tf_pixels([f], 24)[0], _tf_pixels([f], 24)[0])
    assert inspect_image(str(f))["readable"]


def _undecodable(path: Path) -> Path:
    """A file whose pixel data is MPEG-2 video: no installed plugin decodes it."""
    from pydicom.encaps import encapsulate

    f = write_dicom(path, gradient(), index=0)
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really video"])
    ds["PixelData"].VR = "OB"
    ds.save_as(f, enforce_file_format=True)
    return f


def test_undecodable_or_broken_dicom_is_a_per_file_error(tmp_path: Path) -> None:
    video = _undecodable(tmp_path / "video.dcm")
    row = inspect_image(str(video))
    assert not row["readable"] and row["format"] == "DICOM"
    assert "MPEG2" in row["error"] and pydicom.uid.MPEG2MPML in row["error"]
    with pytest.raises(dicom.DicomDecodeError, match=r"video\.dcm: cannot decode DICOM pixel"):
        dicom.read_gray(video)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file at all\n" * 20)
    assert "pixel data" in inspect_image(str(text))["error"]
    truncated = tmp_path / "cut.dcm"
    good = write_dicom(tmp_path / "good.dcm", gradient()).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    assert not inspect_image(str(truncated))["readable"]
    # The training/prediction pipeline drops (and predict names) such files, never crashes.
    from cxr_core.lifecycle.predict import LoadedModel, predict_paths
    from cxr_core.training.model import build_cnn

    loaded = LoadedModel(build_cnn(24, blocks=1, base_filters=4, dense_units=0), 0.5, 24, "t")
    preds, errors = predict_paths(loaded, [str(good_path := tmp_path / "good.dcm"), str(video),
                                           str(truncated)], workers=1)
    assert list(preds["path"]) == [str(good_path)]
    assert set(errors["path"]) == {str(video), str(truncated)}
    assert "MPEG2" in errors.set_index("path").loc[str(video), "error"]


def test_scan_finds_extensionless_dicom_and_skips_other_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_dicom(root / "train" / "NORMAL" / "1.2.840.99.1", gradient(), index=0)  # UID name
    write_dicom(root / "train" / "NORMAL" / "nodotname", gradient(), index=1)
    (root / "train" / "NORMAL" / "README").write_text("not an image")
    write_dicom(root / "train" / "PNEUMONIA" / "x.dcm", gradient(), index=2, patient=2)
    scan = scan_dataset(root, workers=1)
    m = scan.manifest.set_index("relpath")
    assert set(m.index) == {"train/NORMAL/1.2.840.99.1", "train/NORMAL/nodotname",
                            "train/PNEUMONIA/x.dcm"}
    assert (m["format"] == "DICOM").all() and m["readable"].all()
    assert [Path(p).name for p, _ in scan.skipped] == ["README"]
    assert m.loc["train/PNEUMONIA/x.dcm", "dicom_bits_stored"] == 16
    assert m.loc["train/NORMAL/nodotname", "dicom_transfer_syntax"] == pydicom.uid.ExplicitVRLittleEndian


def test_patient_ids_are_salted_hashes_and_no_identifier_reaches_the_manifest(
        tmp_path: Path, _home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthesize_dataset(tmp_path / "syn", n_per_class=12, size=32, seed=5, fmt="dicom").root
    m = scan_dataset(data, workers=1).manifest
    plan = {file_name(p.index): p for p in _plan(12, 5, (0.7, 0.15, 0.15))}
    m["planted"] = [plan[Path(r).name].patient for r in m["relpath"]]
    assert m["patient_id"].str.fullmatch(r"pid-[0-9a-f]{20}").all()
    # One pseudonym per planted patient and one patient per pseudonym.
    assert (m.groupby("planted")["patient_id"].nunique() == 1).all()
    assert (m.groupby("patient_id")["planted"].nunique() == 1).all()
    salt_file = _home / dicom.SALT_FILE
    assert stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    # The manifest, as written, holds none of the planted identifying values.
    write_manifest(m, tmp_path / "m.csv")
    write_manifest(m, tmp_path / "m.parquet")
    blobs = (tmp_path / "m.csv").read_bytes() + (tmp_path / "m.parquet").read_bytes()
    planted = {v for p in plan.values() for v in planted_identifiers(5, p.patient, p.index).values()}
    assert len(planted) > 20 and not [v for v in planted if v.encode() in blobs]
    # Same home, same pseudonyms; a configured salt gives others.
    assert scan_dataset(data, workers=1).manifest["patient_id"].tolist() == m["patient_id"].tolist()
    monkeypatch.setenv(dicom.SALT_ENV, "another-salt-from-a-secret-store")
    other = scan_dataset(data, workers=1).manifest["patient_id"]
    assert not set(other) & set(m["patient_id"])


def test_header_checks_name_each_file_with_its_severity(tmp_path: Path) -> None:
    root = synthesize_dataset(tmp_path / "syn", n_per_class=14, size=32, seed=1, fmt="dicom").root
    _, report = validate_dataset(root, DATA, VALID, seed=0, report_dir=tmp_path / "ok")
    assert report.passed, report.summary_text()
    names = {c.name: c for c in report.checks}
    assert all(names[n].success for n in ("dicom_modality", "dicom_body_part",
                                          "dicom_view_position", "dicom_photometric",
                                          "dicom_pixel_spacing"))
    files = sorted((root / "train" / "NORMAL").iterdir())
    edits = {files[0]: {"Modality": "CT"}, files[1]: {"ViewPosition": "LL"},
             files[2]: {"BodyPartExamined": None}, files[3]: {"PixelSpacing": None}}
    for f, header in edits.items():
        ds = pydicom.dcmread(f)
        for key, value in header.items():
            setattr(ds, key, value) if value else delattr(ds, key)
        ds.save_as(f, enforce_file_format=True)
    _, report = validate_dataset(root, DATA, VALID, seed=0, report_dir=tmp_path / "bad")
    by = {c.name: c for c in report.checks}
    assert not report.passed and [c.name for c in report.errors] == ["dicom_modality"]
    assert by["dicom_modality"].offending == [str(files[0])]
    assert "CT: 1" in by["dicom_modality"].observed
    assert by["dicom_view_position"].severity == "warning"
    assert by["dicom_view_position"].offending == [str(files[1])] and "LL: 1" in by[
        "dicom_view_position"].observed
    assert by["dicom_body_part"].offending == [str(files[2])]
    assert "(missing): 1" in by["dicom_body_part"].observed
    assert by["dicom_pixel_spacing"].offending == [str(files[3])]
    text = report.summary_text()
    assert "[ERROR] dicom_modality" in text and "[WARN ] dicom_view_position" in text


def test_jpeg_data_sets_keep_their_manifest_and_checks(good_dataset: Path) -> None:
    from cxr_core.data.manifest import MANIFEST_COLUMNS, SHORTCUT_SCORE_COLUMNS

    scan, report = validate_dataset(good_dataset, DATA, VALID, seed=0)
    assert list(scan.manifest.columns) == MANIFEST_COLUMNS + SHORTCUT_SCORE_COLUMNS
    assert not [c for c in report.checks if c.name.startswith("dicom_")]


def test_cli_synth_dicom_same_seed_same_bytes_then_validates(tmp_path: Path) -> None:
    from flows.cli import app

    runner = CliRunner()
    args = ["--n-per-class", "30", "--size", "32", "--seed", "3", "--format", "dicom"]
    for out in ("a", "b"):
        res = runner.invoke(app, ["data", "synth", str(tmp_path / out), *args])
        assert res.exit_code == 0, res.output
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    files = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    assert len(files) == 60 and any(p.suffix == "" for p in files)
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "a"), "--profile", "quick",
                              "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    manifest = pd.read_parquet(tmp_path / "r" / "manifest.parquet")
    assert (manifest["format"] == "DICOM").all() and manifest["patient_id"].str.startswith("pid-").all()
    res = runner.invoke(app, ["data", "synth", str(tmp_path / "c"), "--format", "tiff"])
    assert res.exit_code == 2 and "format" in res.output
