"""Scan a chest X-ray folder into an image manifest: one row per file, every image decoded.

Source files are only read: never moved, rewritten or deleted. Unreadable files become rows
with ``readable=False`` and an ``error``; junk (hidden files, OS metadata, notebook
checkpoints, non-image extensions) is skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from cxr_core.data import dicom
from cxr_core.data.labels import LABELS
from cxr_core.errors import DataLayoutError
from cxr_core.evaluation.shortcuts import SCORE_COLUMNS, score_image

# DICOM files without one of these extensions are found by their preamble (is_image_path).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}) | dicom.DICOM_EXTENSIONS
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "icon\r"})
JUNK_DIRS = frozenset({".ipynb_checkpoints", "__macosx", "__pycache__"})
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Which file extensions each decoder format is expected under (a PNG named .jpeg is worth a warning).
FORMAT_EXTENSIONS = {
    "JPEG": {".jpeg", ".jpg"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"},
    "DICOM": set(dicom.DICOM_EXTENSIONS),  # or no image extension at all (found by preamble)
}
MANIFEST_COLUMNS = [
    "path", "relpath", "folder_split", "split", "split_origin", "label", "patient_id",
    "extension", "format", "width", "height", "mode", "channels", "bytes", "sha256",
    "readable", "error",
]
# Per-image shortcut scores (cxr_core.evaluation.shortcuts), measured while the scan has the
# pixels decoded anyway; absent from manifests of augmented copies and older runs.
SHORTCUT_SCORE_COLUMNS = list(SCORE_COLUMNS)
_SERIAL_BELOW = 256  # below this many files a process pool costs more than it saves

_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


@dataclass
class ScanResult:
    """The manifest plus everything the scan noticed about the folder itself."""

    root: Path
    manifest: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    empty_class_dirs: list[str] = field(default_factory=list)
    unknown_class_dirs: list[str] = field(default_factory=list)
    loose_files: list[str] = field(default_factory=list)            # files outside class folders

    @property
    def quarantine(self) -> pd.DataFrame:
        """Rows whose file could not be decoded, with the reason."""
        bad = self.manifest[~self.manifest["readable"]]
        return bad[["path", "split", "label", "error"]].reset_index(drop=True)


def patient_id_from_name(filename: str) -> str:
    """Infer a patient id from a Kaggle chest-xray file name.

    ``person12_bacteria_3.jpeg`` -> ``12``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-0115-0001.jpeg`` -> ``NORMAL2-IM-0115``; anything else -> the file stem.
    It is inferred, not a true identity: two people can share an id across folders.
    """
    name = Path(filename).name
    if m := _PERSON.match(name):
        return str(int(m.group(1)))
    if m := _IM.match(name):
        return m.group(1).upper()
    return Path(name).stem


def is_image_path(path: Path) -> bool:
    """An image by extension, or a DICOM file by its preamble whatever its name (DICOM
    archives often name files by UID or not at all)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or dicom.sniff_file(path)


def _is_junk_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def find_data_root(data_dir: Path, max_depth: int = 3) -> Path:
    """Locate the folder holding the split folders (tolerates ``chest_xray/chest_xray``).

    The shallowest folder with a ``train``/``val``/``test`` child (any letter case) wins; a
    folder holding NORMAL/PNEUMONIA directly is accepted as a train-only data set.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataLayoutError(f"{data_dir}: not a directory")
    frontier = [data_dir]
    for _ in range(max_depth + 1):
        for folder in frontier:
            children = _subdirs(folder)
            if any(c.name.lower() in SPLIT_ALIASES for c in children):
                return folder
            if any(c.name.upper() in LABELS for c in children):
                return folder
        frontier = [c for f in frontier for c in _subdirs(f)]
        if not frontier:
            break
    raise DataLayoutError(
        f"{data_dir}: no train/, val/ or test/ folder (nor NORMAL/ and PNEUMONIA/) found within "
        f"{max_depth} levels; expected the Kaggle layout DATA/train/{{NORMAL,PNEUMONIA}}/*.jpeg"
    )


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_dir() and e.name.lower() not in JUNK_DIRS
            and not e.name.startswith(".")]


@dataclass
class _Listing:
    files: list[tuple[Path, str, str | None]] = field(default_factory=list)  # path, split, label
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_class_dirs: list[str] = field(default_factory=list)
    unknown_class_dirs: list[str] = field(default_factory=list)
    loose_files: list[str] = field(default_factory=list)


def _walk_files(folder: Path, listing: _Listing) -> list[Path]:
    """Image files below ``folder`` (recursively), recording junk as skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Prune junk directories in place so os.walk never descends into them.
        kept = []
        for d in sorted(dirnames):
            if d.lower() in JUNK_DIRS or d.startswith("."):
                listing.skipped.append((str(Path(dirpath) / d), "junk directory"))
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_junk_name(name):
                listing.skipped.append((str(path), "hidden or OS metadata file"))
            elif not is_image_path(path):
                listing.skipped.append((str(path), f"not an image extension ({path.suffix or 'none'})"))
            else:
                found.append(path)
    return found


