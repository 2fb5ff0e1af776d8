"""DICOM input: radiographs read with pydicom, mapped to the 8-bit gray images training
expects, header facts for validation, and patient ids that never leave as themselves.

Every reader of images (scan, balancing, the tf.data pipeline, ``cxr predict``, serving)
turns DICOM bytes into pixels through :func:`decode_gray`, so a file looks the same to every
stage. The mapping to 8 bits follows the display pipeline of the standard (PS3.3 C.11):
modality LUT or rescale slope/intercept, then the VOI LUT or the first window centre/width
when the file has one (the view the acquiring site chose), else the full range of the
image's values; ``MONOCHROME1`` (white = low values) is inverted so bone is always bright.

Identifying header values (names, ids, dates of birth, accession numbers, institutions) are
never copied anywhere: the only thing taken from them is a salted HMAC of ``PatientID``,
which groups a patient's images when splits are carved.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
_PREAMBLE = 128
_MAGIC = b"DICM"
# Header facts kept in the manifest: technical, never identifying.
HEADER_COLUMNS = [
    "dicom_modality", "dicom_body_part", "dicom_view_position", "dicom_photometric",
    "dicom_pixel_spacing", "dicom_bits_stored", "dicom_transfer_syntax",
]
SALT_ENV = "CXR_PSEUDONYM_SALT"
SALT_FILE = Path("secrets") / "pseudonym-salt"


class DicomDecodeError(ValueError):
    """A DICOM file whose pixels cannot be turned into an image (the message names the file)."""


# --------------------------------------------------------------------------- detection


def has_preamble(head: bytes) -> bool:
    """True when ``head`` (a file's first 132 bytes or more) carries the DICOM part-10 magic."""
    return len(head) >= _PREAMBLE + 4 and head[_PREAMBLE:_PREAMBLE + 4] == _MAGIC


def sniff_file(path: str | Path) -> bool:
    """True when the file starts with a DICOM preamble (how extensionless files are found)."""
    try:
        with open(path, "rb") as f:
            return has_preamble(f.read(_PREAMBLE + 4))
    except OSError:
        return False


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """A ``.dcm``/``.dicom`` name, or any name whose content has the DICOM preamble."""
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return True
    return has_preamble(head) if head is not None else sniff_file(path)


# --------------------------------------------------------------------------- reading


def read_dataset(data: bytes, name: str = "<bytes>") -> Any:
    """Parse DICOM bytes (with or without the part-10 preamble) into a pydicom Dataset."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise DicomDecodeError(f"{name}: not a readable DICOM file ({_first_line(exc)})") from exc
    if "PixelData" not in ds:
        raise DicomDecodeError(f"{name}: DICOM file without pixel data (not an image)")
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


def _pixels(ds: Any, name: str) -> np.ndarray:
    """The stored pixel values of a single-frame image, decoded (any transfer syntax that an
    installed plugin handles); a clear error naming the file and the syntax otherwise."""
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError,
            TypeError, OSError) as exc:
        ts = _transfer_syntax(ds)
        syntax = f"{ts.name} ({ts})" if ts else "unknown transfer syntax"
        raise DicomDecodeError(f"{name}: cannot decode DICOM pixel data, {syntax}: "
                               f"{_first_line(exc)}") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomDecodeError(f"{name}: multi-frame DICOM ({frames} frames); one radiograph "
                               "per file is expected")
    return arr


def _voi_range(ds: Any) -> tuple[float, float]:
    """The output range of pydicom's VOI step (PS3.3 C.11.2), to map it onto 0-255."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])  # the LUT's output bits
        return 0.0, float(2**bits - 1)
    # Windowing: the same range pydicom's apply_windowing maps onto.
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(getattr(ds, "PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _to_unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.float64)
    return np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _voi_lut_sequence(values: np.ndarray, ds: Any) -> np.ndarray:
    """The first VOI LUT of the sequence applied to integer values (PS3.3 C.11.2.1.1).

    Done here rather than by pydicom's ``apply_voi``: pydicom 3.0 indexes the LUT with an
    array of the LUT's output type, so an 8-bit LUT with more than 256 entries (e.g. 12-bit
    input, 8-bit display) wraps its indices around and returns the wrong grey levels."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    elem = item["LUTData"]
    if elem.VR == "OW" or isinstance(elem.value, bytes | bytearray):
        little = getattr(ds, "is_little_endian", True) is not False
        lut = np.frombuffer(bytes(elem.value), dtype="<u2" if little else ">u2")[:entries]
    else:
        lut = np.asarray(elem.value, dtype=np.int64).ravel()[:entries]
    idx = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
    return lut.astype(np.float64)[idx]


def _gray_from_monochrome(ds: Any, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    rescaled = ds.get("ModalityLUTSequence") or "RescaleSlope" in ds
    if ds.get("VOILUTSequence"):
        values = _voi_lut_sequence(values, ds)
        lo, hi = _voi_range(ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_windowing(values, ds, index=0)
        lo, hi = _voi_range(ds)
    elif int(ds.get("BitsStored", 8)) <= 8 and not rescaled and not ds.get("PixelRepresentation"):
        lo, hi = 0.0, 255.0  # plain 8-bit: the grey levels as stored, like a PNG
    else:
        # No VOI in the file: the image's own value range (a viewer's automatic window);
        # the nominal range of the bits stored would leave many 12-in-16-bit images black.
        lo, hi = float(np.min(values)), float(np.max(values))
    unit = _to_unit_range(values, lo, hi)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values white: invert so bone is bright
    return unit


def gray_from_dataset(ds: Any, name: str = "<bytes>") -> np.ndarray:
    """uint8 HxW grayscale of a parsed DICOM image (see the module docstring)."""
    arr = _pixels(ds, name)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    try:
        if samples == 1:
            unit = _gray_from_monochrome(ds, arr)
        else:
            # Colour (RGB, or YBR which pydicom converts to RGB): ITU-R 601 luma, as Pillow
            # and TensorFlow use for colour JPEGs; scaled from the stored bit depth.
            rgb = arr[..., :3].astype(np.float64)
            luma = rgb @ np.array([0.299, 0.587, 0.114])
            unit = _to_unit_range(luma, 0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    except (ValueError, NotImplementedError, AttributeError, KeyError, TypeError) as exc:
        raise DicomDecodeError(f"{name}: cannot map DICOM pixels to gray levels "
                               f"({_first_line(exc)})") from exc
    if unit.ndim != 2:
        raise DicomDecodeError(f"{name}: unexpected DICOM pixel array shape {arr.shape}")
    return np.rint(unit * 255.0).astype(np.uint8)


def decode_gray(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """DICOM bytes -> uint8 HxW grayscale, the pixels every stage sees."""
    return gray_from_dataset(read_dataset(data, name), name)


def read_gray(path: str | Path) -> np.ndarray:
    """A DICOM file -> uint8 HxW grayscale."""
    return decode_gray(Path(path).read_bytes(), str(path))


# --------------------------------------------------------------------------- header facts


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip().upper()


def header_facts(ds: Any) -> dict[str, object]:
    """The technical header values validation checks (never an identifying one)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    ts = _transfer_syntax(ds)
    return {
        "dicom_modality": _text(ds, "Modality"),
        "dicom_body_part": _text(ds, "BodyPartExamined"),
        "dicom_view_position": _text(ds, "ViewPosition"),
        "dicom_photometric": _text(ds, "PhotometricInterpretation"),
        "dicom_pixel_spacing": float(spacing[0]) if spacing else None,
        "dicom_bits_stored": int(ds.BitsStored) if "BitsStored" in ds else None,
        "dicom_transfer_syntax": str(ts) if ts else None,
    }


def _shortcut_scores(gray: np.ndarray) -> dict[str, float | None]:
    """The shortcut scores of the decoded pixels (imported here: the scan reads each file
    once)."""
    from cxr_core.evaluation.shortcuts import score_image

    return score_image(gray)


def inspect_dicom(data: bytes, name: str, salt: bytes | None) -> dict[str, object]:
    """Manifest facts of one DICOM file: size, mode, header facts and the pseudonymous
    patient id; decodes the pixels fully. Raises DicomDecodeError for a bad file."""
    ds = read_dataset(data, name)
    gray = gray_from_dataset(ds, name)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    facts: dict[str, object] = {
        "format": "DICOM", "width": int(gray.shape[1]), "height": int(gray.shape[0]),
        # The mode training sees: the stored bit depth is in dicom_bits_stored.
        "mode": "L" if samples == 1 else "RGB", "channels": 1 if samples == 1 else 3,
        **header_facts(ds),
        **_shortcut_scores(gray),
    }
    patient = str(ds.get("PatientID", "") or "").strip()
    facts["patient_pseudonym"] = pseudonymize(patient, salt) if patient and salt else None
    return facts


# --------------------------------------------------------------------------- pseudonyms


def pseudonymize(value: str, salt: bytes) -> str:
    """``pid-`` + the first 20 hex digits of HMAC-SHA256(salt, value): the same patient gets
    the same pseudonym under one salt, and nobody without the salt can test a guess."""
    return "pid-" + hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def pseudonym_salt(settings: Any = None) -> bytes:
    """The salt: ``CXR_PSEUDONYM_SALT`` when set, else a random one kept (mode 600) under the
    state home, created on first use. Stable per home, so repeated scans carve the same
    patient-grouped splits; never part of the repository."""
    from cxr_core.settings import get_settings

    settings = settings or get_settings()
    configured = getattr(settings, "pseudonym_salt", None)
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode("utf-8")
    path = Path(settings.home) / SALT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic and never overwrites: a concurrent creator's salt wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text().strip()
    if not value:
        raise DicomDecodeError(f"{path}: empty pseudonym salt file; delete it or set {SALT_ENV}")
    return value.encode("utf-8")
