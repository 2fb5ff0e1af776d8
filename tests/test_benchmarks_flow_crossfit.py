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
        halves = bench.write_halves(site, tmp_path / "work")
        again = bench.write_halves(site, tmp_path / "work")  # written once, reused
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert halves == again and len(halves) == 2

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
