"""Class balancing: augmented minority-class variants written to disk, reproducibly.

The train split is about 74% PNEUMONIA. The ``offline`` strategy writes augmented variants of
minority-class train images (with a lineage table saying which source and which transform made
each file), so the balanced training set is a fixed artefact that can be hashed and audited;
``class_weight`` re-weights the loss instead. Augmented images come only from train and go
only to train: a variant of a val/test image in train would leak it into the model.

Written variants are training images like any other, so during training they also pass
through the model's random augmentation layers (``cxr_core.training.model.augmentation_layers``)
and the input pipeline's photometric changes, every epoch. That is intended: the offline
variant balances the class counts with a fixed, audited file, and the online draw keeps each
epoch's copy of it different rather than an identical duplicate. The effective transform of
a variant is therefore its lineage parameters followed by a fresh random one (bounded by
the same config), which the lineage table records in its ``also_online_augmented`` column.

Light on purpose (numpy, scipy, Pillow, pandas): no TensorFlow import here.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cxr_core.config import AugmentConfig, ExperimentConfig
from cxr_core.data.inputs import split_data
from cxr_core.data.labels import AUGMENTED_ORIGIN, LABELS
from cxr_core.data.manifest import MANIFEST_COLUMNS, _inspect_all
from cxr_core.data.parallel import pool_context

AUG_SUFFIX = "__aug"             # output name: <source stem>__aug<variant_index>.png


@dataclass(frozen=True)
class AugmentParams:
    """One variant's transform. The identity is rotation 0, zoom 1, shifts 0, brightness 0,
    contrast 1, gamma 1, no flip (see :meth:`identity`)."""

    rotation_deg: float   # counter-clockwise as displayed, about the image centre
    zoom: float           # scale factor; > 1 magnifies
    shift_x: float        # fraction of the width; > 0 moves the content right
    shift_y: float        # fraction of the height; > 0 moves the content down
    brightness: float     # added, as a fraction of the full 0-255 range
    contrast: float       # factor applied around the image mean
    gamma: float          # exponent on 0-1 intensities (< 1 brightens mid-tones)
    hflip: bool           # mirror left-right (only when the config allows it)

    @classmethod
    def identity(cls) -> AugmentParams:
        """Parameters that leave an image unchanged."""
        return cls(0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, False)

    def as_dict(self) -> dict[str, float | bool]:
        """Field name -> value (plain Python floats and bool, e.g. for a lineage table)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AugmentParams))
LINEAGE_COLUMNS: list[str] = [
    "path", "source_path", "label", "patient_id", "split", "seed", "variant_index", *PARAM_FIELDS,
    # True: in training the file also goes through the online random augmentation (see above)
    "also_online_augmented",
]


def plan_balance(class_counts: Mapping[str, int], target_ratio: float = 1.0) -> dict[str, int]:
    """How many augmented images to add per class so every class reaches
    ``ceil(target_ratio * majority_count)``; classes already there get 0.

    Raises ValueError for an empty mapping, a ratio outside (0, 1], a negative or
    non-integer count, or a class with no images that would need augmenting (it names the class).
    """
    if not class_counts:
        raise ValueError("no classes to balance (empty class counts)")
    if not (isinstance(target_ratio, (int, float)) and 0 < target_ratio <= 1):
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio!r}")
    counts: dict[str, int] = {}
    for label, n in class_counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer, float)) or int(n) != n:
            raise ValueError(f"class {label!r}: count must be a whole number, got {n!r}")
        if n < 0:
            raise ValueError(f"class {label!r}: negative image count ({n})")
        counts[label] = int(n)
    majority = max(counts.values())
    # round() before ceil(): 0.7 * 10 is 7.000000000000001 in floating point, which ceil
    # would turn into 8 images.
    target = math.ceil(round(target_ratio * majority, 9))
    plan: dict[str, int] = {}
    for label, n in counts.items():
        need = max(0, target - n)
        if need and n == 0:
            raise ValueError(
                f"class {label!r} has no images, so it cannot be balanced by augmentation "
                f"({need} needed to reach {target})")
        plan[label] = need
    return plan


