"""Deterministic synthetic calibration cases that imitate a 3D lesion-segmentation network on CT.

Until a real network ships, these cases are the embedded default data of the demo and the data of
the tests. Each :class:`SyntheticCase` holds a CT-like image, the ground-truth lesion and organ
masks and an *imperfect* probability map, so that conformal calibration has real work to do:

* **Anatomy** (all sizes in mm, so anisotropic spacing is respected): air (-1000 HU) outside an
  elliptic body cylinder (soft tissue 0-40 HU with a subcutaneous fat rim), an ellipsoidal,
  liver-like organ (~60 HU with texture) inside it, and 1-3 hypo-dense lesions inside the organ
  (10-40 HU darker than the organ, per lesion). A lesion is the union of 1-3 randomly rotated
  ellipsoids whose surface is perturbed by smooth noise; its radius is drawn log-uniformly from
  5 mm up to 25 mm, capped so that it fits in the organ (about 12-15 mm at the default
  ``shape``/``spacing``, whose field of view is only 58 x 58 x 100 mm); a lesion is clipped to the
  organ and keeps only its largest connected part. Gaussian image noise.
* **Model output**: a logit ``scale * (shift(x) - d(x))`` where ``d`` is the signed distance (mm,
  positive outside) to the true lesion boundary, clipped to +-20 mm; ``scale`` (1/mm) is drawn per
  case (sharp, over-confident cases and soft, under-confident ones) and ``shift`` (mm) per case
  plus per lesion (mostly negative: networks under-segment), i.e. a per-case logit bias
  ``scale * shift``. Spatially smooth noise is added, parts of some lesions are missed (logits
  pulled down in a region), some cases get false-positive blobs elsewhere in the organ, and logits
  outside the organ are lowered; a sigmoid gives the probability. At the 0.5 threshold the
  per-case false-negative rate varies widely (10th-90th percentile about 0.1-0.5, a few cases
  above 0.7; mean about 0.3, std about 0.17) and the mean Dice is about 0.78.

All randomness comes from ``np.random.default_rng(seed)``: the same arguments give bit-identical
output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..common.randomness import random_rotation
from .shapes import Box, box, ellipsoid_radius, offsets

__all__ = ["SyntheticCase", "case_seed", "make_case", "make_cases"]

#: Signed distances to the lesion boundary are clipped to this many mm (the background logit floor).
_DISTANCE_CLIP_MM = 20.0
_MIN_LESION_RADIUS_MM = 5.0
_MAX_LESION_RADIUS_MM = 25.0


@dataclass
class SyntheticCase:
    """One synthetic case. Arrays are in numpy ``(z, y, x)`` order and have ``geometry.shape``."""

    case_id: str
    image: np.ndarray  #: float32, HU-like CT intensities
    probability: np.ndarray  #: float32 in [0, 1], the imitated network output
    lesion: np.ndarray  #: bool, ground-truth lesion mask (may be empty)
    organ: np.ndarray  #: bool, the organ the lesions sit in
    geometry: Geometry


# --------------------------------------------------------------------------------------------------
# helpers


def _sigma_vox(sigma_mm: float, spacing_zyx: np.ndarray) -> tuple[float, ...]:
    return tuple(float(sigma_mm / s) for s in spacing_zyx)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing_zyx: np.ndarray
) -> np.ndarray:
    """Gaussian-filtered white noise with (about) unit standard deviation, float32."""
    field = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, _sigma_vox(sigma_mm, spacing_zyx), truncate=3.0, mode="reflect")
    std = float(field.std())
    if std > 0:
        field *= np.float32(1.0 / std)
    return field


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive-exclusive voxel bounding box of a mask, or None when it is empty."""
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    return np.array(lo), np.array(hi)


def _validate(shape: tuple[int, int, int], spacing: tuple[float, float, float], empty_probability: float) -> None:
    if len(shape) != 3 or any(int(s) != s or int(s) < 16 for s in shape):
        raise ConformalSegError(
            f"synthetic case shape must be three integers >= 16, got {shape}.",
            fix="pass a shape such as (40, 64, 64) in numpy (z, y, x) order.",
        )
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ConformalSegError(
            f"synthetic case spacing must be three positive numbers, got {spacing}.",
            fix="pass a spacing such as (0.9, 0.9, 2.5) in mm, ITK (x, y, z) order.",
        )
    if not 0.0 <= empty_probability <= 1.0:
        raise ConformalSegError(f"empty_probability must lie in [0, 1], got {empty_probability}.")


# --------------------------------------------------------------------------------------------------
# public API


