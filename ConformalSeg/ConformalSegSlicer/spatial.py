"""Slicer's IJK-to-RAS matrices <-> the library's :class:`~ConformalSegLib.common.geometry.Geometry` (LPS).

Slicer works in RAS (+x Right, +y Anterior, +z Superior); ITK, DICOM and ConformalSegLib in LPS
(+x Left, +y Posterior). The two differ by negating the first two world coordinates:
``RAS = diag(-1, -1, 1) @ LPS``, a matrix that is its own inverse. The voxel axes do not change:
``slicer.util.arrayFromVolume`` gives the numpy ``(k, j, i)`` = ``(z, y, x)`` array the library
expects, and the IJK-to-RAS matrix maps the index ``(i, j, k)`` = ``(x, y, z)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ConformalSegLib.common.geometry import LPS_TO_RAS, Geometry, geometry_from_ijk_to_ras

__all__ = ["LPS_TO_RAS", "geometry_from_ijk_to_ras", "ijk_to_ras_from_geometry", "lps_to_ras", "ras_to_lps"]


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a library geometry (for ``slicer.util.addVolumeFromArray`` etc.)."""
    return geometry.ijk_to_ras()


def lps_to_ras(point: Sequence[float]) -> np.ndarray:
    x, y, z = (float(v) for v in point)
    return np.array([-x, -y, z])


ras_to_lps = lps_to_ras  # the same sign flip both ways


def world_bounds(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned world box (RAS, mm) spanned by a volume's voxel centres, half a voxel beyond."""
    matrix = geometry.ijk_to_ras()
    nz, ny, nx = geometry.shape
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5) for k in (-0.5, nz - 0.5)])
    points = (matrix @ corners.T).T[:, :3]
    return points.min(axis=0), points.max(axis=0)


def grid_check(reference: Geometry, probability: Geometry) -> tuple[str | None, str | None]:
    """``(warning, error)`` for a probability map shown over ``reference`` (the CT): an error when their
    world boxes do not intersect (the map belongs to another scan or position), a warning when the grids
    differ (the segments are then on the map's own grid, which is fine if the map is registered)."""
    low_a, high_a = world_bounds(reference)
    low_b, high_b = world_bounds(probability)
    if np.any(high_a < low_b) or np.any(high_b < low_a):
        return None, (
            "The probability map does not overlap the input volume at all (their bounding boxes are disjoint): "
            "choose the map predicted for this scan."
        )
    mismatch = reference.mismatch(probability)
    if mismatch is not None:
        return (
            f"The probability map is not on the input volume's grid ({mismatch}); the segments use the map's grid.",
            None,
        )
    return None, None
