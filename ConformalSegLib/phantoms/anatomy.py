"""The phantom's anatomy: tissue intensities, body wall, spine, thorax, abdomen and organs.

Everything is computed in millimetres, so anisotropic spacing is respected. The default field of
view (96 x 96 x 48 voxels of 1.6 x 1.6 x 3.0 mm, 154 x 154 x 144 mm) is far smaller than an adult
abdomen, so the anatomy is scaled to the field of view (a torso filling about 85% of the width).

* air (-1000 HU) around an elliptic body (superellipse cross-section, flatter back), with a
  subcutaneous fat layer (~ -100 HU) and a muscle wall (~ 40 HU), thicker paraspinal muscles;
* spine (~ 400 HU: cancellous core, denser cortex, intervertebral discs, posterior arch) and
  oblique ribs in the upper part (label :data:`~.labels.BONE`);
* two lungs (~ -850 HU with branching-vessel-like texture, denser near the hila) in the upper z
  part, above two diaphragm domes (the right one higher) with costophrenic recesses; heart and
  mediastinal fat between them;
* liver (~ 60 HU, right lobe plus a left lobe crossing the midline, its dome under the right
  lung), spleen (~ 45 HU, left, posterior), two kidneys (~ 30 HU cortex, darker medulla, fatty
  hilum; posterior, beside the spine, the right one lower), aorta and vena cava;
* abdominal filler: a smooth mixture of mesenteric fat and bowel-like soft tissue, rare gas.

Per case the body and organ sizes, positions, rotations and outlines vary, and a contrast-phase
offset shifts the enhancing organs (liver, spleen, kidneys x1.6, vessels x3) together.

:func:`draw_anatomy` runs the steps in a fixed order, each drawing from the one random generator:
the order of the draws is part of the phantom's definition (a seed gives bit-identical output), so
a step must never draw before the steps above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from .labels import BODY, BONE, KIDNEY, LIVER, LUNG, SPLEEN
from .shapes import F32, bbox, box, ellipsoid, paint, rot_z, smooth_noise, union_box

__all__ = ["Anatomy", "Appearance", "draw_anatomy"]


@dataclass(frozen=True)
class Appearance:
    """Per-case intensities (HU) of the tissues, and the image noise level."""

    phase: float  #: contrast-phase offset (HU) of the enhancing organs
    fat_hu: float
    muscle_hu: float
    liver_hu: float
    spleen_hu: float
    cortex_hu: float
    medulla_hu: float
    blood_hu: float
    lung_hu: float
    bone_hu: float
    cortical_hu: float
    noise_sigma: float  #: image noise (HU), used by :mod:`.imaging`

    @property
    def host_hu(self) -> dict[int, float]:
        """Intensity of each organ a lesion may sit in (the lesion contrast is relative to it)."""
        return {LIVER: self.liver_hu, SPLEEN: self.spleen_hu, KIDNEY: self.cortex_hu, LUNG: self.lung_hu}


@dataclass
class Anatomy:
    """What :func:`draw_anatomy` returns: the noise-free image, the label map and what lesions need."""

    image: np.ndarray  #: float32 HU, piecewise smooth (no blur, no noise yet)
    labels: np.ndarray  #: uint8, values of :mod:`.labels`
    appearance: Appearance
    texture: np.ndarray  #: the fine random field (tissue texture; lesion surfaces)


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm) of the volume and its extent."""

    shape: tuple[int, int, int]
    sp: np.ndarray  #: (z, y, x) spacing
    H: float  #: z extent between the first and last voxel centre, mm
    D: float  #: y extent
    W: float  #: x extent
    z1: np.ndarray  #: (nz,) float32
    y2: np.ndarray  #: (ny, 1)
    x2: np.ndarray  #: (1, nx)

    @classmethod
    def of(cls, shape: tuple[int, int, int], sp: np.ndarray) -> _Grid:
        nz, ny, nx = shape
        H, D, W = (np.array(shape) - 1) * sp  # extent between first and last voxel centre, mm
        z1 = (np.arange(nz) * sp[0]).astype(np.float32)
        y2 = (np.arange(ny) * sp[1]).astype(np.float32)[:, None]
        x2 = (np.arange(nx) * sp[2]).astype(np.float32)[None, :]
        return cls(shape, sp, H, D, W, z1, y2, x2)

    @property
    def Z(self) -> np.ndarray:  # noqa: N802 (the z coordinate, broadcast over (z, y, x))
        return self.z1[:, None, None]