def list_dataset(root: Path) -> _Listing:
    """Walk the layout under ``root`` and assign each image file its folder split and label."""
    listing = _Listing()
    children = _subdirs(root)
    split_dirs = [(SPLIT_ALIASES[c.name.lower()], c) for c in children if c.name.lower() in SPLIT_ALIASES]
    if not split_dirs:  # NORMAL/ and PNEUMONIA/ directly under root: a train-only data set
        split_dirs = [("train", root)]
    for split, split_dir in split_dirs:
        for entry in sorted(split_dir.iterdir()):
            if entry.is_dir():
                if entry.name.lower() in JUNK_DIRS or entry.name.startswith("."):
                    listing.skipped.append((str(entry), "junk directory"))
                    continue
                label = entry.name.upper() if entry.name.upper() in LABELS else None
                files = _walk_files(entry, listing)
                if label is None:
                    if split_dir is root and entry.name.lower() in SPLIT_ALIASES:
                        continue
                    listing.unknown_class_dirs.append(str(entry))
                elif not files:
                    listing.empty_class_dirs.append(str(entry))
                # Files under an unknown class folder stay in the manifest with label=None so
                # validation names each one rather than silently dropping them.
                listing.files.extend((f, split, label) for f in files)
            elif _is_junk_name(entry.name):
                listing.skipped.append((str(entry), "hidden or OS metadata file"))
            elif is_image_path(entry):
                listing.loose_files.append(str(entry))
                listing.files.append((entry, split, None))
            else:
                listing.skipped.append((str(entry), f"not an image extension ({entry.suffix or 'none'})"))
    return listing


def inspect_image(path: str, salt: bytes | None = None) -> dict[str, object]:
    """Hash and fully decode one file; never raises for a bad file (the error is recorded).
    A readable image also gets its shortcut scores (:data:`SHORTCUT_SCORE_COLUMNS`).

    DICOM files (by extension or preamble) also give their header facts and, with ``salt``,
    ``patient_pseudonym``: the salted hash of their PatientID (never the id itself)."""
    row: dict[str, object] = {
        "path": path, "format": None, "width": None, "height": None, "mode": None,
        "channels": None, "bytes": None, "sha256": None, "readable": False, "error": None,
    }
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        row["error"] = f"cannot read file: {exc.strerror or exc}"
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        row["error"] = "zero-byte file"
        return row
    if dicom.is_dicom(path, head=data[:132]):
        try:
            row.update(dicom.inspect_dicom(data, path, salt))
            row["readable"] = True
        except dicom.DicomDecodeError as exc:
            row["format"] = "DICOM"
            row["error"] = str(exc).removeprefix(f"{path}: ")
        return row
    try:
        import io

        with Image.open(io.BytesIO(data)) as img:
            row["format"] = img.format
            row["width"], row["height"] = img.size
            row["mode"] = img.mode
            row["channels"] = len(img.getbands())
            img.load()  # full decode: catches truncated and corrupt pixel data
            row["readable"] = True
            row.update(score_image(img))  # while decoded: no second read of the file
    except UnidentifiedImageError:
        row["error"] = "not an image (no decoder recognises the content)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        row["error"] = f"cannot decode image: {exc}"
    return row


