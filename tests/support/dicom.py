"""Real DICOM files for tests, written with pydicom (fake identifiers only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, index: int = 0, patient: int = 1, seed: int = 0,
                **header: Any) -> Path:
    """Write ``pixels`` (uint8) as one of the synthetic generator's DICOM variants (chosen by
    ``index``), then set or delete (value None) header keywords given as ``header``."""
    import pydicom

    from cxr_core.data.synth_dicom import write_dicom as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, np.asarray(pixels, np.uint8), seed, patient, index)
    if header:
        ds = pydicom.dcmread(path)
        for key, value in header.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)
    return path


def stored_dicom(path: Path, stored: np.ndarray, bits: int, **header: Any) -> Path:
    """A minimal uncompressed MONOCHROME2 file holding ``stored`` values as they are."""
    path = write_dicom(path, np.zeros(stored.shape, np.uint8), index=0)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = stored.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    for key, value in header.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(h: int = 48, w: int = 40) -> np.ndarray:
    """A uint8 image using the whole 0-255 range (so any mapping error shows)."""
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)