@dataclass(frozen=True)
class _Fields:
    """Smooth random fields shared by the steps (unit standard deviation, float32)."""

    coarse: np.ndarray  #: organ outlines, bowel pattern
    texture: np.ndarray  #: tissue texture, lesion surfaces
    noise2d: np.ndarray  #: (ny, nx): body and lung outlines


@dataclass(frozen=True)
class _Outline:
    """Offsets (mm) from the body centre in the axial plane, and the outline noise."""

    dx: np.ndarray  #: (1, nx)
    dy: np.ndarray  #: (ny, 1)
    wobble: np.ndarray  #: (ny, nx)

    def superellipse(self, a: float, b: float, p_front: float = 2.0, p_back: float = 2.6) -> np.ndarray:
        """Normalised superellipse radius around the body centre (flatter at the back), with the outline noise."""
        p = np.where(self.dy > 0, F32(p_back), F32(p_front))
        return (np.abs(self.dx / F32(a)) ** p + np.abs(self.dy / F32(b)) ** p) ** (F32(1.0) / p) + self.wobble


@dataclass
class _Torso:
    """The body cross-section, its cavity, the spine and the great vessels."""

    cx: float
    cy: float
    ax: float
    axc: float  #: cavity semi-axes
    ayc: float
    outline: _Outline
    body: np.ndarray  #: 3D bool
    cavity: np.ndarray  #: 3D bool: inside the muscle wall, outside the spine block
    rs: float  #: vertebral-body radius
    xs: float  #: vertebral-body centre
    ys: float
    r_vb: np.ndarray
    r_canal: np.ndarray
    r_arch: np.ndarray
    spinous: np.ndarray
    aorta2d: np.ndarray
    ivc2d: np.ndarray

    @property
    def vessels2d(self) -> np.ndarray:
        return self.aorta2d | self.ivc2d


@dataclass
class _Thorax:
    """The diaphragm and the chest cavity above it."""

    zd_r: float  #: right dome height, mm
    zd_l: float  #: left dome height
    dome_floor: np.ndarray  #: (ny, nx) diaphragm height
    thorax: np.ndarray  #: 3D bool: above the diaphragm
    lung: np.ndarray  #: 3D bool: the lung mask (before its texture is painted)


def draw_anatomy(rng: np.random.Generator, shape: tuple[int, int, int], sp: np.ndarray) -> Anatomy:
    """Draw the anatomy of one phantom (module docstring), step by step in a fixed order."""
    grid = _Grid.of(shape, sp)
    appearance = _draw_appearance(rng)
    fields = _Fields(
        smooth_noise(rng, shape, 7.0, sp),
        smooth_noise(rng, shape, 2.0, sp),
        smooth_noise(rng, (1, shape[1], shape[2]), 8.0, sp)[0],
    )
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    torso = _draw_torso(rng, grid, fields, appearance, image, labels)
    thorax = _draw_thorax(rng, grid, fields, appearance, torso, image, labels)
    _paint_abdomen(rng, fields, appearance, torso, thorax, image)
    _paint_lungs(rng, grid, fields, appearance, torso, thorax, image, labels)
    diaphragm = F32(rng.uniform(2.5, 4.5))  # mm of muscle between lung and the organs below
    below = (grid.Z < thorax.dome_floor[None] - diaphragm) & torso.cavity & ~torso.vessels2d[None]
    _draw_liver(rng, grid, fields, appearance, torso, thorax, below, image, labels)
    _draw_spleen(rng, grid, fields, appearance, torso, thorax, below, image, labels)
    _draw_kidneys(rng, grid, fields, appearance, torso, below, image, labels)
    _draw_bone(rng, grid, fields, appearance, torso, image, labels)
    return Anatomy(image, labels, appearance, fields.texture)


def _draw_appearance(rng: np.random.Generator) -> Appearance:
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
    return Appearance(
        phase,
        fat_hu,
        muscle_hu,
        liver_hu,
        spleen_hu,
        cortex_hu,
        medulla_hu,
        blood_hu,
        lung_hu,
        bone_hu,
        cortical_hu,
        noise_sigma,
    )


