"""Shared fixtures: small data sets, the malformed-input corpus and the real-data path.

Helpers that tests import directly live in ``tests/support/`` (``support.images``,
``support.servers``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.images import make_good_dataset, write_image

REAL_DATA_ENV = "CXR_REAL_DATA"

# The longest test files, longest first (serial seconds on 2 cores, 2026-12-07: 417, 306,
# 173, 95, 92, 79, 71). Under `make test` files run in parallel, each whole on one worker:
# starting the longest first keeps one long file from running alone at the end. Files not
# listed follow in collection order; a single-process run keeps collection order.
LONGEST_FILES = ("flows/test_flows.py", "flows/test_rehearsal.py",
                 "training/test_search_and_fit.py", "flows/test_dicom_run.py",
                 "flows/test_stack.py", "lifecycle/test_live_tracking.py",
                 "lifecycle/test_champion_comparison.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not a pytest-xdist worker
        return

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture
def good_dataset(tmp_path: Path) -> Path:
    return make_good_dataset(tmp_path / "good")


@pytest.fixture
def malformed_corpus(tmp_path: Path) -> dict[str, Path]:
    """Every kind of bad input the scanner and validator must report precisely."""
    root = make_good_dataset(tmp_path / "bad")
    n = root / "train" / "NORMAL"
    bad: dict[str, Path] = {"root": root}
    good = write_image(n / "IM-0500-0001.jpeg", 500)
    bad["truncated"] = n / "IM-0501-0001.jpeg"
    bad["truncated"].write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bad["zero_byte"] = n / "IM-0502-0001.jpeg"
    bad["zero_byte"].write_bytes(b"")
    bad["text"] = n / "IM-0503-0001.jpeg"
    bad["text"].write_text("this is not an X-ray\n")
    bad["png_as_jpeg"] = write_image(n / "IM-0504-0001.jpeg", 504, fmt="PNG")
    bad["rgba"] = write_image(n / "IM-0505-0001.png", 505, mode="RGBA", fmt="PNG")
    bad["png16"] = write_image(n / "IM-0506-0001.png", 506, mode="I;16", fmt="PNG")
    bad["tiny"] = write_image(n / "IM-0507-0001.jpeg", 507, size=8)
    bad["ds_store"] = n / ".DS_Store"
    bad["ds_store"].write_bytes(b"\x00\x00\x00\x01Bud1")
    # The same bytes in train and test: leakage.
    leak = write_image(root / "train" / "PNEUMONIA" / "person900_virus_1.jpeg", 900)
    bad["leak_train"] = leak
    bad["leak_test"] = root / "test" / "PNEUMONIA" / "person901_virus_2.jpeg"
    bad["leak_test"].write_bytes(leak.read_bytes())
    # One patient in train and val (different images).
    bad["patient_train"] = write_image(root / "train" / "PNEUMONIA" / "person777_bacteria_1.jpeg", 7771)
    bad["patient_val"] = write_image(root / "val" / "PNEUMONIA" / "person777_bacteria_2.jpeg", 7772)
    # An empty class folder and an unknown class folder.
    # An empty class folder (the test built these files itself) and an unknown class folder.
    for f in (root / "val" / "NORMAL").iterdir():
        f.unlink()
    bad["empty_dir"] = root / "val" / "NORMAL"
    bad["unknown_dir"] = root / "train" / "COVID"
    bad["unknown_file"] = write_image(bad["unknown_dir"] / "covid_1.jpeg", 1234)
    return bad


@pytest.fixture
def real_data() -> Path:
    value = os.environ.get(REAL_DATA_ENV)
    if not value or not Path(value).is_dir():
        pytest.skip(f"{REAL_DATA_ENV} is not set to a folder of real chest X-rays")
    return Path(value)
