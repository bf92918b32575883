"""Deterministic synthetic abdominal/thoracic CT phantoms: the embedded default training data.

The project trains a small MONAI 3D U-Net on these phantoms and then calibrates its outputs
conformally, so the phantoms are built to be *realistic enough that such a network is neither
perfect nor useless*: the anatomy is simple but CT-like, and some lesions are genuinely hard (small,
low contrast, next to lung vessels).

Each :class:`Phantom` holds a float32 image in Hounsfield units and a uint8 label map (values in
:data:`LABEL_NAMES`) on a :class:`~ConformalSegLib.common.geometry.Geometry`. Arrays are in numpy
``(z, y, x)`` order; ``spacing`` is in ITK ``(x, y, z)`` order. With the identity direction the
axes are LPS: ``x`` runs to the patient's **left**, ``y`` to **posterior**, ``z`` to **superior**
(higher slice index = more cranial).

Anatomy
-------
Everything is computed in millimetres, so anisotropic spacing is respected (a round lesion stays
round in mm). The default field of view (96 x 96 x 48 voxels of 1.6 x 1.6 x 3.0 mm, 154 x 154 x
144 mm) is far smaller than an adult abdomen, so the *anatomy* is scaled to the field of view
(a torso filling about 85% of the width) while *lesion* radii are absolute (3-20 mm, capped so
they fit their organ).

* air (-1000 HU) around an elliptic body (superellipse cross-section, flatter back), with a
  subcutaneous fat layer (~ -100 HU) and a muscle wall (~ 40 HU), thicker paraspinal muscles;
* spine (~ 400 HU: cancellous core, denser cortex, intervertebral discs, posterior arch) and
  oblique ribs in the upper part (label :data:`BONE`);
* two lungs (~ -850 HU with branching-vessel-like texture, denser near the hila) in the upper z
  part, above two diaphragm domes (the right one higher) with costophrenic recesses; heart and
  mediastinal fat between them;
* liver (~ 60 HU, right lobe plus a left lobe crossing the midline, its dome under the right
  lung), spleen (~ 45 HU, left, posterior), two kidneys (~ 30 HU cortex, darker medulla, fatty
  hilum; posterior, beside the spine, the right one lower), aorta and vena cava;
* abdominal filler: a smooth mixture of mesenteric fat and bowel-like soft tissue, rare gas.

Per case the body and organ sizes, positions, rotations and outlines vary, and a contrast-phase
offset shifts the enhancing organs (liver, spleen, kidneys x1.6, vessels x3) together.

Lesions (label :data:`LESION`)
------------------------------
``n_lesions`` lesions (default 1-4; none with probability ``empty_probability``), each in a host
organ drawn with weights liver 0.45, lung 0.25, kidney 0.15, spleen 0.15 (organs too thin for a
3 mm lesion are skipped). The radius is log-uniform in 3-20 mm (3-15 mm in lung), capped at 0.9 x
the host's largest inner depth; the shape is a randomly rotated ellipsoid (axes 0.7-1.3 x radius)
with 0-2 satellite lobes and a noise-perturbed surface, clipped to the host organ (largest
connected part kept). Intensity: in solid organs hypo-dense, 10-50 HU below the host organ
(uniform, so a quarter of them are 10-20 HU: with 8-20 HU noise, small ones are genuinely hard),
large ones with a darker necrotic core; in lung, soft-tissue nodules of 0-40 HU. A lesion that
the organ edge clips to a sliver (< 6 voxels or < 1/4 of its nominal volume) is re-drawn. Lesion
centres keep apart, but irregular neighbours occasionally touch and form one connected region
(about 1 case in 25); :attr:`Phantom.lesions` describes every placed lesion. At the defaults a
lesion has 7 to about 4,000-6,500 voxels (median about 100, 10th-90th percentile about 20-1,100;
equivalent radius 2.3-20 mm); about 44% sit in the liver, 26% in the lungs, 15% in the kidneys and
15% in the spleen (200 phantoms, seed 0).

Image formation
---------------
The piecewise-smooth anatomy is blurred by a mild per-case Gaussian point-spread function
(0.6-1.0 mm in plane, 0.8-1.5 mm along z; partial volume), then Gaussian noise (sigma 8-20 HU per
case, slightly correlated in plane like CT noise) is added and the result is clipped to
[-1024, 3071] HU.

All randomness comes from ``np.random.default_rng(seed)``: the same arguments give bit-identical
output. One default phantom takes about 0.1 s on one core.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
from scipy import ndimage, special

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..io.volumes import save_volume
from ..common.randomness import random_rotation
from ..io.atomic import OVERWRITE_FIX, atomic_output

__all__ = [
    "BACKGROUND", "BODY", "BONE", "KIDNEY", "LABEL_NAMES", "LESION", "LESION_HOSTS", "LIVER", "LUNG", "SPLEEN",
    "LesionInfo", "Phantom", "dataset_json", "make_phantom", "make_phantoms", "phantom_seed", "write_phantom_dataset",
]

# --------------------------------------------------------------------------------------------------
# labels

BACKGROUND = 0  #: air outside the body
BODY = 1  #: soft tissue, fat, muscle, vessels, heart, bowel, spinal canal
LUNG = 2  #: left and right lung (vessels inside included)
LIVER = 3
KIDNEY = 4  #: left and right kidney (parenchyma; the fatty hilum is BODY)
SPLEEN = 5
LESION = 6  #: tumour, inside liver, kidney, spleen or lung
BONE = 7  #: spine and ribs

#: Label value -> name (the names are the keys of ``dataset.json``'s ``labels``).
LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    BODY: "body",
    LUNG: "lung",
    LIVER: "liver",
    KIDNEY: "kidney",
    SPLEEN: "spleen",
    LESION: "lesion",
    BONE: "bone",
}

#: Organs a lesion may sit in.
LESION_HOSTS: tuple[int, ...] = (LIVER, LUNG, KIDNEY, SPLEEN)
_HOST_WEIGHTS = {LIVER: 0.45, LUNG: 0.25, KIDNEY: 0.15, SPLEEN: 0.15}

MIN_LESION_RADIUS_MM = 3.0
MAX_LESION_RADIUS_MM = 20.0
MAX_NODULE_RADIUS_MM = 15.0
MIN_LESION_VOXELS = 6  #: smaller clipped lesions are re-drawn
_PLACEMENT_ATTEMPTS = 5
HU_MIN, HU_MAX = -1024.0, 3071.0

_F32 = np.float32


@dataclass(frozen=True)
class LesionInfo:
    """One placed lesion (a connected region of :data:`LESION` voxels, unless lesions touch)."""

    host: int  #: label of the organ it sits in (LIVER, LUNG, KIDNEY or SPLEEN)
    center_mm: tuple[float, float, float]  #: nominal centre, physical LPS (x, y, z) mm
    radius_mm: float  #: nominal radius drawn (the actual shape is irregular and clipped)
    hu: float  #: mean lesion intensity before blur and noise
    contrast_hu: float  #: lesion minus host-organ intensity (negative: hypo-dense)
    n_voxels: int  #: voxels labelled for this lesion


@dataclass
class Phantom:
    """One synthetic CT case. Arrays are in numpy ``(z, y, x)`` order and have ``geometry.shape``."""

    case_id: str
    image: np.ndarray  #: float32, CT intensities in HU
    labels: np.ndarray  #: uint8 label map, values in LABEL_NAMES
    geometry: Geometry
    lesions: list[LesionInfo] = field(default_factory=list)  #: what was placed, in placement order

    @property
    def lesion_mask(self) -> np.ndarray:
        """Boolean ground-truth lesion mask."""
        return self.labels == LESION


# --------------------------------------------------------------------------------------------------
# geometric helpers (all coordinates in mm, numpy (z, y, x) order, measured from voxel index 0)

Box = tuple[slice, slice, slice]


def _upsample_linear(small: np.ndarray, factors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``small`` onto a grid ``factors`` times finer, cropped to ``shape``."""
    out = small
    for axis, (f, n) in enumerate(zip(factors, shape)):
        if f == 1:
            out = out[(slice(None),) * axis + (slice(0, n),)]
            continue
        pos = np.arange(n, dtype=np.float32) / _F32(f)
        i0 = np.floor(pos).astype(np.intp)
        w = (pos - i0).astype(np.float32)
        view = [1] * out.ndim
        view[axis] = -1
        w = w.reshape(view)
        out = np.take(out, i0, axis=axis) * (_F32(1.0) - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float,
                  spacing: np.ndarray) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation (float32).

    White noise is filtered on a grid coarsened by about ``sigma / 1.5`` voxels and linearly
    upsampled, which costs a fraction of filtering at full resolution.
    """
    sigma_vox = sigma_mm / np.asarray(spacing, dtype=float)
    factors = np.maximum(1, np.floor(sigma_vox / 1.5)).astype(int)
    small_shape = tuple(int(-(-n // f)) + 1 for n, f in zip(shape, factors))
    small = rng.standard_normal(small_shape, dtype=np.float32)
    small = ndimage.gaussian_filter(small, tuple(sigma_vox / factors), truncate=3.0, mode="wrap")
    out = _upsample_linear(small, factors, shape)
    std = float(out.std())
    if std > 0:
        out *= _F32(1.0 / std)
    return np.ascontiguousarray(out, dtype=np.float32)


def _rot_z(angle: float) -> np.ndarray:
    """Rotation in the axial (y, x) plane, in (z, y, x) coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _box(center: np.ndarray, half: np.ndarray | float, sp: np.ndarray, shape: tuple[int, ...]) -> Box | None:
    """Voxel slices covering ``center +- half`` (mm), clipped to the volume; None when empty."""
    lo = np.maximum(np.floor((center - half) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((center + half) / sp).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _union_box(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore


def _offsets(box: Box, center: np.ndarray, sp: np.ndarray) -> list[np.ndarray]:
    """Broadcastable (z, y, x) mm offsets from ``center`` for the voxels of ``box``."""
    out = []
    for axis, sl in enumerate(box):
        coords = np.arange(sl.start, sl.stop, dtype=np.float32) * _F32(sp[axis]) - _F32(center[axis])
        view = [1, 1, 1]
        view[axis] = -1
        out.append(coords.reshape(view))
    return out


def _ellipsoid(box: Box, center: np.ndarray, axes: np.ndarray, sp: np.ndarray,
               rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on ``box``; ``rotation`` columns = principal axes."""
    off = _offsets(box, center, sp)
    if rotation is None:
        return np.sqrt(sum((o / _F32(a)) ** 2 for o, a in zip(off, axes)))
    total = None
    for k in range(3):
        q = off[0] * _F32(rotation[0, k]) + off[1] * _F32(rotation[1, k]) + off[2] * _F32(rotation[2, k])
        term = (q / _F32(axes[k])) ** 2
        total = term if total is None else total + term
    return np.sqrt(total)


def _bbox(mask: np.ndarray, pad: int = 0) -> Box | None:
    """Bounding box of a mask (grown by ``pad`` voxels, clipped), or None when it is empty."""
    sl = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        sl.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(sl)  # type: ignore[return-value]


def _paint(image: np.ndarray, labels: np.ndarray, box: Box, mask: np.ndarray, value: np.ndarray | float,
           label: int | None) -> None:
    """Set ``image`` (and ``labels`` unless None) on ``mask`` within ``box``."""
    sub = image[box]
    if np.ndim(value) == 0:
        sub[mask] = value
    else:
        sub[mask] = np.broadcast_to(value, mask.shape)[mask]
    if label is not None:
        labels[box][mask] = label


def _validate(shape: tuple[int, ...], spacing: tuple[float, ...], n_lesions: object,
              empty_probability: float) -> tuple[int, int]:
    if len(shape) != 3 or any(int(s) != s or int(s) < 16 for s in shape):
        raise ConformalSegError(f"phantom shape must be three integers >= 16, got {shape}.",
                                fix="pass a shape such as (48, 96, 96) in numpy (z, y, x) order.")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ConformalSegError(f"phantom spacing must be three positive numbers, got {spacing}.",
                                fix="pass a spacing such as (1.6, 1.6, 3.0) in mm, ITK (x, y, z) order.")
    if not 0.0 <= float(empty_probability) <= 1.0:
        raise ConformalSegError(f"empty_probability must lie in [0, 1], got {empty_probability}.")
    if isinstance(n_lesions, (int, np.integer)) and not isinstance(n_lesions, bool):
        lo = hi = int(n_lesions)
    elif isinstance(n_lesions, (tuple, list)) and len(n_lesions) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_lesions):
        lo, hi = int(n_lesions[0]), int(n_lesions[1])
    else:
        lo, hi = -1, -1
    if not 0 <= lo <= hi:
        raise ConformalSegError(f"n_lesions must be a non-negative integer or an inclusive range (lo, hi) "
                                f"with 0 <= lo <= hi, got {n_lesions!r}.", fix="pass e.g. n_lesions=(1, 4).")
    return lo, hi


# --------------------------------------------------------------------------------------------------
# the generator


def make_phantom(seed: int | np.random.SeedSequence, *, shape: tuple[int, int, int] = (48, 96, 96),
                 spacing: tuple[float, float, float] = (1.6, 1.6, 3.0),
                 n_lesions: int | tuple[int, int] = (1, 4), empty_probability: float = 0.1,
                 case_id: str | None = None) -> Phantom:
    """Generate one synthetic CT phantom, deterministically from ``seed``.

    ``shape`` is in numpy ``(z, y, x)`` order, ``spacing`` in mm in ITK ``(x, y, z)`` order.
    ``n_lesions`` is a fixed count or an inclusive range ``(lo, hi)`` drawn uniformly; with
    probability ``empty_probability`` the case has no lesion at all. A lesion whose placement fails
    (no room in a tiny organ) is dropped, so :attr:`Phantom.lesions` may hold fewer. ``case_id``
    defaults to ``f"phantom_seed{seed}"``. The geometry is centred on the physical origin with the
    identity direction. Lesions are drawn after the anatomy, so the organ labels of a seed do not
    depend on ``n_lesions`` or ``empty_probability`` (outside the lesions; image noise does).
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    lo_n, hi_n = _validate(shape, spacing, n_lesions, empty_probability)
    nz, ny, nx = shape
    origin = (-0.5 * (nx - 1) * spacing[0], -0.5 * (ny - 1) * spacing[1], -0.5 * (nz - 1) * spacing[2])
    geometry = Geometry(shape=shape, spacing=spacing, origin=origin)  # type: ignore[arg-type]
    sp = np.array(geometry.spacing_zyx, dtype=float)
    rng = np.random.default_rng(seed)
    # always two draws, so the anatomy of a seed does not depend on the lesion options
    is_empty = bool(rng.random() < empty_probability)
    count = min(lo_n + int(rng.random() * (hi_n - lo_n + 1)), hi_n)
    if is_empty:
        count = 0

    H, D, W = (np.array(shape) - 1) * sp  # extent between first and last voxel centre, mm
    z1 = (np.arange(nz) * sp[0]).astype(np.float32)
    y2 = (np.arange(ny) * sp[1]).astype(np.float32)[:, None]
    x2 = (np.arange(nx) * sp[2]).astype(np.float32)[None, :]
    Z = z1[:, None, None]

    # ---- per-case appearance -------------------------------------------------------------------------
    phase = rng.uniform(-10.0, 22.0)  # contrast-phase offset (HU) of the enhancing organs
    fat_hu = rng.uniform(-110.0, -85.0)
    muscle_hu = rng.uniform(35.0, 50.0)
    liver_hu = rng.uniform(50.0, 66.0) + phase
    spleen_hu = rng.uniform(38.0, 52.0) + 1.1 * phase
    cortex_hu = rng.uniform(25.0, 35.0) + 1.6 * phase
    medulla_hu = cortex_hu - rng.uniform(5.0, 15.0)
    blood_hu = rng.uniform(35.0, 45.0) + 3.0 * phase
    lung_hu = rng.uniform(-880.0, -830.0)
    bone_hu = rng.uniform(230.0, 330.0)
    cortical_hu = rng.uniform(550.0, 750.0)
    noise_sigma = rng.uniform(8.0, 20.0)

    # ---- shared random fields ------------------------------------------------------------------------
    coarse = _smooth_noise(rng, shape, 7.0, sp)  # organ outlines, bowel pattern
    texture = _smooth_noise(rng, shape, 2.0, sp)  # tissue texture, lesion surfaces
    noise2d = _smooth_noise(rng, (1, ny, nx), 8.0, sp)[0]

    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # ---- body: superellipse cross-section, slightly varying along z ---------------------------------------
    cx = 0.5 * W + rng.uniform(-0.03, 0.03) * W
    cy = 0.5 * D + rng.uniform(-0.02, 0.04) * D
    ax = rng.uniform(0.40, 0.45) * W
    ay = rng.uniform(0.29, 0.35) * D
    t_fat = rng.uniform(0.04, 0.09) * ax
    t_muscle = rng.uniform(0.035, 0.06) * ax
    scale_z = (1.0 + rng.uniform(-0.05, 0.05) * (z1 / max(H, 1e-6) - 0.5)).astype(np.float32)[:, None, None]
    dx, dy = x2 - _F32(cx), y2 - _F32(cy)
    wobble = _F32(0.015) * noise2d

    def superellipse(a: float, b: float, p_front: float = 2.0, p_back: float = 2.6) -> np.ndarray:
        p = np.where(dy > 0, _F32(p_back), _F32(p_front))
        return (np.abs(dx / _F32(a)) ** p + np.abs(dy / _F32(b)) ** p) ** (_F32(1.0) / p) + wobble

    r_body = superellipse(ax, ay)
    r_fat = superellipse(ax - t_fat, ay - t_fat)
    r_cav = superellipse(ax - t_fat - t_muscle, ay - t_fat - t_muscle)
    body = r_body[None] < scale_z
    inner = r_fat[None] < scale_z
    axc, ayc = ax - t_fat - t_muscle, ay - t_fat - t_muscle  # cavity semi-axes

    # spine and paraspinal block (2D), excluded from the cavity
    rs = rng.uniform(0.085, 0.105) * ax  # vertebral-body radius
    ys = cy + ayc - 1.15 * rs  # vertebral-body centre, posterior
    xs = cx + rng.uniform(-0.02, 0.02) * ax
    r_vb = np.sqrt(((x2 - _F32(xs)) / _F32(rs)) ** 2 + ((y2 - _F32(ys)) / _F32(0.9 * rs)) ** 2)
    yc_canal = ys + 1.45 * rs
    r_canal = np.sqrt((x2 - _F32(xs)) ** 2 + (y2 - _F32(yc_canal)) ** 2) / _F32(0.5 * rs)
    r_arch = np.sqrt((x2 - _F32(xs)) ** 2 + (y2 - _F32(yc_canal)) ** 2) / _F32(0.85 * rs)
    spinous = (np.abs(x2 - _F32(xs)) < _F32(0.22 * rs)) & (y2 > _F32(yc_canal)) & (
        y2 < _F32(yc_canal + 2.2 * rs))
    paraspinal = ((((x2 - _F32(xs)) / _F32(2.3 * rs)) ** 2 + ((y2 - _F32(ys + 2.0 * rs)) / _F32(1.5 * rs)) ** 2)
                  < 1.0)
    spine_block = (r_vb < 1.25) | (r_arch < 1.2) | paraspinal | spinous
    cavity2d = r_cav
    cavity = (cavity2d[None] < scale_z) & ~spine_block[None]

    # great vessels (2D cross-sections): aorta left-anterior of the spine, vena cava to its right
    ra = rng.uniform(0.045, 0.06) * ax
    aorta2d = ((x2 - _F32(xs + 0.9 * rs)) ** 2 + (y2 - _F32(ys - 1.35 * rs)) ** 2) < _F32(ra * ra)
    ivc2d = (((x2 - _F32(xs - 1.5 * rs)) / _F32(1.2 * ra)) ** 2
             + ((y2 - _F32(ys - 1.5 * rs)) / _F32(0.9 * ra)) ** 2) < 1.0
    vessels2d = aorta2d | ivc2d

    body_img = np.where(inner, _F32(muscle_hu) + _F32(6.0) * texture, _F32(fat_hu) + _F32(8.0) * texture)
    image[body] = body_img[body]
    labels[body] = BODY

    # ---- diaphragm domes (right higher) and lungs --------------------------------------------------------
    zd_r = rng.uniform(0.50, 0.62) * H
    zd_l = zd_r - rng.uniform(0.0, 0.06) * H
    recess = rng.uniform(0.10, 0.18) * H  # costophrenic recesses reach this far below the dome
    lung_cx = 0.52 * axc * rng.uniform(0.92, 1.05)
    lung_ax = 0.47 * axc * rng.uniform(0.9, 1.05)
    lung_ay = 0.88 * ayc * rng.uniform(0.92, 1.05)
    lung_cy = cy + 0.05 * ayc
    domes = {}
    lung2d = np.zeros((ny, nx), dtype=bool)
    for side, zd in ((-1, zd_r), (1, zd_l)):  # -1: patient right (small x)
        rho2 = ((x2 - _F32(cx + side * lung_cx)) / _F32(lung_ax)) ** 2 + ((y2 - _F32(lung_cy)) / _F32(lung_ay)) ** 2
        domes[side] = _F32(zd) - _F32(recess) * np.minimum(rho2, _F32(1.5))  # floor of the lung, mm
        lung2d |= (rho2 + _F32(0.08) * noise2d) < 1.0
    dome_floor = np.where(x2 < _F32(cx), domes[-1], domes[1])  # diaphragm height per (y, x)
    thorax = Z > dome_floor[None]

    # heart: mediastinum, anterior, just above the diaphragm
    heart_c = np.array([zd_l + rng.uniform(0.1, 0.2) * H, cy - 0.3 * ayc, cx + 0.12 * axc])
    heart_axes = np.array([rng.uniform(0.2, 0.26) * H, 0.45 * ayc, 0.32 * axc])
    heart_rot = _rot_z(rng.uniform(0.3, 0.7))
    heart_box = _box(heart_c, heart_axes.max(), sp, shape)

    lung = cavity & thorax & (lung2d & ~vessels2d)[None] & (Z > dome_floor[None] + _F32(2.5))
    mediastinum = cavity & thorax & ~lung
    image[mediastinum] = (_F32(fat_hu + 15.0) + _F32(10.0) * texture)[mediastinum]
    if heart_box is not None:
        heart = (_ellipsoid(heart_box, heart_c, heart_axes, sp, heart_rot) < 1.0) & cavity[heart_box]
        lung[heart_box] &= ~heart
        _paint(image, labels, heart_box, heart, _F32(blood_hu - 5.0) + _F32(5.0) * texture[heart_box], BODY)

    # ---- abdomen: fat and bowel mixture, rare gas ---------------------------------------------------------
    abdomen = cavity & ~thorax
    bowel_hu = rng.uniform(20.0, 45.0)
    threshold = rng.uniform(-0.4, 0.3)
    w_bowel = special.expit((coarse - _F32(threshold)) * _F32(5.0))
    filler = _F32(fat_hu + 10.0) + w_bowel * _F32(bowel_hu - fat_hu - 10.0) + _F32(6.0) * texture
    gas = (coarse > _F32(threshold + rng.uniform(1.8, 3.0))) & (texture > 0.5)
    filler[gas] = -900.0
    image[abdomen] = filler[abdomen]
    aorta = aorta2d[None] & cavity & ~lung
    image[aorta] = blood_hu
    ivc = ivc2d[None] & abdomen
    image[ivc] = blood_hu - 0.4 * (blood_hu - 40.0)

    # ---- lungs with vessel texture ------------------------------------------------------------------------
    lung_box = _bbox(lung)
    if lung_box is not None:
        lshape = tuple(s.stop - s.start for s in lung_box)
        xl = (np.arange(lung_box[2].start, lung_box[2].stop, dtype=np.float32) * _F32(sp[2]))[None, None, :]
        hilum = np.clip(_F32(1.2) - _F32(1.1) * np.abs(xl - _F32(cx)) / _F32(axc), 0.0, 1.0)
        vessel = None
        # vessels: where two independent smooth fields are both near zero (curves), at two scales;
        # the wide ones fade towards the periphery
        for sigma_mm, width, weight in ((5.0, 0.28, hilum), (2.5, 0.18, _F32(0.3) + _F32(0.5) * hilum)):
            n1 = _smooth_noise(rng, lshape, sigma_mm, sp)
            n2 = _smooth_noise(rng, lshape, sigma_mm, sp)
            w = _F32(width * rng.uniform(0.8, 1.2))
            tube = np.exp(-(n1 * n1 + n2 * n2) / (_F32(2.0) * w * w)) * weight
            vessel = tube if vessel is None else np.maximum(vessel, tube)
        lung_img = _F32(lung_hu) + _F32(15.0) * texture[lung_box] + vessel * _F32(blood_hu - lung_hu)
        _paint(image, labels, lung_box, lung[lung_box], lung_img, LUNG)

    # ---- liver: right lobe + left lobe, dome under the right lung --------------------------------------------
    diaphragm = _F32(rng.uniform(2.5, 4.5))  # mm of muscle between lung and the organs below
    below = (Z < dome_floor[None] - diaphragm) & cavity & ~vessels2d[None]
    r_lobe = np.array([0.0, 0.78 * ayc, 0.55 * axc]) * rng.uniform(0.9, 1.1, 3)
    r_lobe[0] = rng.uniform(0.30, 0.38) * H
    c_right = np.array([zd_r - 0.45 * r_lobe[0], cy + rng.uniform(-0.05, 0.08) * ayc, cx - 0.45 * axc])
    l_lobe = np.array([0.55 * r_lobe[0], 0.4 * ayc, rng.uniform(0.35, 0.5) * axc])
    c_left = np.array([zd_r - 0.3 * l_lobe[0] - 0.1 * r_lobe[0], cy - 0.4 * ayc, cx + 0.05 * axc])
    rot_liver = _rot_z(rng.uniform(-0.25, 0.25))
    liver_box = _union_box(_box(c_right, r_lobe.max() * 1.1, sp, shape), _box(c_left, l_lobe.max() * 1.1, sp, shape))
    if liver_box is not None:
        f = np.minimum(_ellipsoid(liver_box, c_right, r_lobe, sp, rot_liver),
                       _ellipsoid(liver_box, c_left, l_lobe, sp, rot_liver))
        liver = ((f + _F32(0.07) * coarse[liver_box]) < 1.0) & below[liver_box]
        _paint(image, labels, liver_box, liver, _F32(liver_hu) + _F32(4.0) * texture[liver_box], LIVER)
        # hepatic veins / portal branches: faint tubular texture
        veins = liver & (np.abs(coarse[liver_box][::-1, ::-1]) < 0.08)
        image[liver_box][veins] += _F32(rng.uniform(-15.0, 25.0))

    # ---- spleen: left, posterior, under the left dome ------------------------------------------------------
    s_axes = np.array([rng.uniform(0.11, 0.16) * H, 0.38 * ayc, 0.2 * axc]) * rng.uniform(0.85, 1.15, 3)
    s_c = np.array([zd_l - 0.6 * s_axes[0] - rng.uniform(0.0, 0.04) * H, cy + 0.35 * ayc, cx + 0.62 * axc])
    s_box = _box(s_c, s_axes.max() * 1.1, sp, shape)
    if s_box is not None:
        f = _ellipsoid(s_box, s_c, s_axes, sp, _rot_z(rng.uniform(-0.8, -0.3)))
        spleen = ((f + _F32(0.06) * coarse[s_box]) < 1.0) & below[s_box]
        _paint(image, labels, s_box, spleen, _F32(spleen_hu) + _F32(4.0) * texture[s_box], SPLEEN)

    # ---- kidneys: posterior, beside the spine, the right one lower -------------------------------------------
    k_z = rng.uniform(0.18, 0.3) * H
    for side in (-1, 1):
        k_axes = np.array([rng.uniform(0.13, 0.18) * H, 0.24 * ayc, 0.16 * axc]) * rng.uniform(0.9, 1.1, 3)
        k_c = np.array([k_z - (rng.uniform(0.0, 0.06) * H if side < 0 else 0.0),
                        ys - rng.uniform(0.2, 0.6) * rs, xs + side * (rs + 1.25 * k_axes[2])])
        yaw, tilt = side * rng.uniform(0.2, 0.5), side * rng.uniform(0.05, 0.2)  # in-plane, coronal
        c, s = math.cos(tilt), math.sin(tilt)
        k_rot = _rot_z(yaw) @ np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])
        k_box = _box(k_c, k_axes.max() * 1.1, sp, shape)
        if k_box is None:
            continue
        f = _ellipsoid(k_box, k_c, k_axes, sp, k_rot) + _F32(0.04) * texture[k_box]
        kidney = (f < 1.0) & below[k_box]
        hilum_c = k_c + np.array([0.0, -0.35 * k_axes[1], -side * 0.85 * k_axes[2]])
        sinus = kidney & (_ellipsoid(k_box, hilum_c, k_axes * np.array([0.45, 0.45, 0.55]), sp) < 1.0)
        parenchyma = kidney & ~sinus
        kidney_img = np.where(f > 0.7, _F32(cortex_hu), _F32(medulla_hu)) + _F32(4.0) * texture[k_box]
        _paint(image, labels, k_box, parenchyma, kidney_img, KIDNEY)
        _paint(image, labels, k_box, sinus, _F32(fat_hu + 20.0) + _F32(8.0) * texture[k_box], BODY)

    # ---- bone: spine (vertebral bodies with discs, arch, spinous process) and ribs -------------------------
    period = rng.uniform(0.09, 0.12) * H
    disc = ((z1 + _F32(rng.uniform(0.0, period))) % _F32(period)) < _F32(max(0.2 * period, 2.0))
    vb2d = r_vb < 1.0
    cortex2d = vb2d & (r_vb > 0.8)
    arch2d = ((r_arch < 1.0) & (r_canal >= 1.0) & (y2 > _F32(ys))) | spinous
    bone_slice = np.where(cortex2d | arch2d, _F32(cortical_hu), _F32(bone_hu))
    bone3 = (vb2d | arch2d)[None] & body
    disc3 = disc[:, None, None] & vb2d[None] & body
    bone3 &= ~disc3
    image[bone3] = (bone_slice[None] + _F32(15.0) * texture)[bone3]
    labels[bone3] = BONE
    image[disc3] = (_F32(80.0) + _F32(6.0) * texture)[disc3]
    labels[disc3] = BODY
    canal = (r_canal < 1.0)[None] & body
    image[canal] = 15.0
    labels[canal] = BODY

    # ribs: oblique bands through the chest wall, in the upper part
    theta = np.arctan2(dx / _F32(axc), dy / _F32(ayc))  # 0 posterior, +-pi anterior
    rib_t = rng.uniform(0.025, 0.035) * ax  # radial half-thickness, mm
    r_rib = superellipse(axc + rib_t, ayc + rib_t)
    ring = (np.abs(r_rib - _F32(1.0)) < _F32(rib_t / axc)) & (np.abs(theta) < 2.4) & (np.abs(theta) > 0.35)
    rib_period = rng.uniform(0.11, 0.15) * H
    rib_width = max(0.35 * rib_period, 1.2 * sp[0])
    slope = rng.uniform(0.06, 0.1) * H  # ribs descend anteriorly
    rib_phase = (Z + _F32(slope) * np.abs(theta)[None] + _F32(rng.uniform(0.0, rib_period))) % _F32(rib_period)
    ribs = ring[None] & (rib_phase < _F32(rib_width)) & (Z > _F32(rng.uniform(0.25, 0.4) * H)) & body
    image[ribs] = (_F32(0.5 * (bone_hu + cortical_hu)) + _F32(20.0) * texture)[ribs]
    labels[ribs] = BONE

    # ---- lesions -------------------------------------------------------------------------------------------
    host_hu = {LIVER: liver_hu, SPLEEN: spleen_hu, KIDNEY: cortex_hu, LUNG: lung_hu}
    lesions = _place_lesions(rng, count, image, labels, texture, host_hu, sp, geometry)

    # ---- image formation: partial-volume blur, CT-like noise -------------------------------------------------
    psf_mm = np.array([rng.uniform(0.8, 1.5), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
    image = ndimage.gaussian_filter(image, tuple(psf_mm / sp), truncate=2.5, mode="nearest")
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.45, 0.45), truncate=2.5, mode="wrap")
    noise *= _F32(noise_sigma / max(float(noise.std()), 1e-6))
    image += noise
    np.clip(image, HU_MIN, HU_MAX, out=image)

    return Phantom(
        case_id=case_id if case_id is not None else f"phantom_seed{seed}",
        image=np.ascontiguousarray(image, dtype=np.float32),
        labels=np.ascontiguousarray(labels, dtype=np.uint8),
        geometry=geometry,
        lesions=lesions,
    )


def _place_lesions(rng: np.random.Generator, count: int, image: np.ndarray, labels: np.ndarray,
                   texture: np.ndarray, host_hu: dict[int, float], sp: np.ndarray,
                   geometry: Geometry) -> list[LesionInfo]:
    """Draw ``count`` lesions into ``image``/``labels`` (in place); return what was placed.

    A lesion that the host organ's edge clips to a sliver (fewer than :data:`MIN_LESION_VOXELS` or
    a quarter of its nominal volume) is re-drawn, up to :data:`_PLACEMENT_ATTEMPTS` times.
    """
    shape = labels.shape
    voxel_mm3 = float(np.prod(sp))
    depth_cache: dict[int, tuple[Box, np.ndarray]] = {}
    viable = list(LESION_HOSTS)

    def host_depth(host: int) -> tuple[Box, np.ndarray] | None:
        """Inner depth (mm to the organ boundary) of the host organ on its bounding box; None when
        the organ cannot hold the smallest lesion."""
        if host not in depth_cache:
            box = _bbox(labels == host, pad=1)
            if box is None:
                return None
            depth = ndimage.distance_transform_edt(labels[box] == host, sampling=sp).astype(np.float32)
            if float(depth.max()) < 0.8 * MIN_LESION_RADIUS_MM:
                return None
            depth_cache[host] = (box, depth)
        return depth_cache[host]

    placed: list[LesionInfo] = []
    centres: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            hd = None
            while viable and hd is None:
                weights = np.array([_HOST_WEIGHTS[h] for h in viable])
                host = viable[int(rng.choice(len(viable), p=weights / weights.sum()))]
                hd = host_depth(host)
                if hd is None:
                    viable.remove(host)
            if hd is None:
                return placed
            hbox, depth = hd
            max_depth = float(depth.max())
            r_max = MAX_NODULE_RADIUS_MM if host == LUNG else MAX_LESION_RADIUS_MM
            r_cap = max(MIN_LESION_RADIUS_MM, min(r_max, 0.9 * max_depth))
            radius = float(math.exp(rng.uniform(math.log(MIN_LESION_RADIUS_MM), math.log(r_cap))))
            # the depth map is of the organ before any lesion: lesions already placed are avoided below
            candidates = np.flatnonzero(depth >= min(0.6 * radius, 0.9 * max_depth))
            start = np.array([s.start for s in hbox])
            idx = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape)) + start
            centre = (idx + rng.uniform(-0.5, 0.5, 3)) * sp
            if any(np.linalg.norm(centre - c2) < 0.9 * (radius + r2) + 2.0 for c2, r2 in centres):
                continue
            box = _box(centre, 1.6 * radius + sp.max(), sp, shape)
            if box is None:
                continue
            axes = radius * rng.uniform(0.7, 1.3, 3)
            field_ = _ellipsoid(box, centre, axes, sp, random_rotation(rng))
            for _lobe in range(int(rng.integers(0, 3))):
                direction = rng.standard_normal(3)
                direction /= np.linalg.norm(direction)
                lobe_c = centre + direction * radius * rng.uniform(0.35, 0.65)
                lobe = _ellipsoid(box, lobe_c, radius * rng.uniform(0.4, 0.65, 3), sp, random_rotation(rng))
                field_ = np.minimum(field_, lobe)
            field_ = field_ + _F32(rng.uniform(0.08, 0.22)) * texture[box]
            blob = (field_ < 1.0) & (labels[box] == host)
            parts, n_parts = ndimage.label(blob)
            if n_parts == 0:
                continue
            if n_parts > 1:
                blob = parts == (int(np.argmax(np.bincount(parts.ravel())[1:])) + 1)
            n_vox = int(blob.sum())
            nominal = 4.0 / 3.0 * math.pi * float(np.prod(axes)) / voxel_mm3
            if n_vox < max(MIN_LESION_VOXELS, 0.25 * nominal):
                continue
            if host == LUNG:
                hu = rng.uniform(0.0, 40.0)
                lesion_img = _F32(hu) + _F32(6.0) * texture[box]
            else:
                hu = host_hu[host] - rng.uniform(10.0, 50.0)
                lesion_img = _F32(hu) + _F32(4.0) * texture[box][::-1]
                if radius > 10.0 and rng.random() < 0.6:  # necrotic core
                    lesion_img = lesion_img - _F32(rng.uniform(5.0, 20.0)) * (field_ < 0.55)
            _paint(image, labels, box, blob, lesion_img, LESION)
            centres.append((centre, radius))
            phys = geometry.ijk_to_lps() @ np.append((centre / sp)[::-1], 1.0)
            placed.append(LesionInfo(host=host, center_mm=tuple(float(v) for v in phys[:3]), radius_mm=radius,
                                     hu=float(hu), contrast_hu=float(hu - host_hu[host]), n_voxels=n_vox))
            break
    return placed