def _draw_torso(
    rng: np.random.Generator, grid: _Grid, fields: _Fields, app: Appearance, image: np.ndarray, labels: np.ndarray
) -> _Torso:
    """Body (superellipse cross-section, slightly varying along z), wall, spine block and great vessels."""
    H, D, W, z1, y2, x2 = grid.H, grid.D, grid.W, grid.z1, grid.y2, grid.x2
    cx = 0.5 * W + rng.uniform(-0.03, 0.03) * W
    cy = 0.5 * D + rng.uniform(-0.02, 0.04) * D
    ax = rng.uniform(0.40, 0.45) * W
    ay = rng.uniform(0.29, 0.35) * D
    t_fat = rng.uniform(0.04, 0.09) * ax
    t_muscle = rng.uniform(0.035, 0.06) * ax
    scale_z = (1.0 + rng.uniform(-0.05, 0.05) * (z1 / max(H, 1e-6) - 0.5)).astype(np.float32)[:, None, None]
    outline = _Outline(x2 - F32(cx), y2 - F32(cy), F32(0.015) * fields.noise2d)
    r_body = outline.superellipse(ax, ay)
    r_fat = outline.superellipse(ax - t_fat, ay - t_fat)
    r_cav = outline.superellipse(ax - t_fat - t_muscle, ay - t_fat - t_muscle)
    body = r_body[None] < scale_z
    inner = r_fat[None] < scale_z
    axc, ayc = ax - t_fat - t_muscle, ay - t_fat - t_muscle  # cavity semi-axes

    # spine and paraspinal block (2D), excluded from the cavity
    rs = rng.uniform(0.085, 0.105) * ax  # vertebral-body radius
    ys = cy + ayc - 1.15 * rs  # vertebral-body centre, posterior
    xs = cx + rng.uniform(-0.02, 0.02) * ax
    r_vb = np.sqrt(((x2 - F32(xs)) / F32(rs)) ** 2 + ((y2 - F32(ys)) / F32(0.9 * rs)) ** 2)
    yc_canal = ys + 1.45 * rs
    r_canal = np.sqrt((x2 - F32(xs)) ** 2 + (y2 - F32(yc_canal)) ** 2) / F32(0.5 * rs)
    r_arch = np.sqrt((x2 - F32(xs)) ** 2 + (y2 - F32(yc_canal)) ** 2) / F32(0.85 * rs)
    spinous = (np.abs(x2 - F32(xs)) < F32(0.22 * rs)) & (y2 > F32(yc_canal)) & (y2 < F32(yc_canal + 2.2 * rs))
    paraspinal = (((x2 - F32(xs)) / F32(2.3 * rs)) ** 2 + ((y2 - F32(ys + 2.0 * rs)) / F32(1.5 * rs)) ** 2) < 1.0
    spine_block = (r_vb < 1.25) | (r_arch < 1.2) | paraspinal | spinous
    cavity = (r_cav[None] < scale_z) & ~spine_block[None]

    # great vessels (2D cross-sections): aorta left-anterior of the spine, vena cava to its right
    ra = rng.uniform(0.045, 0.06) * ax
    aorta2d = ((x2 - F32(xs + 0.9 * rs)) ** 2 + (y2 - F32(ys - 1.35 * rs)) ** 2) < F32(ra * ra)
    ivc2d = (((x2 - F32(xs - 1.5 * rs)) / F32(1.2 * ra)) ** 2 + ((y2 - F32(ys - 1.5 * rs)) / F32(0.9 * ra)) ** 2) < 1.0

    body_img = np.where(
        inner, F32(app.muscle_hu) + F32(6.0) * fields.texture, F32(app.fat_hu) + F32(8.0) * fields.texture
    )
    image[body] = body_img[body]
    labels[body] = BODY
    return _Torso(
        cx, cy, ax, axc, ayc, outline, body, cavity, rs, xs, ys, r_vb, r_canal, r_arch, spinous, aorta2d, ivc2d
    )


