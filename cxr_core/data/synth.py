"""Synthetic pediatric chest X-ray data set: the project's embedded default data.

The real Kermany/Kaggle images may not be shipped with the project, so the demo, the tests and
the default pipeline run on images drawn here. They imitate AP pediatric chest radiographs
(body outline, lungs, ribs, spine, heart, diaphragm) with acquisition variation, and PNEUMONIA
images carry lung opacities of varying size and density, so that a classifier has something
real-looking but not trivial to learn. Files follow the Kaggle layout and naming so the same
loaders, patient-id parsers and splitters work on both.

Coordinates: shapes are evaluated on a normalised body frame (x to the viewer's right,
y downwards, both about [-1, 1]); an affine transform of the pixel grid gives shift, scale and
rotation without resampling. "Viewer's right" is the patient's left (radiological convention),
which is where the heart bulges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_core.data.labels import LABELS, SPLITS

__all__ = ["SynthSummary", "render_xray", "synthesize_dataset"]

JPEG_QUALITY = 90
MAX_IMAGES_PER_PATIENT = 4

# Streams of np.random.default_rng([seed, STREAM, ...]): one per purpose, so that adding a
# draw in one place never shifts the numbers drawn in another.
_STREAM_PLAN = 0
_STREAM_PATIENT = 1
_STREAM_IMAGE = 2

# 5x5 glyphs of the laterality markers technicians put on the film.
_GLYPHS = {
    "L": np.array(
        [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]],
        dtype=bool,
    ),
    "R": np.array(
        [[1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 1, 0]],
        dtype=bool,
    ),
}


@dataclass(frozen=True)
class SynthSummary:
    """What synthesize_dataset wrote."""

    root: Path
    counts: dict[str, dict[str, int]]  # split -> label -> number of images
    n_patients: int


# ----------------------------------------------------------------------------- shape helpers


def _inside(d: np.ndarray, w: float) -> np.ndarray:
    """Soft indicator of d < 0 (1 inside, 0 outside) with an edge about w wide."""
    return 0.5 - 0.5 * np.tanh(d / w)


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every point to the segment p0-p1, and the position t (0..1) along it."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(x - p0[0] - t * dx, y - p0[1] - t * dy), t


def _ellipse_distance(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    """Approximate signed distance to an ellipse (negative inside); good enough near the edge."""
    c, s = math.cos(angle), math.sin(angle)
    u = (c * (x - cx) + s * (y - cy)) / a
    v = (-s * (x - cx) + c * (y - cy)) / b
    return (np.sqrt(u * u + v * v) - 1.0) * min(a, b)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres mapped to [-1, 1] (float32; cached, read-only)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def _smooth_noise(rng: np.random.Generator, size: int, sigma_frac: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with a correlation length of sigma_frac * size."""
    n = rng.standard_normal((size, size), dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma=max(sigma_frac * size, 0.5), mode="reflect")
    return n / (float(n.std()) + 1e-6)


# ----------------------------------------------------------------------------- anatomy


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """Patient-level anatomy: shared by all images of one patient, so that images of the
    same child look alike (which is why splits must be grouped by patient)."""
    top = rng.uniform(-0.82, -0.70)  # lung apices
    b_r = rng.uniform(0.62, 0.72)  # half height of the right lung (viewer's left)
    a_r = rng.uniform(0.30, 0.36)
    q_r = rng.uniform(0.38, 0.43)
    anat = {
        "scale": rng.uniform(0.86, 1.0),
        "body_hw": rng.uniform(0.84, 0.97),
        "neck_hw": rng.uniform(0.15, 0.21),
        "shoulder_y": rng.uniform(-0.95, -0.8),
        "arms": bool(rng.random() < 0.5),
        "arm_w": rng.uniform(0.12, 0.22),
        "top": top,
        # side -1 is the viewer's left (patient's right), +1 the viewer's right.
        "lung": {
            -1: (q_r, a_r, b_r),
            +1: (
                q_r * rng.uniform(0.96, 1.03),
                a_r * rng.uniform(0.88, 0.96),
                b_r * rng.uniform(0.94, 0.99),
            ),
        },
        "dome_frac": rng.uniform(0.76, 0.83),  # dome apex as a fraction of the lung height
        "dome_left_drop": rng.uniform(0.01, 0.06),  # left dome sits lower (the liver lifts the right)
        "dome_curv": rng.uniform(0.16, 0.26),
        "heart": (
            rng.uniform(0.12, 0.17),  # centre x (towards the patient's left)
            rng.uniform(-0.16, -0.08),  # centre y relative to the left dome: it sits on it
            rng.uniform(0.33, 0.38),  # semi-axis along the long axis
            rng.uniform(0.21, 0.26),
            rng.uniform(0.3, 0.6),  # tilt: long axis down towards the apex, patient's left
        ),
        "spine_w": rng.uniform(0.05, 0.066),
        "vert_pitch": rng.uniform(0.085, 0.105),
        "vert_phase": rng.uniform(0.0, 1.0),
        "rib_pitch": rng.uniform(0.12, 0.145),
        "rib_curv": rng.uniform(0.9, 1.25),
        "rib_y0": top - rng.uniform(0.02, 0.08),
        "arib_y0": top + rng.uniform(0.05, 0.12),
        "thymus": float(rng.uniform(0.06, 0.14)) if rng.random() < 0.25 else 0.0,
        "nipples": bool(rng.random() < 0.3),
        "gastric_bubble": bool(rng.random() < 0.6),
        "trachea_x": rng.normal(0.0, 0.012),
        "vessel_seed": int(rng.integers(0, 2**31)),
    }
    return anat


