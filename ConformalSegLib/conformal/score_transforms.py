"""Score transforms for conformal confidence sets (Davenport, section 2.5).

A transform maps a probability map ``s`` to a "lesion-ness" score ``T(s)`` (higher = more likely
lesion). Confidence sets threshold ``T`` (see :mod:`ConformalSegLib.conformal.confidence_sets`): the
inner set uses the maxima of ``T`` over true background, the outer set the maxima of ``-T`` over
true lesion. Validity needs nothing of
``T`` beyond being computed from the image alone (the same way for calibration and test cases); the
transform only changes how tight the sets are. The paper's ``f_I(-s)`` is ``-T`` here: every
transform below is (up to ties at the mask level) antisymmetric, ``T(-s) = -T(s)``.

* ``identity``: ``T = s`` (probability units).
* ``distance[:c]``: signed Euclidean distance in **mm** (voxel spacing respected) to the boundary of
  the predicted mask ``M = {s >= c}`` (default ``c = 0.5``): ``+dist(v, outside M)`` for ``v`` in
  ``M`` and ``-dist(v, M)`` outside. Magnitudes are at least one voxel spacing (never 0). The
  complement's signed distance is the negation, so the transform is antisymmetric. An empty
  (full) predicted mask gives the constant ``-D`` (``+D``), ``D`` the physical diagonal of the grid.
* ``gaussian:sigma``: Gaussian smoothing of ``s`` with standard deviation ``sigma`` mm per axis
  (converted to voxels with the spacing; linear, hence antisymmetric), borders ``nearest``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry


@dataclass(frozen=True)
class ScoreTransform:
    """A named, parameterised transform ``probability -> score`` (see module docstring)."""

    kind: str  # "identity" | "distance" | "gaussian"
    parameter: float | None = None

    @property
    def name(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{float(self.parameter)!r}"

    @property
    def units(self) -> str:
        return "mm" if self.kind == "distance" else "probability"

    def __call__(self, probability: np.ndarray, geometry: Geometry) -> np.ndarray:
        if self.kind == "identity":
            return np.asarray(probability)
        if self.kind == "distance":
            return signed_distance_mm(np.asarray(probability) >= self.parameter, geometry)
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
        fix="use identity, distance[:LEVEL] (LEVEL in (0,1], default 0.5) or gaussian:SIGMA_MM",
    )


def signed_distance_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Signed distance (mm, float32) to the boundary of ``mask``: positive inside, negative outside."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.shape:
        raise ValueError(f"mask shape {mask.shape} != geometry shape {geometry.shape}")
    if not mask.any() or mask.all():
        diagonal = float(np.linalg.norm(np.asarray(geometry.shape) * np.asarray(geometry.spacing_zyx)))
        return np.full(mask.shape, diagonal if mask.all() else -diagonal, dtype=np.float32)
    sampling = geometry.spacing_zyx
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    signed: np.ndarray = np.where(mask, inside, -outside).astype(np.float32)
    return signed