def _draw_thorax(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    image: np.ndarray,
    labels: np.ndarray,
) -> _Thorax:
    """Diaphragm domes (right higher), the lung masks above them, mediastinal fat and the heart."""
    H, y2, x2, Z = grid.H, grid.y2, grid.x2, grid.Z
    cx, cy, axc, ayc = torso.cx, torso.cy, torso.axc, torso.ayc
    zd_r = rng.uniform(0.50, 0.62) * H
    zd_l = zd_r - rng.uniform(0.0, 0.06) * H
    recess = rng.uniform(0.10, 0.18) * H  # costophrenic recesses reach this far below the dome
    lung_cx = 0.52 * axc * rng.uniform(0.92, 1.05)
    lung_ax = 0.47 * axc * rng.uniform(0.9, 1.05)
    lung_ay = 0.88 * ayc * rng.uniform(0.92, 1.05)
    lung_cy = cy + 0.05 * ayc
    domes = {}
    lung2d = np.zeros(grid.shape[1:], dtype=bool)
    for side, zd in ((-1, zd_r), (1, zd_l)):  # -1: patient right (small x)
        rho2 = ((x2 - F32(cx + side * lung_cx)) / F32(lung_ax)) ** 2 + ((y2 - F32(lung_cy)) / F32(lung_ay)) ** 2
        domes[side] = F32(zd) - F32(recess) * np.minimum(rho2, F32(1.5))  # floor of the lung, mm
        lung2d |= (rho2 + F32(0.08) * fields.noise2d) < 1.0
    dome_floor = np.where(x2 < F32(cx), domes[-1], domes[1])  # diaphragm height per (y, x)
    thorax = Z > dome_floor[None]

    # heart: mediastinum, anterior, just above the diaphragm
    heart_c = np.array([zd_l + rng.uniform(0.1, 0.2) * H, cy - 0.3 * ayc, cx + 0.12 * axc])
    heart_axes = np.array([rng.uniform(0.2, 0.26) * H, 0.45 * ayc, 0.32 * axc])
    heart_rot = rot_z(rng.uniform(0.3, 0.7))
    heart_box = box(heart_c, heart_axes.max(), grid.sp, grid.shape)

    cavity, texture = torso.cavity, fields.texture
    lung = cavity & thorax & (lung2d & ~torso.vessels2d)[None] & (Z > dome_floor[None] + F32(2.5))
    mediastinum = cavity & thorax & ~lung
    image[mediastinum] = (F32(app.fat_hu + 15.0) + F32(10.0) * texture)[mediastinum]
    if heart_box is not None:
        heart = (ellipsoid(heart_box, heart_c, heart_axes, grid.sp, heart_rot) < 1.0) & cavity[heart_box]
        lung[heart_box] &= ~heart
        paint(image, labels, heart_box, heart, F32(app.blood_hu - 5.0) + F32(5.0) * texture[heart_box], BODY)
    return _Thorax(zd_r, zd_l, dome_floor, thorax, lung)


def _paint_abdomen(
    rng: np.random.Generator, fields: _Fields, app: Appearance, torso: _Torso, thorax: _Thorax, image: np.ndarray
) -> None:
    """Fat and bowel mixture below the diaphragm, rare gas; aorta and vena cava."""
    coarse, texture, fat_hu, blood_hu = fields.coarse, fields.texture, app.fat_hu, app.blood_hu
    abdomen = torso.cavity & ~thorax.thorax
    bowel_hu = rng.uniform(20.0, 45.0)
    threshold = rng.uniform(-0.4, 0.3)
    w_bowel = special.expit((coarse - F32(threshold)) * F32(5.0))
    filler = F32(fat_hu + 10.0) + w_bowel * F32(bowel_hu - fat_hu - 10.0) + F32(6.0) * texture
    gas = (coarse > F32(threshold + rng.uniform(1.8, 3.0))) & (texture > 0.5)
    filler[gas] = -900.0
    image[abdomen] = filler[abdomen]
    aorta = torso.aorta2d[None] & torso.cavity & ~thorax.lung
    image[aorta] = blood_hu
    ivc = torso.ivc2d[None] & abdomen
    image[ivc] = blood_hu - 0.4 * (blood_hu - 40.0)