def _sample_finding(rng: np.random.Generator, subtype: str | None) -> dict:
    """Opacity pattern of a pneumonia. Bacterial ones are lobar or patchy, viral ones patchy
    (often both lungs) or perihilar-interstitial; density and extent vary widely, and about a
    fifth are faint, which is what keeps the task from being trivial."""
    if subtype is None:
        subtype = "bacteria" if rng.random() < 0.65 else "virus"
    if subtype == "bacteria":
        kind = "lobar" if rng.random() < 0.55 else "patchy"
    else:
        kind = "patchy" if rng.random() < 0.6 else "interstitial"
    faint = rng.random() < 0.2
    density = rng.uniform(0.07, 0.14) if faint else rng.uniform(0.16, 0.42)
    return {
        "kind": kind,
        "density": float(density),
        "side": -1 if rng.random() < 0.55 else +1,  # right lung a bit more often
        "bilateral": bool(rng.random() < (0.55 if subtype == "virus" else 0.15)),
        "extent": float(rng.uniform(0.45, 1.0)),
    }


# ----------------------------------------------------------------------------- rendering


class _Frame:
    """Body coordinates of every pixel for one image, plus windows: most structures cover a
    small part of the image, so they are evaluated only on the pixels their box can touch
    (this is what keeps 224-px rendering within budget)."""

    def __init__(self, size: int, scale: float, theta: float, sx: float, sy: float):
        u, v = _pixel_grid(size)
        self.size, self.scale = size, scale
        self.cth, self.sth, self.sx, self.sy = math.cos(theta), math.sin(theta), sx, sy
        self.u, self.v = u, v
        self.x = ((self.cth * (u - sx) + self.sth * (v - sy)) / scale).astype(np.float32)
        self.y = ((-self.sth * (u - sx) + self.cth * (v - sy)) / scale).astype(np.float32)

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel slices covering the body-coordinate box [x0, x1] x [y0, y1] (None if empty)."""
        cols, rows = [], []
        for bx in (x0, x1):
            for by in (y0, y1):
                uu = self.sx + self.scale * (self.cth * bx - self.sth * by)
                vv = self.sy + self.scale * (self.sth * bx + self.cth * by)
                cols.append((uu + 1) / 2 * self.size - 0.5)
                rows.append((vv + 1) / 2 * self.size - 0.5)
        r0, r1 = max(0, math.floor(min(rows)) - 1), min(self.size, math.ceil(max(rows)) + 2)
        c0, c1 = max(0, math.floor(min(cols)) - 1), min(self.size, math.ceil(max(cols)) + 2)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _opacity(
    rng: np.random.Generator,
    finding: dict,
    x: np.ndarray,
    y: np.ndarray,
    lungs: dict[int, np.ndarray],
    geo: dict[int, tuple[float, float, float, float, float]],
    texture: np.ndarray,
) -> np.ndarray:
    """Opacity field (0..~1) of one pneumonia, already confined to the lung fields."""
    out = np.zeros_like(x)
    sides = [finding["side"]] + ([-finding["side"]] if finding["bilateral"] else [])
    ext = finding["extent"]
    for k, side in enumerate(sides):
        q = side * x
        qc, a, top, height, _ = geo[side]
        lung = lungs[side]
        gain = 1.0 if k == 0 else rng.uniform(0.4, 0.9)
        kind = finding["kind"]
        if kind == "lobar":
            lobe = rng.choice(["lower", "upper", "middle"], p=[0.55, 0.25, 0.2])
            fy = rng.uniform(0.45, 0.6)
            # Fissure seen in projection: a line rising towards the lateral wall.
            line = top + fy * height - 0.35 * (q - qc)
            if lobe == "lower":
                region = _inside(line - y, 0.05)
                cy = top + rng.uniform(0.65, 0.9) * height
                cq = qc + rng.uniform(-0.3, 0.5) * a
            elif lobe == "upper":
                region = _inside(y - (top + rng.uniform(0.3, 0.45) * height), 0.05)
                cy = top + rng.uniform(0.1, 0.35) * height
                cq = qc + rng.uniform(-0.3, 0.4) * a
            else:  # right middle lobe / lingula: next to the heart border
                region = _inside(line - y, 0.05) * _inside(q - qc, 0.06)
                cy = top + rng.uniform(0.55, 0.8) * height
                cq = qc - rng.uniform(0.2, 0.6) * a
            r = (0.12 + 0.3 * ext) * rng.uniform(0.8, 1.2)
            blob = _inside(np.hypot(q - cq, (y - cy) * 0.8) - r, 0.08)
            field = region * blob * (0.8 + 0.25 * texture)
        elif kind == "patchy":
            field = np.zeros_like(x)
            n_blobs = int(rng.integers(3, 5 + int(6 * ext)))
            for _ in range(n_blobs):
                fy = rng.beta(2.4, 1.4)  # mostly the lower zones
                cy = top + fy * height * 0.95
                cq = qc + rng.uniform(-0.7, 0.75) * a
                r = rng.uniform(0.04, 0.06 + 0.08 * ext)
                amp = rng.uniform(0.5, 1.0)
                d2 = (q - cq) ** 2 + (y - cy) ** 2
                field += amp * np.exp(-d2 / (2 * r * r))
            field = np.minimum(field, 1.2) * np.clip(0.75 + 0.45 * texture, 0.0, None)
        else:  # interstitial: perihilar haze with a coarse streaky texture
            hy = top + 0.45 * height
            r = 0.15 + 0.15 * ext
            d2 = (q - (qc - 0.6 * a)) ** 2 + ((y - hy) * 0.7) ** 2
            field = np.exp(-d2 / (2 * r * r)) * np.clip(0.7 + 0.6 * texture, 0.0, None)
        out += gain * field * lung
    return out


_FAR = 3.0  # "to the edge of the image" in body units

_HeartGeom = tuple[float, float, float, float, float]  # centre x, centre y, semi-axes a, b, tilt
_LungGeom = tuple[float, float, float, float, float]  # centre q, half width, top, height, dome y


@dataclass
class _Scene:
    """Per-image state that the drawing steps of _render share; they add to a_map in place."""

    anat: dict
    frame: _Frame
    ax: np.ndarray  # |x|: distance from the midline in body units
    a_map: np.ndarray  # attenuation map, built up step by step
    body: np.ndarray  # soft body outline
    thick: np.ndarray  # relative soft-tissue thickness (1 in the middle, 0 at the chest wall)
    heart: _HeartGeom
    lungs: dict[int, np.ndarray]  # side -> soft lung field
    geo: dict[int, _LungGeom]
    lung_all: np.ndarray  # both lung fields, capped at 1
    lbox: list[float]  # union of the lung boxes: x0, x1, y0, y1

    @property
    def x(self) -> np.ndarray:
        """Body x of every pixel (to the viewer's right)."""
        return self.frame.x

    @property
    def y(self) -> np.ndarray:
        """Body y of every pixel (downwards)."""
        return self.frame.y

    @property
    def top(self) -> float:
        """Level of the lung apices."""
        return self.anat["top"]

    @property
    def bw(self) -> float:
        """Half width of the body."""
        return self.anat["body_hw"]

    @property
    def low_dome(self) -> float:
        """Level of the lower of the two diaphragm domes."""
        return max(self.geo[-1][4], self.geo[1][4])


def _acquisition(rng: np.random.Generator, size: int, anat: dict) -> tuple[_Frame, float]:
    """Per-image acquisition geometry (scale, rotation, shift) and depth of inspiration."""
    scale = anat["scale"] * rng.uniform(0.95, 1.06)
    theta = float(np.clip(rng.normal(0.0, 0.035), -0.09, 0.09))
    sx, sy = (float(c) for c in np.clip(rng.normal(0.0, 0.035, 2), -0.08, 0.08))
    frame = _Frame(size, scale, theta, sx, sy)
    breath = rng.uniform(0.9, 1.07)  # depth of inspiration: lung height, dome level
    return frame, breath


def _draw_body(frame: _Frame, ax: np.ndarray, anat: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neck, shoulders, chest wall and arms: returns the attenuation map, body and thickness."""
    x, y = frame.x, frame.y
    bw = anat["body_hw"]
    hw = anat["neck_hw"] + (bw - anat["neck_hw"]) / (1 + np.exp(-(y - anat["shoulder_y"]) / 0.07))
    hw = hw * (1.0 - 0.05 * np.clip(y - 0.3, 0.0, None))
    body = _inside(ax - hw, 0.025)
    thick = np.sqrt(np.clip(1.0 - (x / hw) ** 2, 0.0, 1.0))
    # X-ray path length through the body: long in the middle, short at the chest wall
    a_map = body * (0.2 + 0.4 * np.sqrt(thick))
    if anat["arms"]:
        gap = 0.03
        inner, outer = bw + gap, bw + gap + anat["arm_w"]
        mid, half = (inner + outer) / 2, (outer - inner) / 2
        arm = np.sqrt(np.clip(1.0 - ((ax - mid) / half) ** 2, 0.0, 1.0))  # round limb
        arm *= _inside(anat["shoulder_y"] + 0.08 - y, 0.05)
        a_map += arm * 0.4
    return a_map, body, thick


def _heart_geometry(anat: dict, breath: float) -> _HeartGeom:
    """Heart ellipse (centre x, centre y, semi-axes, tilt): it sits on the left dome."""
    hx, hy, ha, hb, hang = anat["heart"]
    heart_y = (
        anat["top"] + 2 * anat["lung"][1][2] * breath * anat["dome_frac"] + anat["dome_left_drop"] + hy
    )
    return hx, heart_y, ha, hb, hang


def _draw_lungs(
    rng: np.random.Generator,
    frame: _Frame,
    anat: dict,
    breath: float,
    heart: _HeartGeom,
    a_map: np.ndarray,
) -> tuple[dict[int, np.ndarray], dict[int, _LungGeom], np.ndarray, list[float]]:
    """Teardrop lung fields cut by the domes and the heart; returns lungs, geo, lung_all, lbox."""
    x, y = frame.x, frame.y
    hx, heart_y, ha, hb, hang = heart
    top = anat["top"]
    ew = max(0.012, 1.2 / frame.size)  # organ edge softness: about a pixel, never razor-sharp
    lungs: dict[int, np.ndarray] = {}
    geo: dict[int, _LungGeom] = {}
    depth_map = np.zeros_like(x)
    lung_all = np.zeros_like(x)
    lbox = [_FAR, -_FAR, _FAR, -_FAR]  # union of the lung boxes: x0, x1, y0, y1
    for side in (-1, 1):
        qc, a, b = anat["lung"][side]
        b_eff = b * breath
        dome_y = top + 2 * b_eff * anat["dome_frac"] + (anat["dome_left_drop"] if side > 0 else 0)
        geo[side] = (qc, a, top, dome_y - top, dome_y)
        lung = np.zeros_like(x)
        lungs[side] = lung
        q0, q1 = side * (qc - a - 0.04), side * (qc + a + 0.04)
        box = (min(q0, q1), max(q0, q1), top - 0.04, top + 2 * b_eff + 0.04)
        lbox = [
            min(lbox[0], box[0]),
            max(lbox[1], box[1]),
            min(lbox[2], box[2]),
            max(lbox[3], box[3]),
        ]
        w = frame.window(*box)
        if not w:
            continue
        xs, ys = x[w], y[w]
        q = side * xs
        rel = np.clip((ys - top) / (2 * b_eff), 0.0, 1.0)
        # Medial border nearly straight (mediastinum), lateral border tapering to the apex.
        a_lat = a * (0.3 + 0.7 * rel**0.3)
        a_med = qc - 0.09
        uu = (q - qc) / np.where(q > qc, a_lat, a_med)
        vv = (ys - (top + b_eff)) / b_eff
        d_ell = (np.sqrt(uu * uu + vv * vv) - 1.0) * a
        d_dome = ys - (dome_y + anat["dome_curv"] * ((q - qc) / a) ** 2)
        d_heart = _ellipse_distance(xs, ys, hx, heart_y, ha, hb, hang)
        d = np.maximum(np.maximum(d_ell, d_dome), -d_heart)
        lung[w] = _inside(d, ew)
        lung_all[w] += lung[w]
        # thicker air column in the middle of the field, thinner at the edges
        depth_map[w] += lung[w] * (0.75 + 0.25 * np.clip(-d_ell / 0.12, 0.0, 1.0))
    np.minimum(lung_all, 1.0, out=lung_all)
    a_map -= rng.uniform(0.38, 0.46) * depth_map
    return lungs, geo, lung_all, lbox


def _draw_heart_abdomen(s: _Scene) -> None:
    """Heart denser than the other mediastinal tissue; abdomen below the domes denser still."""
    x, y, a_map = s.x, s.y, s.a_map
    hx, heart_y, ha, hb, hang = s.heart
    hbox = (hx - ha - 0.05, hx + ha + 0.05, heart_y - ha - 0.05, heart_y + ha + 0.05)
    w = s.frame.window(*hbox)
    if w:
        a_map[w] += 0.015 * _inside(_ellipse_distance(x[w], y[w], hx, heart_y, ha, hb, hang), 0.03)
    # abdomen (liver, bowel) below the domes is denser than the chest wall
    low_dome = s.low_dome
    w = s.frame.window(-_FAR, _FAR, low_dome - 0.3, _FAR)
    if w:
        a_map[w] += 0.08 * s.body[w] * np.sqrt(s.thick[w]) * _inside(low_dome + 0.05 - y[w], 0.08)


def _draw_thymus(s: _Scene) -> None:
    """Thymus "sail": a normal pediatric finding that mimics upper-lobe opacity."""
    anat = s.anat
    if anat["thymus"] > 0:
        side = -1 if anat["vessel_seed"] % 2 else 1
        cx, cy, ta_ = side * 0.12, s.top + 0.3, anat["thymus"] + 0.05
        w = s.frame.window(cx - 0.35, cx + 0.35, cy - 0.35, cy + 0.35)
        if w:
            d = _ellipse_distance(s.x[w], s.y[w], cx, cy, ta_, 0.14, 0.3)
            s.a_map[w] += 0.12 * _inside(d, 0.04)


def _draw_ribs(rng: np.random.Generator, s: _Scene) -> None:
    """Posterior rib arcs (bright, cortical rims) and fainter anterior arcs."""
    anat, bw, low_dome = s.anat, s.bw, s.low_dome
    w = s.frame.window(-bw - 0.1, bw + 0.1, anat["rib_y0"] - 0.1, low_dome + 0.35)
    if w:
        ys, axs = s.y[w], s.ax[w]
        lat = _inside(axs - 0.98 * bw, 0.03) * _inside(0.045 - axs, 0.02)
        lat *= _inside(ys - (low_dome + 0.12), 0.06)  # ribs fade into the abdomen
        t = (ys - anat["rib_y0"] - anat["rib_curv"] * axs * axs + 0.3 * axs) / anat["rib_pitch"]
        t = np.maximum(t, 0.0) ** 0.93 + np.minimum(t, 0.0)  # lower ribs spread out a little
        fr = t - np.floor(t)
        rib = 0.6 * np.exp(-(((fr - 0.5) / 0.17) ** 2)) + 0.4 * (
            np.exp(-(((fr - 0.32) / 0.06) ** 2)) + np.exp(-(((fr - 0.68) / 0.06) ** 2))
        )
        rib *= _inside(-t, 0.3) * _inside(t - 10.0, 0.3) * lat
        ta = (ys - anat["arib_y0"] + 0.55 * axs) / (anat["rib_pitch"] * 1.15)
        fra = ta - np.floor(ta)
        arib = np.exp(-(((fra - 0.5) / 0.18) ** 2)) * _inside(-ta, 0.3) * _inside(ta - 5.0, 0.3)
        arib *= _inside(axs - 0.7 * bw, 0.05) * _inside(0.1 - axs, 0.03)
        rib_alpha = rng.uniform(0.08, 0.14)
        s.a_map[w] += rib_alpha * (rib + 0.35 * arib) * (0.25 + 0.75 * s.lung_all[w])


def _draw_spine(s: _Scene) -> None:
    """Spine with vertebral bodies, disc spaces and pedicles, fainter behind the heart."""
    anat = s.anat
    _, heart_y, _, hb, _ = s.heart
    sw = anat["spine_w"]
    w = s.frame.window(-sw - 0.05, sw + 0.05, -_FAR, _FAR)
    if w:
        ys, axs = s.y[w], s.ax[w]
        spine = _inside(axs - sw, 0.012)
        tv = (ys - anat["vert_phase"]) / anat["vert_pitch"]
        fv = tv - np.floor(tv)
        vert = 0.65 + 0.35 * np.exp(-(((fv - 0.5) / 0.32) ** 2))
        ped = np.exp(
            -(((axs - 0.72 * sw) / 0.016) ** 2) - (((fv - 0.5) * anat["vert_pitch"] / 0.02) ** 2)
        )
        spine *= 0.45 + 0.55 * _inside(ys - (heart_y - hb), 0.15)  # fainter behind the heart
        s.a_map[w] += spine * (0.09 * vert + 0.06 * ped)


def _draw_airways(s: _Scene) -> None:
    """Trachea and main bronchi (air: darker)."""
    tx = s.anat["trachea_x"]
    carina = s.top + 0.42
    w = s.frame.window(tx - 0.2, tx + 0.2, -_FAR, carina + 0.2)
    if w:
        xs, ys = s.x[w], s.y[w]
        trachea = _inside(np.abs(xs - tx) - 0.032, 0.01) * _inside(ys - carina, 0.02)
        for side in (-1, 1):
            d, _ = _segment_distance(xs, ys, (tx, carina), (tx + side * 0.13, carina + 0.13))
            trachea = np.maximum(trachea, _inside(d - 0.022, 0.01))
        s.a_map[w] -= 0.09 * trachea * s.body[w]


def _draw_clavicles(s: _Scene) -> None:
    """Both clavicles, from the midline up towards the shoulders."""
    bw = s.bw
    cly = s.anat["shoulder_y"] + 0.1
    for side in (-1, 1):
        p0, p1 = (side * 0.07, cly), (side * (bw - 0.1), cly - 0.1)
        w = s.frame.window(min(p0[0], p1[0]) - 0.06, max(p0[0], p1[0]) + 0.06, cly - 0.16, cly + 0.06)
        if w:
            d, _ = _segment_distance(s.x[w], s.y[w], p0, p1)
            s.a_map[w] += 0.13 * _inside(d - 0.03, 0.012)


def _draw_vessels(rng: np.random.Generator, s: _Scene) -> None:
    """Hila and branching vessel markings (benign structure present in both classes)."""
    # The vessel tree of a patient is fixed up to a little per-image jitter; it is drawn only
    # in a window around each hilum (the tree cannot reach further).
    vrng = np.random.default_rng([s.anat["vessel_seed"], int(rng.integers(0, 3))])
    vessels = np.zeros_like(s.x)
    for side in (-1, 1):
        qc, a, _, height, _ = s.geo[side]
        hxy = (side * (qc - 0.62 * a), s.top + 0.42 * height)
        w = s.frame.window(hxy[0] - 0.5, hxy[0] + 0.5, hxy[1] - 0.5, hxy[1] + 0.5)
        if not w:
            continue
        xw, yw = s.x[w], s.y[w]
        win = 1.2 * np.exp(-((xw - hxy[0]) ** 2 + (yw - hxy[1]) ** 2) / (2 * 0.05**2))
        for _ in range(int(vrng.integers(6, 9))):
            ang = vrng.uniform(-1.1, 1.3)  # from up-and-out to down-and-out
            length = vrng.uniform(0.2, 0.4)
            end = (hxy[0] + side * length * math.cos(ang), hxy[1] + length * math.sin(ang))
            d, tt = _segment_distance(xw, yw, hxy, end)
            win += np.exp(-((d / (0.014 * (1.0 - 0.6 * tt))) ** 2))
            # one side branch, thinner, leaving the trunk part-way along it
            f = vrng.uniform(0.35, 0.7)
            start = (hxy[0] + f * (end[0] - hxy[0]), hxy[1] + f * (end[1] - hxy[1]))
            ang2 = ang + vrng.choice([-1.0, 1.0]) * vrng.uniform(0.3, 0.7)
            l2 = length * vrng.uniform(0.3, 0.55)
            end2 = (start[0] + side * l2 * math.cos(ang2), start[1] + l2 * math.sin(ang2))
            d, tt = _segment_distance(xw, yw, start, end2)
            win += np.exp(-((d / (0.009 * (1.0 - 0.5 * tt))) ** 2))
        vessels[w] += win
    vessel_alpha = rng.uniform(0.05, 0.1)
    s.a_map += vessel_alpha * np.minimum(vessels, 1.5) * s.lung_all


def _draw_nipples(s: _Scene) -> None:
    """Nipple shadows (benign round densities in the lower zones), for some patients."""
    if s.anat["nipples"]:
        for side in (-1, 1):
            cx, cy = side * 0.45, s.top + 1.0
            w = s.frame.window(cx - 0.08, cx + 0.08, cy - 0.08, cy + 0.08)
            if w:
                d = np.hypot(s.x[w] - cx, s.y[w] - cy) - 0.03
                s.a_map[w] += 0.05 * _inside(d, 0.012)


def _draw_gastric_bubble(rng: np.random.Generator, s: _Scene) -> None:
    """Gastric air bubble under the left hemidiaphragm, for some patients."""
    if s.anat["gastric_bubble"]:
        qc, a, _, _, dome_y = s.geo[1]
        cx, cy, ga = qc + 0.05, dome_y + 0.13, rng.uniform(0.06, 0.11)
        w = s.frame.window(cx - 0.2, cx + 0.2, cy - 0.15, cy + 0.15)
        if w:
            d = _ellipse_distance(s.x[w], s.y[w], cx, cy, ga, 0.06)
            s.a_map[w] -= 0.13 * _inside(d, 0.02) * s.body[w]


def _draw_parenchyma(rng: np.random.Generator, s: _Scene, finding: dict | None) -> None:
    """Parenchymal texture, and the pneumonia itself (inside the lung boxes only)."""
    texture = _smooth_noise(rng, s.frame.size, 0.02)
    s.a_map += 0.025 * texture * s.lung_all
    if finding is not None:
        w = s.frame.window(*s.lbox)
        if w:
            op = _opacity(
                rng, finding, s.x[w], s.y[w], {k: m[w] for k, m in s.lungs.items()}, s.geo, texture[w]
            )
            s.a_map[w] += finding["density"] * np.minimum(op, 1.2)


def _expose(rng: np.random.Generator, a_map: np.ndarray, frame: _Frame) -> np.ndarray:
    """Exposure: brightness, contrast, gamma, an exposure gradient, noise, blur (float image)."""
    size = frame.size
    a_map = ndimage.gaussian_filter(a_map, sigma=max(0.4, size / 256), mode="nearest")
    contrast = rng.uniform(0.95, 1.3)
    img = rng.uniform(-0.08, 0.05) + contrast * a_map
    gx, gy = (float(c) for c in rng.normal(0.0, 0.035, 2))  # benign asymmetric exposure
    img += gx * frame.u + gy * frame.v
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.75, 1.3)
    img += rng.uniform(0.008, 0.035) * rng.standard_normal((size, size), dtype=np.float32)
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.3, 0.8), mode="nearest")
    return img


def _render(
    rng: np.random.Generator,
    size: int,
    anat: dict,
    finding: dict | None,
) -> np.ndarray:
    """Draw one radiograph for a given anatomy (and optional finding) as uint8."""
    frame, breath = _acquisition(rng, size, anat)
    ax = np.abs(frame.x)
    a_map, body, thick = _draw_body(frame, ax, anat)
    heart = _heart_geometry(anat, breath)
    lungs, geo, lung_all, lbox = _draw_lungs(rng, frame, anat, breath, heart, a_map)
    s = _Scene(anat, frame, ax, a_map, body, thick, heart, lungs, geo, lung_all, lbox)
    # The order of the steps is the order of the random draws: changing it changes every image.
    _draw_heart_abdomen(s)
    _draw_thymus(s)
    _draw_ribs(rng, s)
    _draw_spine(s)
    _draw_airways(s)
    _draw_clavicles(s)
    _draw_vessels(rng, s)
    _draw_nipples(s)
    _draw_gastric_bubble(rng, s)
    _draw_parenchyma(rng, s, finding)
    img = _expose(rng, s.a_map, frame)
    # laterality marker: a bright letter, sometimes on a dark square, in an upper corner
    if rng.random() < 0.6:
        _stamp_marker(rng, img, size)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _stamp_marker(rng: np.random.Generator, img: np.ndarray, size: int) -> None:
    """Draw an 'L' or 'R' marker in place (independent of the class)."""
    glyph = _GLYPHS["R" if rng.random() < 0.7 else "L"]
    cell = max(1, round(size / 90))
    box = 7 * cell
    if box + 4 > size // 2:
        return
    margin = int(rng.integers(2, max(3, size // 12)))
    col = margin if rng.random() < 0.75 else size - margin - box
    row = int(rng.integers(2, max(3, size // 6)))
    patch = img[row : row + box, col : col + box]
    if rng.random() < 0.5:
        patch[...] = 0.08
    big = np.kron(glyph, np.ones((cell, cell), dtype=bool))
    patch[cell : cell + big.shape[0], cell : cell + big.shape[1]][big] = rng.uniform(0.85, 1.0)


def render_xray(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """One synthetic AP pediatric chest radiograph, uint8 grayscale (size x size)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    anat = _sample_anatomy(rng)
    finding = _sample_finding(rng, None) if pneumonia else None
    return _render(rng, size, anat, finding)


# ----------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class _Planned:
    split: str
    label: str
    name: str
    patient: int  # global patient number (also the seed of the patient's anatomy)
    subtype: str | None  # "bacteria" / "virus" for PNEUMONIA
    index: int  # global image index (seed of the image)


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    total = float(sum(fractions))
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    return [n - n_val - n_test, n_val, n_test]


def _plan(n_per_class: int, seed: int, fractions: tuple[float, float, float]) -> list[_Planned]:
    """Decide every file: patients (1-4 images each) are made per split, so a patient's
    images never straddle splits and each split gets exactly its share of images."""
    rng = np.random.default_rng([seed, _STREAM_PLAN])
    counts = _split_counts(n_per_class, fractions)
    plan: list[_Planned] = []
    next_patient = 1  # one counter for both classes: ids never coincide even numerically
    next_index = 0
    pneumonia_image_no = 1  # Kaggle's running M in personN_kind_M
    for label in LABELS:
        groups: list[tuple[str, int]] = []
        for split, target in zip(SPLITS, counts):
            left = target
            while left > 0:
                k = min(int(rng.integers(1, MAX_IMAGES_PER_PATIENT + 1)), left)
                groups.append((split, k))
                left -= k
        # Shuffle so that patient numbers do not reveal the split.
        order = rng.permutation(len(groups))
        for gi in order:
            split, k = groups[gi]
            pid = next_patient
            next_patient += 1
            if label == "NORMAL":
                if pid > 9999:
                    raise ValueError("too many patients for the 4-digit IM-NNNN naming")
                prefix = "NORMAL2-IM" if rng.random() < 0.55 else "IM"
                names = [f"{prefix}-{pid:04d}-{j:04d}.jpeg" for j in range(1, k + 1)]
                subtypes: list[str | None] = [None] * k
            else:
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                names, subtypes = [], []
                for _ in range(k):
                    names.append(f"person{pid}_{kind}_{pneumonia_image_no}.jpeg")
                    subtypes.append(kind)
                    pneumonia_image_no += 1
            for name, sub in zip(names, subtypes):
                plan.append(_Planned(split, label, name, pid, sub, next_index))
                next_index += 1
    return plan


def synthesize_dataset(
    out_dir: Path,
    n_per_class: int = 60,
    size: int = 128,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    fmt: str = "jpeg",
) -> SynthSummary:
    """Write a data set in the Kaggle chest-xray-pneumonia layout; same seed, same bytes.

    ``fmt="dicom"`` writes the same images as DICOM files (``img-NNNNNN.dcm``, some without
    an extension) with fake patient identifiers in their headers; patients are then known
    only from the header's PatientID (see :mod:`cxr_core.data.synth_dicom`)."""
    out_dir = Path(out_dir)
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if fmt not in ("jpeg", "dicom"):
        raise ValueError(f"format must be 'jpeg' or 'dicom', got {fmt!r}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {split_fractions}")
    # Never overwrite or delete: a non-empty target is refused before anything is written.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"refusing to write into non-empty {out_dir}")

    plan = _plan(n_per_class, seed, tuple(float(f) for f in split_fractions))
    for split in SPLITS:
        for label in LABELS:
            (out_dir / split / label).mkdir(parents=True, exist_ok=True)

    counts = {split: {label: 0 for label in LABELS} for split in SPLITS}
    anatomy: dict[int, dict] = {}
    for item in plan:
        if item.patient not in anatomy:
            anatomy.clear()  # plan lists a patient's images together: keep only the current one
            anatomy[item.patient] = _sample_anatomy(
                np.random.default_rng([seed, _STREAM_PATIENT, item.patient])
            )
        rng = np.random.default_rng([seed, _STREAM_IMAGE, item.index])
        finding = _sample_finding(rng, item.subtype) if item.label == "PNEUMONIA" else None
        pixels = _render(rng, size, anatomy[item.patient], finding)
        if fmt == "dicom":
            from cxr_core.data.synth_dicom import file_name, write_dicom

            write_dicom(out_dir / item.split / item.label / file_name(item.index), pixels,
                        seed, item.patient, item.index)
        else:
            path = out_dir / item.split / item.label / item.name
            Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)
        counts[item.split][item.label] += 1

    return SynthSummary(root=out_dir, counts=counts, n_patients=len({p.patient for p in plan}))
