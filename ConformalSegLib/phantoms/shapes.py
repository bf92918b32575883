"""Geometry in millimetres for the phantom generator: smooth random fields, boxes, ellipsoids, painting.

All coordinates are in mm, in numpy ``(z, y, x)`` order, measured from voxel index 0; ``sp`` is the
``(z, y, x)`` spacing. Computations are in float32 (:data:`F32`) as the generator's arrays are, so the
helpers give bit-identical results for the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "F32",
    "Box",
    "bbox",
    "box",
    "ellipsoid",
    "ellipsoid_radius",
    "offsets",
    "paint",
    "rot_z",
    "smooth_noise",
    "union_box",
    "upsample_linear",
]

F32 = np.float32
Box = tuple[slice, slice, slice]


def upsample_linear(small: np.ndarray, factors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``small`` onto a grid ``factors`` times finer, cropped to ``shape``."""
    out = small
    for axis, (f, n) in enumerate(zip(factors, shape)):
        if f == 1:
            out = out[(slice(None),) * axis + (slice(0, n),)]
            continue
        pos = np.arange(n, dtype=np.float32) / F32(f)
        i0 = np.floor(pos).astype(np.intp)
        w = (pos - i0).astype(np.float32)
        view = [1] * out.ndim
        view[axis] = -1
        w = w.reshape(view)
        out = np.take(out, i0, axis=axis) * (F32(1.0) - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation (float32).

    White noise is filtered on a grid coarsened by about ``sigma / 1.5`` voxels and linearly
    upsampled, which costs a fraction of filtering at full resolution.
    """
    sigma_vox = sigma_mm / np.asarray(spacing, dtype=float)
    factors = np.maximum(1, np.floor(sigma_vox / 1.5)).astype(int)
    small_shape = tuple(int(-(-n // f)) + 1 for n, f in zip(shape, factors))
    small = rng.standard_normal(small_shape, dtype=np.float32)
    small = ndimage.gaussian_filter(small, tuple(sigma_vox / factors), truncate=3.0, mode="wrap")
    out = upsample_linear(small, factors, shape)
    std = float(out.std())
    if std > 0:
        out *= F32(1.0 / std)
    return np.ascontiguousarray(out, dtype=np.float32)


def rot_z(angle: float) -> np.ndarray:
    """Rotation in the axial (y, x) plane, in (z, y, x) coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def box(center: np.ndarray, half: np.ndarray | float, sp: np.ndarray, shape: tuple[int, ...]) -> Box | None:
    """Voxel slices covering ``center +- half`` (mm), clipped to the volume; None when empty."""
    lo = np.maximum(np.floor((center - half) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((center + half) / sp).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def union_box(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore


def offsets(box: Box, center: np.ndarray, sp: np.ndarray) -> list[np.ndarray]:
    """Broadcastable (z, y, x) mm offsets from ``center`` for the voxels of ``box``."""
    out = []
    for axis, sl in enumerate(box):
        coords = np.arange(sl.start, sl.stop, dtype=np.float32) * F32(sp[axis]) - F32(center[axis])
        view = [1, 1, 1]
        view[axis] = -1
        out.append(coords.reshape(view))
    return out


def ellipsoid(
    box: Box, center: np.ndarray, axes: np.ndarray, sp: np.ndarray, rotation: np.ndarray | None = None
) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on ``box``; ``rotation`` columns = principal axes."""
    return ellipsoid_radius(offsets(box, center, sp), axes, rotation)


def ellipsoid_radius(off: list[np.ndarray], axes: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) at broadcastable mm offsets ``off`` from its centre."""
    if rotation is None:
        return np.sqrt(sum((o / F32(a)) ** 2 for o, a in zip(off, axes)))
    total: np.ndarray | None = None
    for k in range(3):  # coordinate along the k-th principal axis: column k of the rotation
        q = off[0] * F32(rotation[0, k]) + off[1] * F32(rotation[1, k]) + off[2] * F32(rotation[2, k])
        term = (q / F32(axes[k])) ** 2
        total = term if total is None else total + term
    assert total is not None
    return np.sqrt(total)


def bbox(mask: np.ndarray, pad: int = 0) -> Box | None:
    """Bounding box of a mask (grown by ``pad`` voxels, clipped), or None when it is empty."""
    sl = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        sl.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(sl)  # type: ignore[return-value]


def paint(
    image: np.ndarray, labels: np.ndarray, box: Box, mask: np.ndarray, value: np.ndarray | float, label: int | None
) -> None:
    """Set ``image`` (and ``labels`` unless None) on ``mask`` within ``box``."""
    sub = image[box]
    if np.ndim(value) == 0:
        sub[mask] = value
    else:
        sub[mask] = np.broadcast_to(value, mask.shape)[mask]
    if label is not None:
        labels[box][mask] = label