def _paint_lungs(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    thorax: _Thorax,
    image: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Lung parenchyma with vessel texture, denser towards the hila."""
    sp = grid.sp
    lung_box = bbox(thorax.lung)
    if lung_box is None:
        return
    lshape = tuple(s.stop - s.start for s in lung_box)
    xl = (np.arange(lung_box[2].start, lung_box[2].stop, dtype=np.float32) * F32(sp[2]))[None, None, :]
    hilum = np.clip(F32(1.2) - F32(1.1) * np.abs(xl - F32(torso.cx)) / F32(torso.axc), 0.0, 1.0)
    vessel = None
    # vessels: where two independent smooth fields are both near zero (curves), at two scales;
    # the wide ones fade towards the periphery
    for sigma_mm, width, weight in ((5.0, 0.28, hilum), (2.5, 0.18, F32(0.3) + F32(0.5) * hilum)):
        n1 = smooth_noise(rng, lshape, sigma_mm, sp)
        n2 = smooth_noise(rng, lshape, sigma_mm, sp)
        w = F32(width * rng.uniform(0.8, 1.2))
        tube = np.exp(-(n1 * n1 + n2 * n2) / (F32(2.0) * w * w)) * weight
        vessel = tube if vessel is None else np.maximum(vessel, tube)
    lung_img = F32(app.lung_hu) + F32(15.0) * fields.texture[lung_box] + vessel * F32(app.blood_hu - app.lung_hu)
    paint(image, labels, lung_box, thorax.lung[lung_box], lung_img, LUNG)


def _draw_liver(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    thorax: _Thorax,
    below: np.ndarray,
    image: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Right lobe plus a left lobe crossing the midline, the dome under the right lung; faint veins."""
    H, sp, shape = grid.H, grid.sp, grid.shape
    cx, cy, axc, ayc, zd_r = torso.cx, torso.cy, torso.axc, torso.ayc, thorax.zd_r
    r_lobe = np.array([0.0, 0.78 * ayc, 0.55 * axc]) * rng.uniform(0.9, 1.1, 3)
    r_lobe[0] = rng.uniform(0.30, 0.38) * H
    c_right = np.array([zd_r - 0.45 * r_lobe[0], cy + rng.uniform(-0.05, 0.08) * ayc, cx - 0.45 * axc])
    l_lobe = np.array([0.55 * r_lobe[0], 0.4 * ayc, rng.uniform(0.35, 0.5) * axc])
    c_left = np.array([zd_r - 0.3 * l_lobe[0] - 0.1 * r_lobe[0], cy - 0.4 * ayc, cx + 0.05 * axc])
    rot_liver = rot_z(rng.uniform(-0.25, 0.25))
    liver_box = union_box(box(c_right, r_lobe.max() * 1.1, sp, shape), box(c_left, l_lobe.max() * 1.1, sp, shape))
    if liver_box is None:
        return
    coarse = fields.coarse
    f = np.minimum(
        ellipsoid(liver_box, c_right, r_lobe, sp, rot_liver), ellipsoid(liver_box, c_left, l_lobe, sp, rot_liver)
    )
    liver = ((f + F32(0.07) * coarse[liver_box]) < 1.0) & below[liver_box]
    paint(image, labels, liver_box, liver, F32(app.liver_hu) + F32(4.0) * fields.texture[liver_box], LIVER)
    # hepatic veins / portal branches: faint tubular texture
    veins = liver & (np.abs(coarse[liver_box][::-1, ::-1]) < 0.08)
    image[liver_box][veins] += F32(rng.uniform(-15.0, 25.0))


def _draw_spleen(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    thorax: _Thorax,
    below: np.ndarray,
    image: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Left, posterior, under the left dome."""
    H, ayc, axc = grid.H, torso.ayc, torso.axc
    s_axes = np.array([rng.uniform(0.11, 0.16) * H, 0.38 * ayc, 0.2 * axc]) * rng.uniform(0.85, 1.15, 3)
    s_c = np.array(
        [thorax.zd_l - 0.6 * s_axes[0] - rng.uniform(0.0, 0.04) * H, torso.cy + 0.35 * ayc, torso.cx + 0.62 * axc]
    )
    s_box = box(s_c, s_axes.max() * 1.1, grid.sp, grid.shape)
    if s_box is None:
        return
    f = ellipsoid(s_box, s_c, s_axes, grid.sp, rot_z(rng.uniform(-0.8, -0.3)))
    spleen = ((f + F32(0.06) * fields.coarse[s_box]) < 1.0) & below[s_box]
    paint(image, labels, s_box, spleen, F32(app.spleen_hu) + F32(4.0) * fields.texture[s_box], SPLEEN)


def _draw_kidneys(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    below: np.ndarray,
    image: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Posterior, beside the spine, the right one lower: cortex, darker medulla, fatty hilum."""
    H, sp, texture = grid.H, grid.sp, fields.texture
    ys, rs, xs = torso.ys, torso.rs, torso.xs
    k_z = rng.uniform(0.18, 0.3) * H
    for side in (-1, 1):
        k_axes = np.array([rng.uniform(0.13, 0.18) * H, 0.24 * torso.ayc, 0.16 * torso.axc]) * rng.uniform(0.9, 1.1, 3)
        k_c = np.array(
            [
                k_z - (rng.uniform(0.0, 0.06) * H if side < 0 else 0.0),
                ys - rng.uniform(0.2, 0.6) * rs,
                xs + side * (rs + 1.25 * k_axes[2]),
            ]
        )
        yaw, tilt = side * rng.uniform(0.2, 0.5), side * rng.uniform(0.05, 0.2)  # in-plane, coronal
        c, s = math.cos(tilt), math.sin(tilt)
        k_rot = rot_z(yaw) @ np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])
        k_box = box(k_c, k_axes.max() * 1.1, sp, grid.shape)
        if k_box is None:
            continue
        f = ellipsoid(k_box, k_c, k_axes, sp, k_rot) + F32(0.04) * texture[k_box]
        kidney = (f < 1.0) & below[k_box]
        hilum_c = k_c + np.array([0.0, -0.35 * k_axes[1], -side * 0.85 * k_axes[2]])
        sinus = kidney & (ellipsoid(k_box, hilum_c, k_axes * np.array([0.45, 0.45, 0.55]), sp) < 1.0)
        parenchyma = kidney & ~sinus
        kidney_img = np.where(f > 0.7, F32(app.cortex_hu), F32(app.medulla_hu)) + F32(4.0) * texture[k_box]
        paint(image, labels, k_box, parenchyma, kidney_img, KIDNEY)
        paint(image, labels, k_box, sinus, F32(app.fat_hu + 20.0) + F32(8.0) * texture[k_box], BODY)


