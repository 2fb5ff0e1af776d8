"""benchmarks/flow_crossfit.py: the site set's patient halves, as folders the flow accepts.
(The flow runs themselves take minutes each: they are measured, not tested, here; the flow
with --unlabeled and --external is tested in tests/flows.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from cxr_core.data.manifest import scan_dataset
from cxr_core.data.synth import synthesize_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports _common and external
    try:
        spec = importlib.util.spec_from_file_location("bench_flow_crossfit",
                                                      BENCHMARKS / "flow_crossfit.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_halves_are_linked_folders_split_by_patient(tmp_path: Path) -> None:
    site = tmp_path / "site"
    synthesize_dataset(site, n_per_class=20, size=32, seed=1, split_fractions=(0.0, 0.0, 1.0))
    # An identical copy under another patient's name: it must land beside its twin.
    first = sorted((site / "test" / "NORMAL").glob("*.jpeg"))[0]
    twin = first.with_name("twin-" + first.name)
    twin.write_bytes(first.read_bytes())
    originals = {p.resolve() for p in site.rglob("*.jpeg")}
    bench = _load_script()
    sys.path.insert(0, str(BENCHMARKS))
    try:
        halves, parts = bench.write_halves(site, tmp_path / "work")
        again = bench.write_halves(site, tmp_path / "work")  # written once, reused
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert (halves, parts) == again and len(halves) == 2

    scans = [scan_dataset(h).manifest for h in halves]  # a layout the scanner accepts
    links = [sorted(h.rglob("*.jpeg")) for h in halves]
    assert all(p.is_symlink() for half in links for p in half)  # nothing copied
    targets = [{p.resolve() for p in half} for half in links]
    assert not targets[0] & targets[1] and targets[0] | targets[1] == originals
    for scan in scans:
        assert set(scan["label"]) == {"NORMAL", "PNEUMONIA"}
        assert scan["readable"].all()
    patients = [set(scan["patient_id"]) for scan in scans]
    assert all(len(p) > 1 for p in patients) and not patients[0] & patients[1]
    assert not set(scans[0]["sha256"]) & set(scans[1]["sha256"])
    assert sum(twin.resolve() in t or first.resolve() in t for t in targets) == 1
    # Each link keeps its label folder: the label is the original's.
    for half in links:
        for p in half:
            assert p.parent.name == p.resolve().parent.name

    # Each half's two parts (a calibration sample and its scored images) split it again
    # by patient, both classes in each, nothing shared.
    for half, (a, b) in zip(halves, parts):
        in_half = {p.resolve() for p in half.rglob("*.jpeg")}
        in_parts = [{p.resolve() for p in part.rglob("*.jpeg")} for part in (a, b)]
        assert not in_parts[0] & in_parts[1] and in_parts[0] | in_parts[1] == in_half
        part_scans = [scan_dataset(part).manifest for part in (a, b)]
        assert all(set(s["label"]) == {"NORMAL", "PNEUMONIA"} for s in part_scans)
        assert not set(part_scans[0]["patient_id"]) & set(part_scans[1]["patient_id"])


def test_site_thresholds_come_from_the_flow_and_the_swapped_part(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    bench = _load_script()
    parts = [tmp_path / "half1-part0", tmp_path / "half1-part1"]
    rows = []
    rng = np.random.default_rng(0)
    for j, part in enumerate(parts):
        for label in ("NORMAL", "PNEUMONIA"):
            (part / label).mkdir(parents=True)
            for i in range(10):
                name = f"p{j}-{label}-{i}.jpeg"
                (part / label / name).write_bytes(b"")
                # Part 1 scores higher overall: its own threshold must differ from part 0's.
                prob = rng.uniform(0.4, 1.0) if label == "PNEUMONIA" else rng.uniform(0.0, 0.6)
                rows.append({"path": f"/site/half1/{label}/{name}", "patient_id": name,
                             "label": int(label == "PNEUMONIA"),
                             "probability": min(prob + 0.3 * j, 1.0)})
    preds = pd.DataFrame(rows)
    fold = {"site_threshold": {"threshold": 0.55}}
    sys.path.insert(0, str(BENCHMARKS))
    try:
        scored, info = bench.site_calibrated_parts(fold, preds, parts, 0.9)
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert info["calibration_images"] == [20, 20]
    assert info["flow_site_threshold"] == 0.55
    # The swap's threshold meets the recall target on part 1's own positives.
    part1 = preds[preds["path"].str.contains("/p1-")]
    t = info["swapped_site_threshold"]
    positives = part1[part1["label"] == 1]["probability"]
    assert (positives >= t).mean() >= 0.9 and t != info["recomputed_site_threshold"]
    # Part 1 is scored at the flow's threshold and part 0 at the swapped one (each aligned
    # so that its threshold lands on 0.5).
    first, second = scored
    part0 = preds[preds["path"].str.contains("/p0-")]
    assert set(first["path"]) == set(part1["path"])
    assert set(second["path"]) == set(part0["path"])
    decided = first.merge(part1, on="path", suffixes=("", "_raw"))
    assert ((decided["probability"] >= 0.5) == (decided["probability_raw"] >= 0.55)).all()
    decided = second.merge(part0, on="path", suffixes=("", "_raw"))
    assert ((decided["probability"] >= 0.5) == (decided["probability_raw"] >= t)).all()


def test_results_name_the_processor_family_and_model(tmp_path: Path) -> None:
    """Rows from different hosts behind one VM name ("AMD EPYC") must be told apart."""
    import json

    _load_script()  # imports _common, the stamp every benchmark writes
    common = sys.modules["_common"]
    out = tmp_path / "r.json"
    common.write_results(out, "probe", {"x": 1}, ["--seed", "1"])
    stamped = json.loads(out.read_text())
    assert stamped["x"] == 1 and stamped["command"].endswith("--seed 1")
    # Read /proc/cpuinfo here independently of the parser under test, so a parser that
    # found nothing would fail rather than skip the check.
    import re

    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    family = re.search(r"^cpu family\s*:\s*(\S+)", text, re.MULTILINE)
    model = re.search(r"^model\s*:\s*(\S+)", text, re.MULTILINE)
    if family and model:  # Linux on x86
        assert f"(family {family[1]}, model {model[1]})" in stamped["machine"]