# --------------------------------------------------------------------------------------------------
# many phantoms, dataset on disk


def phantom_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of phantom ``index`` of :func:`make_phantoms`: an independent ``SeedSequence`` stream."""
    return np.random.SeedSequence(int(seed), spawn_key=(int(index),))


def make_phantoms(n: int, seed: int = 0, **kw) -> Iterator[Phantom]:
    """Yield ``n`` independent phantoms ``phantom_000``, ``phantom_001``, ...

    Phantom ``i`` is ``make_phantom(phantom_seed(seed, i), **kw)``; keyword arguments go to
    :func:`make_phantom`.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConformalSegError(f"the number of phantoms must be a non-negative integer, got {n}.")
    width = max(3, len(str(int(n) - 1)))
    for i in range(int(n)):
        yield make_phantom(phantom_seed(seed, i), case_id=f"phantom_{i:0{width}d}", **kw)


def dataset_json(n: int, *, seed: int = 0, options: dict | None = None) -> dict:
    """The nnU-Net v2 ``dataset.json`` of a phantom dataset of ``n`` cases."""
    return {
        "name": "ConformalSegPhantoms",
        "description": "Deterministic synthetic abdominal/thoracic CT phantoms (ConformalSegLib.phantoms.generator)",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in sorted(LABEL_NAMES.items())},
        "numTraining": int(n),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "phantom": {"seed": int(seed), "lesion_label": LESION, "options": options or {}},
    }


