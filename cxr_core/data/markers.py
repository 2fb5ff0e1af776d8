"""Synthetic burned-in markers: the stamps the ``synthetic_marker_prob`` augmentation pastes
onto training images of both classes (issue 12), so that text in the corners or along the
sides stops predicting the class. Rendered once per image size with Pillow's own font; no
TensorFlow here (:func:`cxr_core.data.inputs.paste_markers` does the pasting)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# What scanners burn in (seen on the real data): laterality letters, the projection, ECG
# electrodes (bright discs).
MARKER_TEXTS = ("R", "L", "A-P", "AP")
# Where the stamps go: the shortcut audit's regions, as (first row, last row, first column,
# last column) shares of the side (cxr_core.evaluation.shortcuts keeps the originals).
MARKER_ZONES = ((0.0, 0.15, 0.0, 0.20), (0.0, 0.15, 0.80, 1.0),
                (0.15, 1.0, 0.0, 0.10), (0.15, 1.0, 0.90, 1.0))


def stamp_shape(image_size: int) -> tuple[int, int]:
    """(height, width) of every stamp for ``image_size`` px images: room for "A-P"."""
    return max(4, round(0.09 * image_size)), max(6, round(0.16 * image_size))


def _text_stamp(text: str, font_px: int, shape: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", shape[::-1], 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=ImageFont.load_default(size=font_px))
    stamp = np.asarray(canvas, dtype=np.float32)
    # Tiny fonts render as faint antialiased strokes: burned-in text is at full level.
    return stamp / max(float(stamp.max()), 1.0)


def _disc_stamp(radius: float, shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    r = np.hypot(yy - radius, xx - radius)
    return np.clip(radius + 0.5 - r, 0.0, 1.0).astype(np.float32)  # antialiased edge


def marker_stamps(image_size: int) -> np.ndarray:
    """float32 [K, h, w] in [0, 1]: each marker text at two sizes (about 5% and 7% of the
    image side, as the real letters are) and two electrode discs, top-left aligned."""
    shape = stamp_shape(image_size)
    stamps = [_text_stamp(t, max(4, round(f * image_size)), shape)
              for t in MARKER_TEXTS for f in (0.05, 0.07)]
    stamps += [_disc_stamp(r * image_size, shape) for r in (0.015, 0.025)]
    return np.stack(stamps)


def zone_offsets(image_size: int) -> np.ndarray:
    """int32 [zones, 4]: per zone the lowest and highest top-left row, then column, at which
    a stamp starts (it may reach past the zone, never past the image)."""
    h, w = stamp_shape(image_size)
    s = image_size
    out = []
    for r0, r1, c0, c1 in MARKER_ZONES:
        row_lo = min(round(r0 * s), s - h)
        col_lo = min(round(c0 * s), s - w)
        out.append([row_lo, max(row_lo, min(round(r1 * s), s) - h),
                    col_lo, max(col_lo, min(round(c1 * s), s) - w)])
    return np.asarray(out, dtype=np.int32)
