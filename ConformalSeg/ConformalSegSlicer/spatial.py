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