def write_phantom_dataset(out_dir: str | PathLike[str], n: int, seed: int = 0, *, force: bool = False,
                          progress: Callable[[int, int, str], None] | None = None,
                          image_dtype: str = "int16", **kw) -> Path:
    """Generate ``n`` phantoms and write them in the nnU-Net v2 raw layout; return ``out_dir``.

    ``out_dir/imagesTr/CASE_0000.nii.gz`` (HU; ``image_dtype`` ``"int16"``, rounded, or
    ``"float32"``), ``out_dir/labelsTr/CASE.nii.gz`` (uint8, :data:`LABEL_NAMES`) and
    ``out_dir/dataset.json``. Every file is written atomically; nothing is written when any output
    already exists, unless ``force``. ``progress(done, n, case_id)`` is called after each case;
    other keyword arguments go to :func:`make_phantom`.
    """
    if image_dtype not in ("int16", "float32"):
        raise ConformalSegError(f"image_dtype must be 'int16' or 'float32', got {image_dtype!r}.")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConformalSegError(f"the number of phantoms must be a non-negative integer, got {n}.")
    n = int(n)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConformalSegError("output path is an existing file, not a folder", path=out,
                                fix="give a folder name")
    width = max(3, len(str(n - 1)))
    ids = [f"phantom_{i:0{width}d}" for i in range(n)]
    targets = [out / "dataset.json"]
    for cid in ids:
        targets += [out / "imagesTr" / f"{cid}_0000.nii.gz", out / "labelsTr" / f"{cid}.nii.gz"]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise ConformalSegError(f"output file already exists{more}", path=existing[0], fix=OVERWRITE_FIX)
    # validate the options (and fail early) before writing anything
    _validate(tuple(kw.get("shape", (48, 96, 96))), tuple(kw.get("spacing", (1.6, 1.6, 3.0))),
              kw.get("n_lesions", (1, 4)), kw.get("empty_probability", 0.1))
    for done, phantom in enumerate(make_phantoms(n, seed=seed, **kw), start=1):
        image = phantom.image
        if image_dtype == "int16":
            image = np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
        save_volume(image, phantom.geometry, out / "imagesTr" / f"{phantom.case_id}_0000.nii.gz", force=force)
        save_volume(phantom.labels, phantom.geometry, out / "labelsTr" / f"{phantom.case_id}.nii.gz", force=force)
        if progress is not None:
            progress(done, n, phantom.case_id)
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    text = json.dumps(dataset_json(n, seed=seed, options=options), indent=2) + "\n"
    with atomic_output(out / "dataset.json", force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
