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


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float,
                  spacing_zyx: np.ndarray) -> np.ndarray:
    """Gaussian-filtered white noise with (about) unit standard deviation, float32."""
    field = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, _sigma_vox(sigma_mm, spacing_zyx), truncate=3.0, mode="reflect")
    std = float(field.std())
    if std > 0:
        field *= np.float32(1.0 / std)
    return field


def _box(center_mm: np.ndarray, half_mm: float, spacing_zyx: np.ndarray,
         shape: tuple[int, int, int]) -> tuple[slice, slice, slice] | None:
    """Voxel slices covering ``center +- half`` (mm), clipped to the volume; None when empty."""
    lo = np.floor((center_mm - half_mm) / spacing_zyx).astype(int)
    hi = np.ceil((center_mm + half_mm) / spacing_zyx).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _box_offsets(box: tuple[slice, slice, slice], center_mm: np.ndarray,
                 spacing_zyx: np.ndarray) -> list[np.ndarray]:
    """Broadcastable (z, y, x) mm offsets from ``center`` for the voxels of ``box``."""
    out = []
    for axis, sl in enumerate(box):
        coords = np.arange(sl.start, sl.stop, dtype=np.float32) * np.float32(spacing_zyx[axis])
        coords -= np.float32(center_mm[axis])
        view = [1, 1, 1]
        view[axis] = -1
        out.append(coords.reshape(view))
    return out


