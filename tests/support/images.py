"""Tiny image writers and file-tree digests for tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


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


def chest_like(lung_bottom: float = 0.75, seed: int = 0, size: int = 224) -> np.ndarray:
    """A square uint8 'X-ray': dark air outside the body, soft tissue, two dark lung fields
    from 20% of the height down to ``lung_bottom``, bright abdomen below, a little noise."""
    S = size
    rng = np.random.default_rng(seed)
    img = np.full((S, S), 20.0)
    img[:, int(0.06 * S):int(0.94 * S)] = 150  # the body
    yy, xx = np.mgrid[0:S, 0:S] / S
    top, bottom = 0.2, lung_bottom
    cy, ry = (top + bottom) / 2, (bottom - top) / 2
    for cx in (0.32, 0.68):
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / 0.14) ** 2 <= 1] = 60
    img[int(bottom * S) + 3:, int(0.06 * S):int(0.94 * S)] = 190  # abdomen under the domes
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def with_text(img: np.ndarray, text: str, xy: tuple[int, int], level: int = 240,
              size: int = 14) -> np.ndarray:
    """``img`` with ``text`` burned in (as a scanner writes markers), top-left at ``xy``."""
    from PIL import ImageDraw, ImageFont

    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text(xy, text, fill=level, font=ImageFont.load_default(size=size))
    return np.asarray(pil)
