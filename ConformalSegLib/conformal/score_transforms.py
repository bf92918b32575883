"""Score transforms: for conformal confidence sets (Davenport, section 2.5) and, mapped into [0, 1], for the
threshold methods (``calibrate --score``, :mod:`ConformalSegLib.conformal.threshold_scores`).

A transform maps a probability map ``s`` to a "lesion-ness" score ``T(s)`` (higher = more likely
lesion). Confidence sets threshold ``T`` (see :mod:`ConformalSegLib.conformal.confidence_sets`): the
inner set uses the maxima of ``T`` over true background, the outer set the maxima of ``-T`` over
true lesion. Validity needs nothing of
``T`` beyond being computed from the image alone (the same way for calibration and test cases); the
transform only changes how tight the sets are. The paper's ``f_I(-s)`` is ``-T`` here: ``identity``,
``distance`` and ``gaussian`` are (up to ties at the mask level) antisymmetric, ``T(-s) = -T(s)``.

* ``identity``: ``T = s`` (probability units).
* ``distance[:c]``: signed Euclidean distance in **mm** (voxel spacing respected) to the boundary of
  the predicted mask ``M = {s >= c}`` (default ``c = 0.5``): ``+dist(v, outside M)`` for ``v`` in
  ``M`` and ``-dist(v, M)`` outside. Magnitudes are at least one voxel spacing (never 0). The
  complement's signed distance is the negation, so the transform is antisymmetric. An empty
  (full) predicted mask gives the constant ``-D`` (``+D``), ``D`` the physical diagonal of the grid.
  Computed exactly (scipy's EDT, rounded to float32) with about 13 bytes per voxel at peak on top of the mask
  (:func:`signed_distance_mm`).
* ``gaussian:sigma``: Gaussian smoothing of ``s`` with standard deviation ``sigma`` mm per axis
  (converted to voxels with the spacing; linear, hence antisymmetric), borders ``nearest``.
* ``margin[:c]``: the ``distance[:c]`` score ``D`` mapped into (0, 1) by the fixed increasing
  ``g(D) = 1 / (1 + exp(-D / 10 mm))`` (:data:`MARGIN_SCALE_MM`; computed in float64, rounded to float32, so
  non-decreasing in ``D``). A cutoff ``u`` on it is the mask ``D >= 10 mm * ln(u / (1 - u))``
  (:func:`margin_mm`): the predicted mask grown by a number of millimetres. Made for the threshold methods,
  which need scores in [0, 1]; for confidence sets it gives the ``distance`` sets (``g`` keeps the order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry


@dataclass(frozen=True)
class ScoreTransform:
    """A named, parameterised transform ``probability -> score`` (see module docstring)."""

    kind: str  # "identity" | "distance" | "gaussian" | "margin"
    parameter: float | None = None

    @property
    def name(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{float(self.parameter)!r}"

    @property
    def units(self) -> str:
        return {"distance": "mm", "margin": "margin score"}.get(self.kind, "probability")

    @property
    def in_unit_interval(self) -> bool:
        """Whether the scores lie in [0, 1], as the threshold methods need (all but ``distance``)."""
        return self.kind != "distance"

    def __call__(self, probability: np.ndarray, geometry: Geometry) -> np.ndarray:
        if self.kind == "identity":
            return np.asarray(probability)
        if self.kind == "distance":
            return signed_distance_mm(np.asarray(probability) >= self.parameter, geometry)
        if self.kind == "margin":
            distance = signed_distance_mm(np.asarray(probability) >= self.parameter, geometry)
            return margin_score(distance, out=distance)  # in place: no second full-size array
        if self.kind == "gaussian":
            assert self.parameter is not None  # parse_transform requires the sigma
            sigma_vox = [self.parameter / s for s in geometry.spacing_zyx]
            smoothed: np.ndarray = ndimage.gaussian_filter(
                np.asarray(probability, dtype=np.float32), sigma_vox, mode="nearest"
            )
            return smoothed
        raise AssertionError(self.kind)


IDENTITY = ScoreTransform("identity")
#: Candidates tried by ``--transform auto`` (Davenport's three families).
DEFAULT_CANDIDATES: tuple[ScoreTransform, ...] = (
    IDENTITY,
    ScoreTransform("distance", 0.5),
    ScoreTransform("gaussian", 2.0),
    ScoreTransform("gaussian", 4.0),
)


#: Largest Gaussian sigma accepted (mm): wider smoothing would blur a whole body, and its kernel costs memory.
MAX_SIGMA_MM = 100.0


def parse_transform(text: str) -> ScoreTransform:
    """Parse ``identity``, ``distance``, ``distance:0.4``, ``gaussian:2`` (sigma in mm)."""
    kind, _, value = str(text).strip().lower().partition(":")
    try:
        if kind == "identity" and not value:
            return IDENTITY
        if kind == "distance":
            level = float(value) if value else 0.5
            if not 0 < level <= 1:
                raise ValueError
            return ScoreTransform("distance", level)
        if kind == "margin":
            level = float(value) if value else 0.5
            if not 0 < level <= 1:
                raise ValueError
            return ScoreTransform("margin", level)
        if kind == "gaussian" and value:
            sigma = float(value)
            if not (np.isfinite(sigma) and sigma > 0):
                raise ValueError
            if sigma > MAX_SIGMA_MM:  # the filter's kernel grows with sigma (1e9 mm asks for 30 GiB)
                raise ConformalSegError(
                    f"gaussian sigma {sigma:g} mm is larger than {MAX_SIGMA_MM:g} mm",
                    fix="use a sigma of a few mm, e.g. gaussian:2",
                )
            return ScoreTransform("gaussian", sigma)
    except ValueError:
        pass
    raise ConformalSegError(
        f"unknown score transform {text!r}",
        fix="use identity, distance[:LEVEL] (LEVEL in (0,1], default 0.5), margin[:LEVEL] or gaussian:SIGMA_MM",
    )


#: The scale of the margin score's map ``g(D) = 1 / (1 + exp(-D / MARGIN_SCALE_MM))`` (mm).
MARGIN_SCALE_MM = 10.0
_MARGIN_SLAB = 1 << 22  # voxels per float64 slab (bounds the work array at 32 MB)


def margin_score(signed_distance: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``g(D)`` of the module docstring, float32: ``g`` in float64 (``scipy.special.expit``), rounded to float32.

    Rounding is monotone, so ``D1 <= D2`` gives ``g(D1) <= g(D2)``; distinct distances may round to the same
    score (ties: beyond about 160 mm inside the mask every score is 1.0), never into the wrong order. ``out``: a
    C-contiguous float32 array of the same shape to write into (``signed_distance`` itself may be given: each
    slab is read before it is overwritten); the work arrays are one float64 slab of 4 Mi voxels."""
    from scipy.special import expit

    shape = np.shape(signed_distance)
    flat = np.asarray(signed_distance).reshape(-1)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the distances' shape")
    result = out.reshape(-1)  # a view: writes land in ``out``
    for start in range(0, flat.size, _MARGIN_SLAB):
        part = flat[start : start + _MARGIN_SLAB].astype(np.float64) / MARGIN_SCALE_MM
        result[start : start + _MARGIN_SLAB] = expit(part)
    return out