def make_case(
    seed: int,
    *,
    shape: tuple[int, int, int] = (40, 64, 64),
    spacing: tuple[float, float, float] = (0.9, 0.9, 2.5),
    empty_probability: float = 0.0,
    case_id: str | None = None,
) -> SyntheticCase:
    """Generate one synthetic case, deterministically from ``seed``.

    ``shape`` is in numpy ``(z, y, x)`` order, ``spacing`` in mm in ITK ``(x, y, z)`` order. With
    probability ``empty_probability`` the case has no lesion (the probability map may still hold
    false-positive blobs). ``case_id`` defaults to ``f"synth_seed{seed}"``. The steps below draw from
    one generator in a fixed order (the order is part of the output's definition).
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    _validate(shape, spacing, empty_probability)
    geometry = Geometry(shape=shape, spacing=tuple(float(s) for s in spacing))
    sp = np.array(geometry.spacing_zyx, dtype=float)  # (z, y, x) mm
    rng = np.random.default_rng(seed)
    is_empty = bool(rng.random() < empty_probability)
    organ = _draw_organ(rng, shape, sp)
    image, texture, organ_weight = _draw_image(rng, organ, sp)
    lesion, darkening, lesions = _draw_lesions(rng, is_empty, organ, texture, sp)
    image -= darkening * organ_weight  # overlapping lesions do not add up
    image += rng.normal(0.0, rng.uniform(8.0, 14.0), shape).astype(np.float32)
    probability = _imitate_network(rng, lesion, lesions, organ, organ_weight, texture, sp)
    return SyntheticCase(
        case_id=case_id if case_id is not None else f"synth_seed{seed}",
        image=np.ascontiguousarray(image, dtype=np.float32),
        probability=np.ascontiguousarray(probability),
        lesion=lesion,
        organ=organ.mask,
        geometry=geometry,
    )


@dataclass(frozen=True)
class _Organ:
    """The body cylinder and the organ the lesions sit in."""

    body: np.ndarray  #: bool
    body_r: np.ndarray  #: normalised radius of the body cylinder
    mask: np.ndarray  #: bool, the organ
    radius: np.ndarray  #: normalised (perturbed) organ radius, < 1 inside
    axes: np.ndarray  #: organ semi-axes, mm
    coarse: np.ndarray  #: low-frequency random field: organ outline, image and logit noise


@dataclass(frozen=True)
class _Lesion:
    center: np.ndarray  #: mm
    radius: float  #: mm
    box: Box
    blob: np.ndarray  #: bool, on ``box``


def _draw_organ(rng: np.random.Generator, shape: tuple[int, int, int], sp: np.ndarray) -> _Organ:
    """Body (elliptic cylinder along z) and organ (perturbed, rotated-in-plane ellipsoid)."""
    fov = sp * np.array(shape)  # field of view, mm, (z, y, x)
    full = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    center = fov / 2.0
    off = offsets(full, center, sp)
    body_axes = np.array([np.inf, 0.44, 0.48]) * fov * rng.uniform(0.95, 1.03, 3)
    body_r = np.sqrt((off[1] / np.float32(body_axes[1])) ** 2 + (off[2] / np.float32(body_axes[2])) ** 2)
    body_r = np.broadcast_to(body_r, shape)
    body = body_r < 1.0

    organ_axes = fov * np.array([rng.uniform(0.30, 0.42), rng.uniform(0.27, 0.33), rng.uniform(0.30, 0.37)])
    organ_center = center + fov * np.array(
        [rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.06)]
    )
    angle = rng.uniform(-0.5, 0.5)
    c, s = math.cos(angle), math.sin(angle)
    organ_rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    organ_f = ellipsoid_radius(offsets(full, organ_center, sp), organ_axes, organ_rot)
    coarse = _smooth_noise(rng, shape, 6.0, sp)  # low-frequency field: organ outline, logit noise
    organ_f = organ_f + np.float32(0.06) * coarse
    organ = (organ_f < 1.0) & (body_r < 0.9)
    return _Organ(body, body_r, organ, organ_f, organ_axes, coarse)


def _draw_image(rng: np.random.Generator, organ: _Organ, sp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image without lesions (air, soft tissue with a fat rim, organ with texture), the fine texture
    field and the organ's partial-volume weight."""
    coarse, body = organ.coarse, organ.body
    texture = _smooth_noise(rng, body.shape, 1.8, sp)  # fine texture, also perturbs lesion surfaces
    tissue_hu = rng.uniform(15.0, 35.0)
    image = np.where(body, np.float32(tissue_hu) + np.float32(7.0) * coarse, np.float32(-1000.0))
    fat_rim = body & (organ.body_r > rng.uniform(0.86, 0.91))
    image[fat_rim] = np.float32(-95.0) + np.float32(10.0) * coarse[fat_rim]
    organ_hu = rng.uniform(52.0, 68.0)
    organ_weight = ndimage.gaussian_filter(organ.mask.astype(np.float32), _sigma_vox(0.8, sp), truncate=3.0)
    organ_image = np.float32(organ_hu) + np.float32(6.0) * texture
    image += organ_weight * (organ_image - image)
    return image, texture, organ_weight