def _draw_bone(
    rng: np.random.Generator,
    grid: _Grid,
    fields: _Fields,
    app: Appearance,
    torso: _Torso,
    image: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Spine (vertebral bodies with discs, arch, spinous process) and oblique ribs in the upper part."""
    H, z1, y2, Z, texture, body = grid.H, grid.z1, grid.y2, grid.Z, fields.texture, torso.body
    bone_hu, cortical_hu = app.bone_hu, app.cortical_hu
    period = rng.uniform(0.09, 0.12) * H
    disc = ((z1 + F32(rng.uniform(0.0, period))) % F32(period)) < F32(max(0.2 * period, 2.0))
    vb2d = torso.r_vb < 1.0
    cortex2d = vb2d & (torso.r_vb > 0.8)
    arch2d = ((torso.r_arch < 1.0) & (torso.r_canal >= 1.0) & (y2 > F32(torso.ys))) | torso.spinous
    bone_slice = np.where(cortex2d | arch2d, F32(cortical_hu), F32(bone_hu))
    bone3 = (vb2d | arch2d)[None] & body
    disc3 = disc[:, None, None] & vb2d[None] & body
    bone3 &= ~disc3
    image[bone3] = (bone_slice[None] + F32(15.0) * texture)[bone3]
    labels[bone3] = BONE
    image[disc3] = (F32(80.0) + F32(6.0) * texture)[disc3]
    labels[disc3] = BODY
    canal = (torso.r_canal < 1.0)[None] & body
    image[canal] = 15.0
    labels[canal] = BODY

    # ribs: oblique bands through the chest wall, in the upper part
    axc, ayc, ax = torso.axc, torso.ayc, torso.ax
    theta = np.arctan2(torso.outline.dx / F32(axc), torso.outline.dy / F32(ayc))  # 0 posterior, +-pi anterior
    rib_t = rng.uniform(0.025, 0.035) * ax  # radial half-thickness, mm
    r_rib = torso.outline.superellipse(axc + rib_t, ayc + rib_t)
    ring = (np.abs(r_rib - F32(1.0)) < F32(rib_t / axc)) & (np.abs(theta) < 2.4) & (np.abs(theta) > 0.35)
    rib_period = rng.uniform(0.11, 0.15) * H
    rib_width = max(0.35 * rib_period, 1.2 * grid.sp[0])
    slope = rng.uniform(0.06, 0.1) * H  # ribs descend anteriorly
    rib_phase = (Z + F32(slope) * np.abs(theta)[None] + F32(rng.uniform(0.0, rib_period))) % F32(rib_period)
    ribs = ring[None] & (rib_phase < F32(rib_width)) & (Z > F32(rng.uniform(0.25, 0.4) * H)) & body
    image[ribs] = (F32(0.5 * (bone_hu + cortical_hu)) + F32(20.0) * texture)[ribs]
    labels[ribs] = BONE