def _ellipsoid_radius(offsets: list[np.ndarray], semi_axes_mm: np.ndarray,
                      rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) for broadcastable mm offsets."""
    if rotation is None:
        total = sum((o / np.float32(a)) ** 2 for o, a in zip(offsets, semi_axes_mm))
        return np.sqrt(total)
    total = None
    for k in range(3):  # coordinate along the k-th principal axis: column k of the rotation
        q = (offsets[0] * np.float32(rotation[0, k]) + offsets[1] * np.float32(rotation[1, k])
             + offsets[2] * np.float32(rotation[2, k]))
        term = (q / np.float32(semi_axes_mm[k])) ** 2
        total = term if total is None else total + term
    return np.sqrt(total)


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


def _validate(shape: tuple[int, int, int], spacing: tuple[float, float, float],
              empty_probability: float) -> None:
    if len(shape) != 3 or any(int(s) != s or int(s) < 16 for s in shape):
        raise ConformalSegError(f"synthetic case shape must be three integers >= 16, got {shape}.",
                                fix="pass a shape such as (40, 64, 64) in numpy (z, y, x) order.")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ConformalSegError(f"synthetic case spacing must be three positive numbers, got {spacing}.",
                                fix="pass a spacing such as (0.9, 0.9, 2.5) in mm, ITK (x, y, z) order.")
    if not 0.0 <= empty_probability <= 1.0:
        raise ConformalSegError(f"empty_probability must lie in [0, 1], got {empty_probability}.")


# --------------------------------------------------------------------------------------------------
# public API


def make_case(seed: int, *, shape: tuple[int, int, int] = (40, 64, 64),
              spacing: tuple[float, float, float] = (0.9, 0.9, 2.5),
              empty_probability: float = 0.0, case_id: str | None = None) -> SyntheticCase:
    """Generate one synthetic case, deterministically from ``seed``.

    ``shape`` is in numpy ``(z, y, x)`` order, ``spacing`` in mm in ITK ``(x, y, z)`` order. With
    probability ``empty_probability`` the case has no lesion (the probability map may still hold
    false-positive blobs). ``case_id`` defaults to ``f"synth_seed{seed}"``.
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    _validate(shape, spacing, empty_probability)
    geometry = Geometry(shape=shape, spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]
    sp = np.array(geometry.spacing_zyx, dtype=float)  # (z, y, x) mm
    fov = sp * np.array(shape)  # field of view, mm, (z, y, x)
    rng = np.random.default_rng(seed)
    is_empty = bool(rng.random() < empty_probability)

    # ---- body (elliptic cylinder along z) and organ (perturbed, rotated-in-plane ellipsoid) ---------
    full = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    center = fov / 2.0
    off = _box_offsets(full, center, sp)
    body_axes = np.array([np.inf, 0.44, 0.48]) * fov * rng.uniform(0.95, 1.03, 3)
    body_r = np.sqrt((off[1] / np.float32(body_axes[1])) ** 2 + (off[2] / np.float32(body_axes[2])) ** 2)
    body_r = np.broadcast_to(body_r, shape)
    body = body_r < 1.0

    organ_axes = fov * np.array([rng.uniform(0.30, 0.42), rng.uniform(0.27, 0.33),
                                 rng.uniform(0.30, 0.37)])
    organ_center = center + fov * np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04),
                                            rng.uniform(-0.06, 0.06)])
    angle = rng.uniform(-0.5, 0.5)
    c, s = math.cos(angle), math.sin(angle)
    organ_rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    organ_off = _box_offsets(full, organ_center, sp)
    organ_f = _ellipsoid_radius(organ_off, organ_axes, organ_rot)
    coarse = _smooth_noise(rng, shape, 6.0, sp)  # low-frequency field: organ outline, logit noise
    organ_f = organ_f + np.float32(0.06) * coarse
    organ = (organ_f < 1.0) & (body_r < 0.9)

    # ---- image: air, soft tissue with a fat rim, organ with texture ----------------------------------
    texture = _smooth_noise(rng, shape, 1.8, sp)  # fine texture, also perturbs lesion surfaces
    tissue_hu = rng.uniform(15.0, 35.0)
    image = np.where(body, np.float32(tissue_hu) + np.float32(7.0) * coarse, np.float32(-1000.0))
    fat_rim = body & (body_r > rng.uniform(0.86, 0.91))
    image[fat_rim] = np.float32(-95.0) + np.float32(10.0) * coarse[fat_rim]
    organ_hu = rng.uniform(52.0, 68.0)
    organ_weight = ndimage.gaussian_filter(organ.astype(np.float32), _sigma_vox(0.8, sp), truncate=3.0)
    organ_image = np.float32(organ_hu) + np.float32(6.0) * texture
    image += organ_weight * (organ_image - image)

    # ---- lesions ---------------------------------------------------------------------------------------
    lesion = np.zeros(shape, dtype=bool)
    darkening = np.zeros(shape, dtype=np.float32)  # HU below the organ, per voxel
    # per lesion: centre (mm), radius (mm), bounding box, mask within the box
    lesions: list[tuple[np.ndarray, float, tuple[slice, ...], np.ndarray]] = []
    if not is_empty:
        # inner depth of the organ (mm), approximated from its normalised radius
        depth = (1.0 - organ_f) * np.float32(organ_axes.min())
        depth[~organ] = -1.0
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
            box = _box(lcenter, 1.8 * radius, sp, shape)
            if box is None:
                continue
            loff = _box_offsets(box, lcenter, sp)
            field = _ellipsoid_radius(loff, radius * rng.uniform(0.75, 1.2, 3), random_rotation(rng))
            for _ in range(int(rng.integers(0, 3))):  # satellite lobes
                direction = rng.standard_normal(3)
                direction /= np.linalg.norm(direction)
                lobe_center = direction * radius * rng.uniform(0.35, 0.7)
                lobe_off = [o - np.float32(d) for o, d in zip(loff, lobe_center)]
                lobe = _ellipsoid_radius(lobe_off, radius * rng.uniform(0.4, 0.7, 3), random_rotation(rng))
                field = np.minimum(field, lobe)
            field = field + np.float32(rng.uniform(0.08, 0.2)) * texture[box]
            blob = (field < 1.0) & organ[box]
            labels, n_parts = ndimage.label(blob)
            if n_parts == 0:
                continue
            if n_parts > 1:  # surface noise or the organ edge can split off crumbs: keep the main part
                blob = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
            lesion[box] |= blob
            lesions.append((lcenter, radius, box, blob))
            # partial-volume edge and a per-lesion hypo-density
            contrast = rng.uniform(10.0, 40.0)
            weight = ndimage.gaussian_filter(blob.astype(np.float32), _sigma_vox(0.7, sp), truncate=3.0)
            np.maximum(darkening[box], np.float32(contrast) * weight, out=darkening[box])

    image -= darkening * organ_weight  # overlapping lesions do not add up
    image += rng.normal(0.0, rng.uniform(8.0, 14.0), shape).astype(np.float32)

    # ---- imitated network output --------------------------------------------------------------------------
    scale = float(math.exp(rng.uniform(math.log(0.35), math.log(3.0))))  # logit slope, 1/mm
    # boundary displacement (mm, negative: under-segmentation); scale * shift is the logit bias
    case_shift = float(np.clip(rng.normal(-0.7, 0.5), -2.2, 0.8))
    signed = np.full(shape, np.float32(_DISTANCE_CLIP_MM), dtype=np.float32)
    bb = _bbox(lesion)
    if bb is not None:
        margin = np.ceil((_DISTANCE_CLIP_MM + 1.0) / sp).astype(int)
        lo = np.maximum(bb[0] - margin, 0)
        hi = np.minimum(bb[1] + margin, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        sub = lesion[box]
        outside = ndimage.distance_transform_edt(~sub, sampling=sp)
        inside = ndimage.distance_transform_edt(sub, sampling=sp)
        # distances between voxel centres, moved half a voxel (in-plane) to the boundary between them
        half = 0.5 * float(sp.min())
        sub_signed = np.where(sub, half - inside, outside - half)
        signed[box] = np.minimum(sub_signed, _DISTANCE_CLIP_MM).astype(np.float32)
    shift = np.full(shape, np.float32(case_shift), dtype=np.float32)
    for lcenter, radius, _, _ in lesions:  # per-lesion bias, fading away from the lesion
        box = _box(lcenter, 3.0 * radius + 6.0, sp, shape)
        loff = _box_offsets(box, lcenter, sp)
        dist2 = sum(o * o for o in loff)
        falloff = np.exp(-dist2 / np.float32(2.0 * (radius + 5.0) ** 2))
        shift[box] += np.float32(rng.normal(0.0, 0.4)) * falloff
    logit = np.float32(scale) * (shift - signed)
    # spatially smooth noise (decorrelated from the image by flipping): partly in mm, partly in logits
    coarse_amp = scale * rng.uniform(0.2, 0.5) + rng.uniform(0.1, 0.3)
    fine_amp = scale * rng.uniform(0.3, 0.6) + rng.uniform(0.2, 0.5)
    logit += np.float32(coarse_amp) * coarse[::-1, ::-1, ::-1]
    logit += np.float32(fine_amp) * texture[::-1, :, ::-1]

    def blend(center_mm: np.ndarray, radius_mm: float, target: float) -> None:
        """Pull logits towards ``target`` in a soft ball (flat top, smooth rim)."""
        box = _box(center_mm, 2.5 * radius_mm, sp, shape)
        if box is None:
            return
        boff = _box_offsets(box, center_mm, sp)
        ratio2 = sum(o * o for o in boff) / np.float32(radius_mm**2)
        weight = np.exp(-(ratio2**2) * np.float32(math.log(2.0)))  # 0.5 at radius
        logit[box] += weight * (np.float32(target) - logit[box])

    # partially missed lesions: a region with lowered (but not hopeless) logits
    for _, radius, box, blob in lesions:
        if rng.random() < 0.35:
            voxels = np.argwhere(blob)
            start = np.array([sl.start for sl in box])
            point = (voxels[rng.integers(len(voxels))] + start) * sp
            blend(point, radius * rng.uniform(0.35, 0.7), rng.uniform(-4.0, -0.5))
    # false-positive blobs elsewhere in the organ
    far = organ & (signed > 6.0)
    far_idx = np.flatnonzero(far)
    for _ in range(int(rng.poisson(0.7))):
        if far_idx.size == 0:
            break
        voxel = np.array(np.unravel_index(far_idx[rng.integers(far_idx.size)], shape))
        point = (voxel + rng.uniform(-0.5, 0.5, 3)) * sp
        blend(point, rng.uniform(2.0, 5.0), rng.uniform(0.5, 3.5))
    # the network knows lesions sit in the organ
    logit -= np.float32(4.0) * (np.float32(1.0) - organ_weight)
    probability = special.expit(logit).astype(np.float32, copy=False)

    return SyntheticCase(
        case_id=case_id if case_id is not None else f"synth_seed{seed}",
        image=np.ascontiguousarray(image, dtype=np.float32),
        probability=np.ascontiguousarray(probability),
        lesion=lesion,
        organ=organ,
        geometry=geometry,
    )


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