def margin_mm(cutoff: float) -> float:
    """The signed distance ``d`` (mm) of the mask ``D >= d`` that the cutoff ``u`` on the margin score stands for:
    ``d = 10 mm * ln(u / (1 - u))``; ``-inf`` for ``u <= 0`` (every voxel), ``+inf`` for ``u >= 1`` (up to the
    float32 ties at 1.0, none). The predicted mask is grown by ``-d`` mm (``d < 0``) or shrunk by ``d``."""
    if cutoff <= 0.0:
        return -math.inf
    if cutoff >= 1.0:
        return math.inf
    return MARGIN_SCALE_MM * math.log(cutoff / (1.0 - cutoff))


def signed_distance_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Signed distance (mm, float32) to the boundary of ``mask``: positive inside, negative outside.

    Every value is the float32 rounding of the exact Euclidean distance between voxel centres that scipy's
    whole-grid float64 ``distance_transform_edt(..., sampling=spacing)`` computes (the same feature voxel and the
    same arithmetic, so the same bits, except where two nearest voxels tie and the cropped search keeps the
    other one: then at most one float32 ulp apart; tested), with less memory (:func:`_edt_float32`; measured on
    512 x 512 x 300: about 13 bytes per voxel at peak on top of the map and mask instead of about 51,
    ``benchmarks/bench_distance.py``):

    * outside ``mask``: the distance to the nearest ``mask`` voxel, over the whole grid;
    * inside: the distance to the nearest voxel outside ``mask``, computed on the bounding box of ``mask`` grown
      by one voxel (clipped to the grid). Exact: for a voxel ``v`` of that box and any outside voxel ``b`` beyond
      the box along an axis, the voxel of the box's one-voxel shell with ``b``'s other coordinates is outside
      ``mask`` and at least as close to ``v``; so a nearest outside voxel always lies in the box.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.shape:
        raise ValueError(f"mask shape {mask.shape} != geometry shape {geometry.shape}")
    if not mask.any() or mask.all():
        diagonal = float(np.linalg.norm(np.asarray(geometry.shape) * np.asarray(geometry.spacing_zyx)))
        return np.full(mask.shape, diagonal if mask.all() else -diagonal, dtype=np.float32)
    sampling = np.asarray(geometry.spacing_zyx, dtype=np.float64)
    signed = _edt_float32(~mask, sampling)  # distance of every outside voxel to the mask (0 on the mask)
    np.negative(signed, out=signed)
    box = _grown_bounding_box(mask)
    inner = mask[box]
    signed[box][inner] = _edt_float32(inner, sampling)[inner]
    return signed


def _grown_bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the True voxels, one voxel larger on every side (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, mask.shape[axis])))
    return tuple(box)


#: Voxels per slab when distances are computed from the feature transform (bounds the float64 work arrays).
_SLAB_VOXELS = 1 << 21


def _edt_float32(foreground: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """``distance_transform_edt(foreground, sampling).astype(float32)`` bit for bit, without its full-size int32
    and float64 work arrays: the feature transform (int32, 12 bytes per voxel) is computed whole, the distances
    from it slab by slab with scipy's own arithmetic (offset times spacing, squared, summed over the axes in
    order, square root), then rounded to float32."""
    shape = foreground.shape
    features = np.empty((len(shape),) + shape, dtype=np.int32)
    ndimage.distance_transform_edt(
        foreground, sampling=sampling, return_distances=False, return_indices=True, indices=features
    )
    out = np.empty(shape, dtype=np.float32)
    plane = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        offsets = np.indices((z1 - z0,) + shape[1:], dtype=np.int32)
        offsets[0] += z0
        dt = (features[:, z0:z1] - offsets).astype(np.float64)
        for axis in range(len(shape)):
            dt[axis, ...] *= sampling[axis]
        np.multiply(dt, dt, dt)
        out[z0:z1] = np.sqrt(np.add.reduce(dt, axis=0))
    return out