def plan_variants(sources: Sequence[str], n_new: int) -> list[tuple[str, int]]:
    """Spread ``n_new`` variants over ``sources`` as evenly as possible.

    Each source gets floor or ceil of ``n_new / len(sources)``; sources are taken in sorted
    order and the extra variants go to the first ones. Returns ``(source_path, variant_index)``
    pairs grouped by source, variant indices counting from 0 per source.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if n_new == 0:
        return []
    ordered = sorted(str(s) for s in sources)
    if not ordered:
        raise ValueError(f"{n_new} variants requested but there are no source images")
    if len(set(ordered)) != len(ordered):
        # Duplicates would produce two files with the same name (one overwriting the other).
        raise ValueError("duplicate source paths")
    base, extra = divmod(n_new, len(ordered))
    return [(src, v) for i, src in enumerate(ordered) for v in range(base + (i < extra))]


def sample_params(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentParams:
    """Parameters drawn uniformly within the config's bounds; hflip only when
    ``cfg.horizontal_flip`` (then with probability 1/2)."""
    g_lo, g_hi = (float(g) for g in cfg.gamma_range)
    if not 0 < g_lo <= g_hi:
        raise ValueError(f"gamma_range must satisfy 0 < low <= high, got {cfg.gamma_range}")
    # Always draw all eight numbers in the same order, so changing one option (e.g. enabling
    # the flip) does not shift every other parameter of every variant.
    u = rng.random(8)

    def sym(k: int, bound: float) -> float:  # uniform in [-bound, bound]
        return float((2.0 * u[k] - 1.0) * bound)

    return AugmentParams(
        rotation_deg=sym(0, cfg.max_rotation_deg),
        zoom=1.0 + sym(1, cfg.max_zoom),
        shift_x=sym(2, cfg.max_shift),
        shift_y=sym(3, cfg.max_shift),
        brightness=sym(4, cfg.max_brightness),
        contrast=1.0 + sym(5, cfg.max_contrast),
        gamma=float(g_lo + (g_hi - g_lo) * u[6]),
        hflip=bool(cfg.horizontal_flip and u[7] < 0.5),
    )


def _affine(shape: tuple[int, int], params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Output -> input pixel mapping (matrix, offset) in (row, col) coordinates, the form
    ``scipy.ndimage.affine_transform`` takes."""
    h, w = shape
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    shift = np.array([params.shift_y * h, params.shift_x * w])
    theta = math.radians(params.rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    # Forward (input -> output): out = zoom * R @ (in - centre) + centre + shift, with R the
    # counter-clockwise rotation as displayed (rows grow downwards): R = [[c, -s], [s, c]].
    # scipy needs the inverse: in = R.T @ (out - centre - shift) / zoom + centre.
    matrix = np.array([[c, s], [-s, c]]) / params.zoom
    offset = centre - matrix @ (centre + shift)
    if params.hflip:
        # Mirror the source first: in_col -> (w - 1) - in_col. Only columns, never rows.
        flip = np.diag([1.0, -1.0])
        matrix = flip @ matrix
        offset = flip @ offset + np.array([0.0, w - 1.0])
    return matrix, offset


def augment_image(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """uint8 grayscale HxW -> augmented uint8 HxW of the same size.

    Geometry first (rotation about the centre, zoom, shift, optional horizontal flip; bilinear,
    with reflected borders so no black corners appear), then gamma, contrast around the mean,
    brightness; clipped to 0-255. There is no vertical flip: an upside-down chest is not a
    plausible X-ray.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxW grayscale image, got {img.dtype} {img.shape}")
    if params.zoom <= 0 or params.gamma <= 0:
        raise ValueError(f"zoom and gamma must be positive: {params}")
    matrix, offset = _affine(img.shape, params)
    warped = ndimage.affine_transform(
        img.astype(np.float64), matrix, offset=offset, output_shape=img.shape,
        order=1, mode="reflect")
    x = np.clip(warped / 255.0, 0.0, 1.0)
    if params.gamma != 1.0:
        x = np.power(x, params.gamma)
    mean = float(x.mean())
    x = (x - mean) * params.contrast + mean + params.brightness
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def load_gray(path: str | Path) -> np.ndarray:
    """Decode any image file to uint8 HxW grayscale, matching the training pipeline.

    16-bit images keep their top byte (value // 256, as TensorFlow's ``decode_image(dtype=
    uint8)`` does): Pillow's ``convert('L')`` would clip them at 255 into a white image.
    Colour and alpha images use Pillow's ITU-R 601 luma, alpha dropped. DICOM files go
    through :func:`cxr_core.data.dicom.read_gray` (VOI LUT/window, MONOCHROME1 inverted).
    """
    from cxr_core.data import dicom

    if dicom.is_dicom(path):
        return dicom.read_gray(path)
    with Image.open(path) as img:
        img.load()
        if img.mode == "L":
            return np.array(img, dtype=np.uint8)
        if img.mode.startswith("I;16") or img.mode == "I":
            # 'I' is how some Pillow versions load 16-bit PNGs; treat it as 16-bit too.
            arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
            return (arr >> 8).astype(np.uint8)
        if img.mode == "F":
            return np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        try:
            gray = img.convert("L")
        except ValueError:  # modes without a direct conversion (e.g. 'PA')
            gray = img.convert("RGB").convert("L")
        return np.array(gray, dtype=np.uint8)


def _write_variants(job: tuple[str, list[tuple[str, AugmentParams]]]) -> int:
    """Decode one source once and write each of its variants (a process-pool task)."""
    source, outputs = job
    image = load_gray(source)
    for out_path, params in outputs:
        # Pillow's PNG writer embeds no timestamp, so equal pixels give equal bytes.
        Image.fromarray(augment_image(image, params)).save(out_path, format="PNG")
    return len(outputs)


def _variant_rng(seed: int, source_index: int, variant_index: int) -> np.random.Generator:
    # Keyed on the variant itself, not on a shared stream: a variant's parameters do not
    # depend on how many variants came before it or on which worker writes it.
    return np.random.default_rng(np.random.SeedSequence([seed, source_index, variant_index]))


def _output_stems(sources: Sequence[str]) -> dict[str, str]:
    """Source path -> output stem; the source stem, unless two sources of one class share
    it (e.g. ``a.jpeg`` and ``a.png``): then each gets a short hash of its path appended."""
    by_key: dict[str, list[str]] = {}
    for src in sources:
        by_key.setdefault(Path(src).stem.lower(), []).append(src)  # lower: case-blind file systems
    stems = {}
    for group in by_key.values():
        for src in group:
            stem = Path(src).stem
            if len(group) > 1:
                stem = f"{stem}-{hashlib.sha256(src.encode()).hexdigest()[:8]}"
            stems[src] = stem
    return stems


def eligible_sources(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows that may be augmented: split 'train', readable, a known label; one per path,
    sorted by path."""
    keep = (manifest["split"] == "train") & manifest["readable"].eq(True) \
        & manifest["label"].isin(LABELS)
    rows = manifest[keep].drop_duplicates("path").sort_values("path", kind="stable")
    return rows.reset_index(drop=True)


def write_offline_augmentations(manifest: pd.DataFrame, out_dir: Path, target_ratio: float,
                                cfg: AugmentConfig, seed: int, workers: int = 1) -> pd.DataFrame:
    """Write augmented minority-class train images to ``out_dir/<LABEL>/`` as PNG and return
    the lineage table (one row per file: ``LINEAGE_COLUMNS``).

    Only rows with split 'train', readable True and a known label are counted and used as
    sources; sources are only read. A variant's parameters come from (seed, the source's
    index in its class's sorted source list, variant_index), so equal inputs give
    byte-identical files whatever ``workers`` is. Files are written to a staging folder beside
    ``out_dir`` and moved in at the end, so a failed run leaves ``out_dir`` empty.

    Raises FileExistsError if ``out_dir`` is non-empty, ValueError if a class needing
    augmentation has no usable train image.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: output folder exists and is not an empty folder; "
                              "augmentations are only written into a new or empty folder")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)

    rows = eligible_sources(manifest)
    plan = plan_balance({label: int((rows["label"] == label).sum()) for label in LABELS},
                        target_ratio)

    lineage: list[dict[str, object]] = []
    jobs: dict[str, list[tuple[str, AugmentParams]]] = {}  # source -> [(staging path, params)]
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    for label in LABELS:
        if not plan[label]:
            continue
        of_label = rows[rows["label"] == label]
        sources = of_label["path"].astype(str).tolist()            # already sorted
        index = {src: i for i, src in enumerate(sources)}
        patient = dict(zip(sources, of_label["patient_id"]))
        stems = _output_stems(sources)
        for src, v in plan_variants(sources, plan[label]):
            params = sample_params(_variant_rng(seed, index[src], v), cfg)
            name = f"{stems[src]}{AUG_SUFFIX}{v}.png"
            jobs.setdefault(src, []).append((str(staging / label / name), params))
            lineage.append({
                "path": str(out_dir / label / name), "source_path": src, "label": label,
                "patient_id": patient[src], "split": "train", "seed": seed,
                "variant_index": v, **params.as_dict(), "also_online_augmented": True,
            })

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        for label in LABELS:
            if plan[label]:
                (staging / label).mkdir()
        tasks = list(jobs.items())
        if workers > 1 and len(tasks) > 1:
            # spawn, not fork: the caller may hold TensorFlow/gRPC threads that fork breaks.
            with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
                chunk = max(1, len(tasks) // (workers * 8))
                written = sum(pool.map(_write_variants, tasks, chunksize=chunk))
        else:
            written = sum(_write_variants(t) for t in tasks)
        if written != len(lineage):  # a bug guard, not a data check
            raise RuntimeError(f"wrote {written} files, planned {len(lineage)}")
        out_dir.mkdir(exist_ok=True)
        for child in sorted(staging.iterdir()):
            child.rename(out_dir / child.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    table = pd.DataFrame(lineage, columns=LINEAGE_COLUMNS)
    return table.astype({"seed": "int64", "variant_index": "int64", "hflip": bool,
                         "also_online_augmented": bool,
                         **{f: "float64" for f in PARAM_FIELDS if f != "hflip"}})


def augmented_manifest_rows(lineage: pd.DataFrame, workers: int = 1) -> pd.DataFrame:
    """Manifest rows (``MANIFEST_COLUMNS``) for the files of a lineage table, ready to append
    to the train split: split and folder_split 'train', split_origin 'augmented', the source's
    patient_id (so patient-grouped logic keeps variants with their source), image facts from
    ``cxr_core.data.manifest.inspect_image``; relpath is relative to the files' common out_dir."""
    if lineage.empty:
        rows: list[dict[str, object]] = []
    else:
        paths = [Path(p) for p in lineage["path"].astype(str)]
        # Files sit at out_dir/<LABEL>/<name>, so out_dir is the common grandparent.
        root = Path(os.path.commonpath([str(p.parent.parent) for p in paths]))
        infos = _inspect_all([str(p) for p in paths], workers)
        rows = [
            {**info, "relpath": p.relative_to(root).as_posix(), "folder_split": "train",
             "split": "train", "split_origin": AUGMENTED_ORIGIN, "label": label,
             "patient_id": pid, "extension": p.suffix.lower()}
            for p, info, label, pid in zip(paths, infos, lineage["label"], lineage["patient_id"])
        ]
    out = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return out.astype({"width": "Int64", "height": "Int64", "channels": "Int64",
                       "bytes": "Int64", "readable": bool})


def class_weights(class_counts: Mapping[str, int]) -> dict[int, float]:
    """Keras ``class_weight`` for the 'class_weight' strategy (no augmentation):
    0 = NORMAL, 1 = PNEUMONIA, weight ``n_total / (n_classes * n_class)`` ("balanced"),
    so each class contributes equally to the loss."""
    unknown = set(class_counts) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown class label(s) {sorted(map(str, unknown))}; expected {LABELS}")
    counts = [int(class_counts.get(label, 0)) for label in LABELS]
    for label, n in zip(LABELS, counts):
        if n <= 0:
            raise ValueError(f"class {label!r} has {n} images; cannot weight an empty class")
    total = sum(counts)
    return {i: total / (len(LABELS) * n) for i, n in enumerate(counts)}


PREPARED_MANIFEST = "prepared_manifest.parquet"  # the balanced manifest every trainer reads


@dataclass
class BalancedTrainSet:
    """The manifest with augmented train rows appended (offline) and the lineage table."""

    manifest: pd.DataFrame
    lineage: pd.DataFrame | None
    class_weight: dict[int, float] | None


def balance_train_split(manifest: pd.DataFrame, cfg: ExperimentConfig, work_dir: Path) -> BalancedTrainSet:
    """Apply the configured balancing strategy to the train split only.

    offline: augmented minority images are written under ``work_dir/augmented`` (a rerun of
    the same run reuses them); online: nothing is written, the input pipeline resamples;
    class_weight: the loss is weighted instead.
    """
    strategy = cfg.balance.strategy
    if strategy == "class_weight":
        counts = split_data(manifest, "train").class_counts()
        return BalancedTrainSet(manifest, None, class_weights(counts))
    if strategy == "online":
        return BalancedTrainSet(manifest, None, None)
    out_dir = Path(work_dir) / "augmented"
    lineage_path = Path(work_dir) / "augmentation_lineage.csv"
    if lineage_path.is_file():  # written by an earlier attempt of this run: reuse, never redo
        lineage = pd.read_csv(lineage_path)
    else:
        lineage = write_offline_augmentations(
            manifest, out_dir, cfg.balance.target_ratio, cfg.balance.augment, cfg.seed,
            workers=cfg.data.scan_workers or os.cpu_count() or 1)
        lineage.to_csv(lineage_path, index=False)
    rows = augmented_manifest_rows(lineage) if len(lineage) else manifest.iloc[:0]
    return BalancedTrainSet(pd.concat([manifest, rows], ignore_index=True), lineage, None)


def class_weight_for(manifest: pd.DataFrame, cfg: ExperimentConfig) -> dict[int, float] | None:
    """Loss weights when the strategy is ``class_weight``; None otherwise."""
    if cfg.balance.strategy != "class_weight":
        return None
    return class_weights(split_data(manifest, "train").class_counts())
