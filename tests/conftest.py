"""Shared fixtures: tiny image writers and the malformed-input corpus."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA_ENV = "CXR_REAL_DATA"


def write_image(path: Path, seed: int, size: int = 64, mode: str = "L", fmt: str = "JPEG") -> Path:
    """Write a small random image (distinct bytes per seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, (size, size), dtype=np.uint16)
        Image.fromarray(arr).save(path, format=fmt)
        return path
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size, size, channels), dtype=np.uint8).squeeze()
    Image.fromarray(arr, mode=mode).save(path, format=fmt)
    return path


def spread_outputs(model, x: np.ndarray, std: float = 2.0) -> None:
    """Set the output layer so the logits on ``x`` have mean 0 and the given spread.

    Random init gives near-0.5 (or, scaled up, saturated) outputs depending on the draw; a
    fixed spread makes tests of output transforms independent of the initializer's seed.
    """
    import keras

    head = model.get_layer("pneumonia")
    features = keras.Model(model.inputs, head.input).predict(x, verbose=0)
    kernel = np.random.default_rng(0).normal(size=(features.shape[1], 1))
    z = features @ kernel
    scale = std / max(float(z.std()), 1e-6)
    head.set_weights([(kernel * scale).astype("float32"),
                      np.array([-float(z.mean()) * scale], dtype="float32")])


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove nothing was changed or lost)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_good_dataset(root: Path, n_patients: int = 8, imgs: int = 2, seed0: int = 0) -> Path:
    """A small valid data set: train/val/test x NORMAL/PNEUMONIA with patient-style names."""
    seed = seed0
    for split_i, split in enumerate(["train", "val", "test"]):
        for p in range(n_patients):
            pid = split_i * 1000 + p + 1
            for k in range(imgs):
                seed += 1
                write_image(root / split / "NORMAL" / f"IM-{pid:04d}-{k + 1:04d}.jpeg", seed)
                seed += 1
                write_image(root / split / "PNEUMONIA" / f"person{pid}_bacteria_{seed}.jpeg", seed)
    return root


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