def _draw_lesions(
    rng: np.random.Generator, is_empty: bool, organ: _Organ, texture: np.ndarray, sp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[_Lesion]]:
    """1-3 lesions inside the organ: the lesion mask, the per-voxel darkening (HU) and each lesion."""
    shape = organ.mask.shape
    lesion = np.zeros(shape, dtype=bool)
    darkening = np.zeros(shape, dtype=np.float32)  # HU below the organ, per voxel
    lesions: list[_Lesion] = []
    if is_empty:
        return lesion, darkening, lesions
    # inner depth of the organ (mm), approximated from its normalised radius
    depth = (1.0 - organ.radius) * np.float32(organ.axes.min())
    depth[~organ.mask] = -1.0
    max_depth = float(depth.max())
    n_lesions = int(rng.integers(1, 4))
    r_cap = max(_MIN_LESION_RADIUS_MM, min(_MAX_LESION_RADIUS_MM, 0.8 * max_depth))
    for _ in range(n_lesions):
        radius = float(math.exp(rng.uniform(math.log(_MIN_LESION_RADIUS_MM), math.log(r_cap))))
        candidates = np.flatnonzero(depth >= min(0.75 * radius, 0.9 * max_depth))
        if candidates.size == 0:
            continue
        idx = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], shape))
        lcenter = (idx + rng.uniform(-0.5, 0.5, 3)) * sp
        lbox = box(lcenter, 1.8 * radius, sp, shape)
        if lbox is None:
            continue
        blob = _lesion_blob(rng, lbox, lcenter, radius, organ.mask, texture, sp)
        if blob is None:
            continue
        lesion[lbox] |= blob
        lesions.append(_Lesion(lcenter, radius, lbox, blob))
        # partial-volume edge and a per-lesion hypo-density
        contrast = rng.uniform(10.0, 40.0)
        weight = ndimage.gaussian_filter(blob.astype(np.float32), _sigma_vox(0.7, sp), truncate=3.0)
        np.maximum(darkening[lbox], np.float32(contrast) * weight, out=darkening[lbox])
    return lesion, darkening, lesions


def _lesion_blob(
    rng: np.random.Generator,
    lbox: Box,
    lcenter: np.ndarray,
    radius: float,
    organ: np.ndarray,
    texture: np.ndarray,
    sp: np.ndarray,
) -> np.ndarray | None:
    """A lesion's mask on its box: rotated ellipsoid with 0-2 lobes and a noisy surface, in the organ,
    largest connected part; None when nothing is left."""
    loff = offsets(lbox, lcenter, sp)
    field = ellipsoid_radius(loff, radius * rng.uniform(0.75, 1.2, 3), random_rotation(rng))
    for _ in range(int(rng.integers(0, 3))):  # satellite lobes
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_center = direction * radius * rng.uniform(0.35, 0.7)
        lobe_off = [o - np.float32(d) for o, d in zip(loff, lobe_center)]
        lobe = ellipsoid_radius(lobe_off, radius * rng.uniform(0.4, 0.7, 3), random_rotation(rng))
        field = np.minimum(field, lobe)
    field = field + np.float32(rng.uniform(0.08, 0.2)) * texture[lbox]
    blob = (field < 1.0) & organ[lbox]
    labels, n_parts = ndimage.label(blob)
    if n_parts == 0:
        return None
    if n_parts > 1:  # surface noise or the organ edge can split off crumbs: keep the main part
        blob = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return blob


