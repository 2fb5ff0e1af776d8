"""The synthetic data set written as DICOM, with fake identifiers planted in every header.

Files vary the way real archives do, so every branch of the DICOM reader is exercised:
8, 12 and 16 bits stored, window centre/width with a rescale slope and intercept, a VOI LUT
sequence, ``MONOCHROME1``, RLE-compressed pixel data, CR and DX, AP and PA views, and some
files with no extension at all (found by their preamble). Each variant is built so that it
decodes back to exactly the rendered 8-bit pixels: the DICOM set is the JPEG set's images,
losslessly. Names, ids, birth dates, accession numbers and the institution are fake and
distinctive, so a test can search every artifact of a run for them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

VARIANTS = ("8bit", "12bit_window", "16bit_mono1_rescale", "8bit_rle", "12bit_voi_lut",
            "8bit_no_extension")
_UID_ROOT = "1.2.826.0.1.3680043.10.1411."  # a private-style root for synthetic UIDs


def planted_identifiers(seed: int, patient: int, index: int) -> dict[str, str]:
    """The fake identifying values written into one file's header (what must never leak)."""
    born = dt.date(2019, 1, 1) + dt.timedelta(days=(patient * 37 + seed * 11) % 1500)
    return {
        "PatientName": f"ZZFAKE^CHILD{patient:05d}S{seed}",
        "PatientID": f"MRN-{seed}-{patient:06d}-Q",
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "AccessionNumber": f"ACN{seed}X{index:07d}Z",
        "InstitutionName": f"Zzfake Pediatric Institute {seed:04d}",
        "ReferringPhysicianName": f"ZZDOC^REFERRER{seed}",
    }


def file_name(index: int) -> str:
    """``img-000123.dcm``; the extensionless variant has no suffix (names never carry ids)."""
    stem = f"img-{index:06d}"
    return stem if VARIANTS[index % len(VARIANTS)] == "8bit_no_extension" else stem + ".dcm"


def _uid(seed: int, *parts: int) -> str:
    from pydicom.uid import generate_uid

    # Derived from the seed and the file, so the same seed writes the same bytes.
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=[str(seed), *map(str, parts)])


def _base_dataset(seed: int, patient: int, index: int, rows: int, cols: int) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = _uid(seed, patient, index, 3)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, patient, index, 1)
    ds.SeriesInstanceUID = _uid(seed, patient, index, 2)
    for key, value in planted_identifiers(seed, patient, index).items():
        setattr(ds, key, value)
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.Modality = "CR" if index % 2 else "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA" if index % 5 == 4 else "AP"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _set_pixels(ds: object, stored: np.ndarray, bits_stored: int) -> None:
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()


def _encode_variant(ds: object, pixels: np.ndarray, variant: str) -> None:
    """Store ``pixels`` (uint8) so that the reader's display pipeline gives them back."""
    from pydicom.dataset import Dataset
    from pydicom.uid import RLELossless

    p = pixels.astype(np.int64)
    if variant in ("8bit", "8bit_no_extension", "8bit_rle"):
        _set_pixels(ds, p, 8)
        if variant == "8bit_rle":
            # Keep the derived SOP Instance UID: the same seed must write the same bytes.
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    elif variant == "12bit_window":
        # Window centre 2048 / width 4096 over 0-4095 maps 16p + 8 back onto p.
        _set_pixels(ds, 16 * p + 8, 12)
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    elif variant == "16bit_mono1_rescale":
        # MONOCHROME1 (white = low) with a modality rescale; the window spans the whole
        # rescaled range, so the display value is (255 - stored / 257) inverted = p.
        _set_pixels(ds, (255 - p) * 257, 16)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1000, "US"
        ds.WindowCenter, ds.WindowWidth = 64535.5, 131071
    elif variant == "12bit_voi_lut":
        _set_pixels(ds, 16 * p + 8, 12)
        lut = Dataset()
        # Both elements have an ambiguous VR (US/SS, US/OW): say it, or pydicom writes OW.
        lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: entries, first, bits
        lut.add_new(0x00283006, "US", [v // 16 for v in range(4096)])  # LUT Data
        ds.VOILUTSequence = [lut]
    else:
        raise ValueError(f"unknown DICOM variant {variant!r}")


def write_dicom(path: Path, pixels: np.ndarray, seed: int, patient: int, index: int) -> Path:
    """Write one rendered uint8 image as a DICOM file (the variant is chosen by ``index``)."""
    rows, cols = pixels.shape
    ds = _base_dataset(seed, patient, index, rows, cols)
    _encode_variant(ds, pixels, VARIANTS[index % len(VARIANTS)])
    ds.save_as(path, enforce_file_format=True)
    return path
