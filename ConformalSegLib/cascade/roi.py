"""Regions of interest (ROIs): boxes around kept components, crops with their geometry, paste-back.

Boxes are tuples of three ``slice`` objects in numpy ``(z, y, x)`` order with ``step`` None and
``0 <= start < stop <= size`` (half-open). A margin grows a component's bounding box by a number of
voxels per axis and is then **clipped to the volume** (a box at the border is simply smaller on that
side; nothing is padded). Margins may be given in voxels (the paper's 0 / 16) or in mm
(``ceil(mm / spacing)`` voxels per axis, so anisotropic grids get the same physical context).

Paste rule: :func:`paste_max` writes ``target[box] = max(target[box], patch)``. With a target that
starts at 0 and non-negative patches (probabilities, variances) this is "the value of the ROI where
one ROI covers the voxel, the maximum over ROIs where several overlap, 0 elsewhere".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry

__all__ = ["Box", "crop_geometry", "margin_voxels", "paste_max", "roi_box"]

Box = tuple[slice, slice, slice]


def margin_voxels(
    spacing_zyx: Sequence[float], *, voxels: int | None = None, mm: float | None = None
) -> tuple[int, int, int]:
    """Per-axis margin in voxels (numpy order) from exactly one of ``voxels`` or ``mm``
    (``ceil(mm / spacing)``, with a 1e-9 tolerance so that 3.2 mm on a 1.6 mm grid is 2 voxels)."""
    if (voxels is None) == (mm is None):
        raise ConformalSegError("give the ROI margin either in voxels or in mm (exactly one)")
    if voxels is not None:
        if isinstance(voxels, bool) or int(voxels) != voxels or voxels < 0:
            raise ConformalSegError(f"the ROI margin in voxels must be an integer >= 0, got {voxels!r}")
        return (int(voxels),) * 3
    assert mm is not None
    if not math.isfinite(mm) or mm < 0:
        raise ConformalSegError(f"the ROI margin in mm must be >= 0, got {mm!r}")
    return tuple(int(math.ceil(float(mm) / float(s) - 1e-9)) for s in spacing_zyx)  # type: ignore[return-value]


def roi_box(bbox: Sequence[tuple[int, int]], margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``bbox`` (half-open ``(start, stop)`` per axis) grown by ``margin`` voxels per axis, clipped to ``shape``."""
    return tuple(
        slice(max(int(a) - int(m), 0), min(int(b) + int(m), int(n))) for (a, b), m, n in zip(bbox, margin, shape)
    )  # type: ignore[return-value]


def crop_geometry(geometry: Geometry, box: Box) -> Geometry:
    """The geometry of ``array[box]``: same spacing and direction, origin moved to the box's first voxel."""
    start_ijk = np.array([box[2].start, box[1].start, box[0].start, 1.0], dtype=float)  # (x, y, z) index
    origin = geometry.ijk_to_lps() @ start_ijk
    shape = tuple(int(s.stop - s.start) for s in box)
    return Geometry(shape=shape, spacing=geometry.spacing, origin=tuple(origin[:3]), direction=geometry.direction)


def paste_max(target: np.ndarray, patch: np.ndarray, box: Box) -> None:
    """In place: ``target[box] = maximum(target[box], patch)`` (see the module docstring)."""
    region = target[box]
    if region.shape != np.shape(patch):
        raise ValueError(f"patch shape {np.shape(patch)} does not fit the box {region.shape}")
    np.maximum(region, patch, out=region)