def _signed_distance(lesion: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Signed distance (mm, positive outside) to the lesion boundary, clipped to :data:`_DISTANCE_CLIP_MM`."""
    shape = lesion.shape
    signed = np.full(shape, np.float32(_DISTANCE_CLIP_MM), dtype=np.float32)
    bb = _bbox(lesion)
    if bb is None:
        return signed
    margin = np.ceil((_DISTANCE_CLIP_MM + 1.0) / sp).astype(int)
    lo = np.maximum(bb[0] - margin, 0)
    hi = np.minimum(bb[1] + margin, shape)
    sbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = lesion[sbox]
    outside = ndimage.distance_transform_edt(~sub, sampling=sp)
    inside = ndimage.distance_transform_edt(sub, sampling=sp)
    # distances between voxel centres, moved half a voxel (in-plane) to the boundary between them
    half = 0.5 * float(sp.min())
    sub_signed = np.where(sub, half - inside, outside - half)
    signed[sbox] = np.minimum(sub_signed, _DISTANCE_CLIP_MM).astype(np.float32)
    return signed


def _imitate_network(
    rng: np.random.Generator,
    lesion: np.ndarray,
    lesions: list[_Lesion],
    organ: _Organ,
    organ_weight: np.ndarray,
    texture: np.ndarray,
    sp: np.ndarray,
) -> np.ndarray:
    """The imitated network output: a biased, noisy logit of the signed distance, partly missed
    lesions, false-positive blobs, lowered outside the organ; its sigmoid."""
    shape = lesion.shape
    scale = float(math.exp(rng.uniform(math.log(0.35), math.log(3.0))))  # logit slope, 1/mm
    # boundary displacement (mm, negative: under-segmentation); scale * shift is the logit bias
    case_shift = float(np.clip(rng.normal(-0.7, 0.5), -2.2, 0.8))
    signed = _signed_distance(lesion, sp)
    shift = np.full(shape, np.float32(case_shift), dtype=np.float32)
    for les in lesions:  # per-lesion bias, fading away from the lesion
        lbox = box(les.center, 3.0 * les.radius + 6.0, sp, shape)
        assert lbox is not None  # the centre is inside the volume
        dist2 = sum(o * o for o in offsets(lbox, les.center, sp))
        falloff = np.exp(-dist2 / np.float32(2.0 * (les.radius + 5.0) ** 2))
        shift[lbox] += np.float32(rng.normal(0.0, 0.4)) * falloff
    logit = np.float32(scale) * (shift - signed)
    # spatially smooth noise (decorrelated from the image by flipping): partly in mm, partly in logits
    coarse_amp = scale * rng.uniform(0.2, 0.5) + rng.uniform(0.1, 0.3)
    fine_amp = scale * rng.uniform(0.3, 0.6) + rng.uniform(0.2, 0.5)
    logit += np.float32(coarse_amp) * organ.coarse[::-1, ::-1, ::-1]
    logit += np.float32(fine_amp) * texture[::-1, :, ::-1]
    # partially missed lesions: a region with lowered (but not hopeless) logits
    for les in lesions:
        if rng.random() < 0.35:
            voxels = np.argwhere(les.blob)
            start = np.array([sl.start for sl in les.box])
            point = (voxels[rng.integers(len(voxels))] + start) * sp
            _blend(logit, point, les.radius * rng.uniform(0.35, 0.7), rng.uniform(-4.0, -0.5), sp)
    # false-positive blobs elsewhere in the organ
    far_idx = np.flatnonzero(organ.mask & (signed > 6.0))
    for _ in range(int(rng.poisson(0.7))):
        if far_idx.size == 0:
            break
        voxel = np.array(np.unravel_index(far_idx[rng.integers(far_idx.size)], shape))
        point = (voxel + rng.uniform(-0.5, 0.5, 3)) * sp
        _blend(logit, point, rng.uniform(2.0, 5.0), rng.uniform(0.5, 3.5), sp)
    # the network knows lesions sit in the organ
    logit -= np.float32(4.0) * (np.float32(1.0) - organ_weight)
    return special.expit(logit).astype(np.float32, copy=False)


def _blend(logit: np.ndarray, center_mm: np.ndarray, radius_mm: float, target: float, sp: np.ndarray) -> None:
    """Pull ``logit`` (in place) towards ``target`` in a soft ball (flat top, smooth rim)."""
    bbox_ = box(center_mm, 2.5 * radius_mm, sp, logit.shape)
    if bbox_ is None:
        return
    ratio2 = sum(o * o for o in offsets(bbox_, center_mm, sp)) / np.float32(radius_mm**2)
    weight = np.exp(-(ratio2**2) * np.float32(math.log(2.0)))  # 0.5 at radius
    logit[bbox_] += weight * (np.float32(target) - logit[bbox_])


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of :func:`make_cases` (independent streams via ``SeedSequence``)."""
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


def make_cases(n: int, seed: int = 0, **kw) -> Iterator[SyntheticCase]:
    """Yield ``n`` independent synthetic cases ``synth_000``, ``synth_001``, ...

    Case ``i`` is ``make_case(case_seed(seed, i), **kw)``; keyword arguments go to :func:`make_case`.
    """
    if int(n) != n or n < 0:
        raise ConformalSegError(f"the number of synthetic cases must be a non-negative integer, got {n}.")
    width = max(3, len(str(int(n) - 1)))
    for i in range(int(n)):
        yield make_case(case_seed(seed, i), case_id=f"synth_{i:0{width}d}", **kw)
