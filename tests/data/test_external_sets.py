"""External sets and the calibration sample: where they come from (config and --external),
what is refused before anything runs, and what the scan reports (excluded files, images and
patients shared with the run's data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_core.config import load_config
from cxr_core.data.external import (
    check_calibration_disjoint,
    check_calibration_folder,
    parse_external_options,
    resolve_external_sets,
    scan_external_set,
    write_scan,
)
from cxr_core.data.splits import scan_and_split
from cxr_core.errors import ConfigError, InputError
from support.images import make_good_dataset, write_image


def _cfg(tmp_path: Path, text: str):
    f = tmp_path / "cfg.yaml"
    f.write_text(text)
    return load_config(f, "quick")


def _external(root: Path, n: int = 3, seed0: int = 5000, split: str | None = "test") -> Path:
    """A small labelled set: NORMAL and PNEUMONIA images, under ``split/`` or directly."""
    base = root / split if split else root
    for i in range(n):
        write_image(base / "NORMAL" / f"ext-n{i}.jpeg", seed0 + i)
        write_image(base / "PNEUMONIA" / f"ext-p{i}.jpeg", seed0 + 100 + i)
    return root


@pytest.mark.parametrize("values, match", [
    (["site-b"], "expected NAME=DIR"),
    (["site-b="], "expected NAME=DIR"),
    (["Site_B=/x"], "lowercase"),
    (["a b=/x"], "lowercase"),
    (["b=/x", "b=/y"], "given twice"),
])
def test_malformed_external_options_are_input_errors_naming_the_option(values, match) -> None:
    with pytest.raises(InputError, match=match) as err:
        parse_external_options(values)
    assert "--external" in str(err.value)


def test_config_and_command_line_sets_merge_the_command_line_winning(tmp_path) -> None:
    a, b, c = (_external(tmp_path / n) for n in ("a", "b", "c"))
    cfg = _cfg(tmp_path, f"data:\n  external:\n    - {{name: site-a, path: {a}}}\n"
                         f"    - {{name: site-b, path: {b}}}\n")
    assert [s.name for s in cfg.data.external] == ["site-a", "site-b"]
    sets = resolve_external_sets(cfg, parse_external_options([f"site-b={c}", f"new_1={c}/test"]))
    assert sets == {"new_1": str((c / "test").resolve()), "site-a": str(a.resolve()),
                    "site-b": str(c.resolve())}


def test_missing_folders_bad_layouts_and_gates_on_unknown_sets_are_refused(tmp_path) -> None:
    good = _external(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _cfg(tmp_path, "gates: {external: {site-x: {min_accuracy: 0.8}}}\n")
    with pytest.raises(InputError, match="'site-x', not an external set of this run"):
        resolve_external_sets(cfg, {"site-b": str(good)})
    assert resolve_external_sets(cfg, {"site-x": str(good)}) == {"site-x": str(good.resolve())}
    with pytest.raises(InputError, match=f"external set 'b': {tmp_path / 'nope'} is not a folder"):
        resolve_external_sets(load_config(), {"b": str(tmp_path / "nope")})
    with pytest.raises(InputError, match="external set 'b': .*no train/"):
        resolve_external_sets(load_config(), {"b": str(empty)})
    with pytest.raises(InputError, match="--calibration: .* is not a folder"):
        check_calibration_folder(tmp_path / "nope")


@pytest.mark.parametrize("text, match", [
    ("data: {external: [{name: Site, path: /x}]}\n", "name"),
    ("data: {external: [{name: a, path: /x}, {name: a, path: /y}]}\n", "given twice"),
    ("gates: {external: {a: {min_acuracy: 0.9}}}\n", "min_acuracy"),
    ("gates: {external: {a: {min_recall: 1.5}}}\n", "min_recall"),
])
def test_bad_external_config_is_a_config_error(tmp_path, text, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, text)


def _run_manifest(tmp_path: Path):
    data = make_good_dataset(tmp_path / "run-data", n_patients=4, imgs=1)
    return data, scan_and_split(data, load_config(profile="quick").data, 0).manifest


def test_scan_names_excluded_files_and_reports_what_the_run_shares(tmp_path) -> None:
    data, manifest = _run_manifest(tmp_path)
    ext = _external(tmp_path / "ext", split=None)  # NORMAL/ and PNEUMONIA/ directly
    (ext / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    write_image(ext / "OTHER" / "what.jpeg", 1)
    copied = next((data / "train" / "PNEUMONIA").iterdir())
    (ext / "PNEUMONIA" / copied.name).write_bytes(copied.read_bytes())  # same bytes, same patient
    scan = scan_external_set("site-b", ext, manifest, workers=1)
    report = scan.report
    assert report["scored"] == 7 and report["classes"] == {"NORMAL": 3, "PNEUMONIA": 4}
    assert len(scan.usable) == 7 and set(scan.usable["split"]) == {"external"}
    excluded = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert excluded.keys() == {"broken.jpeg", "what.jpeg"}
    assert excluded["broken.jpeg"].startswith("unreadable") and "no label" in excluded["what.jpeg"]
    assert report["shared_files"]["count"] == 1 and report["shared_files"]["by_split"]
    assert copied.name in report["shared_files"]["examples"][0]
    assert report["shared_patients"]["count"] == 1
    findings = "\n".join(scan.findings())
    assert "broken.jpeg" in findings and "identical (sha256)" in findings
    saved = json.loads(Path(write_scan(scan, tmp_path / "out")).read_text())
    assert saved["shared_files"]["count"] == 1 and (tmp_path / "out" / "manifest.parquet").is_file()


def test_a_set_without_both_classes_is_refused_naming_it(tmp_path) -> None:
    _, manifest = _run_manifest(tmp_path)
    one = tmp_path / "one"
    for i in range(3):
        write_image(one / "test" / "NORMAL" / f"n{i}.jpeg", 7000 + i)
    (one / "test" / "PNEUMONIA").mkdir(parents=True)
    (one / "test" / "PNEUMONIA" / "bad.jpeg").write_bytes(b"")  # unreadable: nothing to score
    with pytest.raises(InputError, match=r"external set 'site-c' .*NORMAL 3, PNEUMONIA 0"):
        scan_external_set("site-c", one, manifest, workers=1)


def test_calibration_must_share_no_image_with_an_evaluation_set(tmp_path) -> None:
    data, manifest = _run_manifest(tmp_path)
    ext = _external(tmp_path / "ext", seed0=100)
    cal_root = _external(tmp_path / "cal", seed0=1000)
    ext_scan = scan_external_set("site-b", ext, manifest, workers=1)
    clean = scan_external_set("calibration", cal_root, manifest, workers=1)
    check_calibration_disjoint(clean, {"site-b": ext_scan}, manifest)  # nothing shared: passes
    shared = ext / "test" / "NORMAL" / "ext-n0.jpeg"
    (cal_root / "test" / "NORMAL" / "copy.jpeg").write_bytes(shared.read_bytes())
    test_image = Path(manifest[manifest["split"] == "test"]["path"].iloc[0])
    (cal_root / "test" / "NORMAL" / "from-test.jpeg").write_bytes(test_image.read_bytes())
    cal = scan_external_set("calibration", cal_root, manifest, workers=1)
    with pytest.raises(InputError) as err:
        check_calibration_disjoint(cal, {"site-b": ext_scan}, manifest)
    text = str(err.value)
    assert "--calibration" in text and "external set 'site-b'" in text and "the test split" in text
    assert str(shared) in text and str(test_image) in text


def test_the_external_scan_audits_shortcut_scores_and_names_a_strong_cue(tmp_path) -> None:
    """Text burned into the top corners of only the PNEUMONIA images of a site: the scan's
    audit finds the cue there too (a model that learned it would look better than it is)."""
    from PIL import Image

    from support.images import chest_like, with_text

    _, manifest = _run_manifest(tmp_path)
    site = tmp_path / "site-t"
    for i in range(8):
        for label, text in (("NORMAL", None), ("PNEUMONIA", "R PORTABLE")):
            img = chest_like(lung_bottom=0.7, seed=i + (50 if text else 0))
            if text:
                img = with_text(img, text, (4, 4))
            (site / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(site / label / f"{label.lower()}-{i}.png")
    scan = scan_external_set("site-t", site, manifest, workers=1, warn_auc=0.75)
    top = next(r for r in scan.report["shortcut_scores"] if r["score"] == "annotation_top_px")
    assert top["split"] == "external" and top["auc"] >= 0.9 and top["higher_in"] == "PNEUMONIA"
    assert any("annotation_top_px alone separates" in line for line in scan.findings())
    clean = scan_external_set("site-b", _external(tmp_path / "ext", n=6), manifest, workers=1)
    assert not any("alone separates" in line for line in clean.findings())