def _inspect_all(paths: list[str], workers: int,
                 salt: bytes | None = None) -> list[dict[str, object]]:
    if workers <= 1 or len(paths) < _SERIAL_BELOW:
        return [inspect_image(p, salt) for p in paths]
    # Threads, not processes: Pillow's decoders and hashlib release the GIL, so large images
    # decode in parallel (2x on 2 cores for full-resolution X-rays), with no process start-up
    # cost and no fork/spawn hazards next to TensorFlow or in scripts without a main guard.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths, [salt] * len(paths)))


def scan_dataset(data_dir: Path, workers: int = 0) -> ScanResult:
    """Scan ``data_dir`` (Kaggle chest-xray layout) into a manifest; reads files, never writes.

    ``workers=0`` uses one process per CPU core.
    """
    root = find_data_root(Path(data_dir)).resolve()
    listing = list_dataset(root)
    return ScanResult(
        root=root,
        manifest=_inspected_manifest(root, listing.files, workers),
        skipped=listing.skipped,
        empty_class_dirs=listing.empty_class_dirs,
        unknown_class_dirs=listing.unknown_class_dirs,
        loose_files=listing.loose_files,
    )


def scan_images(folder: Path, workers: int = 0) -> ScanResult:
    """Every image file below ``folder`` in any layout, unlabeled (label None, split
    ``"unlabeled"``), inspected as :func:`scan_dataset` inspects a data set's files."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataLayoutError(f"{folder}: not a directory")
    listing = _Listing()
    files = [(f, "unlabeled", None) for f in _walk_files(root, listing)]
    return ScanResult(root=root, manifest=_inspected_manifest(root, files, workers),
                      skipped=listing.skipped)


def _inspected_manifest(root: Path, files: list[tuple[Path, str, str | None]],
                        workers: int) -> pd.DataFrame:
    """One manifest row per (path, split, label), each file hashed and decoded."""
    workers = workers or (os.cpu_count() or 1)
    has_dicom = any(dicom.is_dicom(p) for p, _, _ in files)
    # The salt is read (or created under the home) only when there is DICOM to pseudonymize.
    salt = dicom.pseudonym_salt() if has_dicom else None
    inspected = _inspect_all([str(p) for p, _, _ in files], workers, salt)
    rows = []
    for (path, split, label), info in zip(files, inspected):
        pseudonym = info.pop("patient_pseudonym", None)
        rows.append({
            **info,
            "relpath": path.relative_to(root).as_posix(),
            "folder_split": split,
            "split": split,
            "split_origin": "folder",
            "label": label,
            # DICOM: the salted hash of PatientID groups a patient's images; else the name.
            "patient_id": pseudonym or patient_id_from_name(path.name),
            "extension": path.suffix.lower(),
        })
    # DICOM header facts appear only for data sets that have DICOM files.
    columns = MANIFEST_COLUMNS + SHORTCUT_SCORE_COLUMNS + (dicom.HEADER_COLUMNS if has_dicom else [])
    manifest = pd.DataFrame(rows, columns=columns)
    manifest = manifest.astype({
        "width": "Int64", "height": "Int64", "channels": "Int64", "bytes": "Int64",
        "readable": bool, **dict.fromkeys(SHORTCUT_SCORE_COLUMNS, "float64"),
    })
    if has_dicom:
        manifest = manifest.astype({"dicom_pixel_spacing": "Float64", "dicom_bits_stored": "Int64"})
    return manifest


def listing_fingerprint(data_dir: Path) -> str:
    """A cheap identity of a data folder (relative paths, sizes, modification times), without
    reading file contents: equal fingerprints mean the scan would see the same files."""
    root = Path(data_dir).resolve()
    digest = hashlib.sha256(str(root).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def manifest_hash(manifest: pd.DataFrame) -> str:
    """A content hash of the data set: file hashes with their split and label, order-free."""
    keys = sorted(
        f"{r.split}\t{r.label}\t{r.relpath}\t{r.sha256}" for r in manifest.itertuples(index=False)
    )
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def write_manifest(manifest: pd.DataFrame, out: Path) -> Path:
    """Write the manifest as Parquet (or CSV when ``out`` ends in .csv)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        manifest.to_csv(out, index=False)
    else:
        manifest.to_parquet(out, index=False)
    return out


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path)
    return pd.read_parquet(path)
