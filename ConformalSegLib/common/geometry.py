"""Image geometry (the physical grid of a volume) shared by every reader, writer and transform.

Conventions
-----------
* Arrays are in **numpy order** ``(k, j, i)`` = ``(z, y, x)``, exactly as
  ``SimpleITK.GetArrayFromImage`` returns them.
* ``spacing``, ``origin`` and ``direction`` are stored in **ITK order** ``(x, y, z)`` (LPS physical
  space), exactly as ``SimpleITK.Image.GetSpacing()`` etc. return them. ``direction`` is the
  row-major 3x3 direction cosine matrix as a flat 9-tuple.
* :attr:`Geometry.spacing_zyx` gives the spacing in numpy order, which is what distance transforms and
  Gaussian filters over arrays need.
* World space is **LPS** (ITK, DICOM). Slicer, nibabel and MONAI use **RAS**; the two differ by
  negating the first two world coordinates (:data:`LPS_TO_RAS`, its own inverse). The voxel axes do
  not change. :meth:`Geometry.ijk_to_ras` and :func:`geometry_from_ijk_to_ras` are the only places
  that convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

#: LPS <-> RAS for homogeneous 4x4 matrices: negate the x and y world coordinates (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Physical grid of a 3D volume: array shape (numpy order) and ITK-ordered spacing/origin/direction."""

    shape: tuple[int, ...]  #: three values (checked)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)  #: three values (checked)
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)  #: three values (checked)
    direction: tuple[float, ...] = field(default=IDENTITY_DIRECTION)

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"Geometry needs a 3D shape, got {self.shape}")
        if len(self.spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive finite numbers, got {self.spacing}")
        if len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("origin needs 3 values and direction 9 values")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in numpy axis order (mm), for array filters."""
        x, y, z = self.spacing
        return (z, y, x)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping ITK index (i, j, k) to LPS physical coordinates (mm)."""
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping ITK index (i, j, k) to RAS physical coordinates (Slicer's IJK-to-RAS,
        MONAI's and nibabel's affine)."""
        ras: np.ndarray = LPS_TO_RAS @ self.ijk_to_lps()
        return ras

    def mismatch(self, other: Geometry, *, rtol: float = 1e-4, atol_mm: float = 1e-3) -> str | None:
        """Describe how ``other`` differs from this geometry, or ``None`` when they match.

        Spacing is compared relatively (``rtol``), origin in mm (``atol_mm`` plus ``rtol`` of the
        spacing), direction cosines absolutely (1e-4).
        """
        if self.shape != other.shape:
            return f"shape {self.shape} != {other.shape}"
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0.0):
            return f"spacing {self.spacing} != {other.spacing}"
        tol = atol_mm + rtol * max(self.spacing)
        if not np.allclose(self.origin, other.origin, rtol=0.0, atol=tol):
            return f"origin {self.origin} != {other.origin}"
        if not np.allclose(self.direction, other.direction, rtol=0.0, atol=1e-4):
            return f"direction {self.direction} != {other.direction}"
        return None


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, shape_zyx: tuple[int, ...] | list[int]) -> Geometry:
    """The geometry of a volume given its 4x4 IJK-to-RAS matrix and numpy ``(z, y, x)`` shape.

    Raises ``ValueError`` for a matrix that is not 4x4 or has a zero/non-finite column.
    """
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"IJK-to-RAS must be a 4x4 matrix, got shape {matrix.shape}")
    lps = LPS_TO_RAS @ matrix
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError("IJK-to-RAS matrix has a zero or invalid column (degenerate volume geometry)")
    nz, ny, nx = (int(s) for s in shape_zyx)
    sx, sy, sz = (float(s) for s in spacing)
    ox, oy, oz = (float(o) for o in lps[:3, 3])
    return Geometry(
        shape=(nz, ny, nx),
        spacing=(sx, sy, sz),
        origin=(ox, oy, oz),
        direction=tuple(float(d) for d in (axes / spacing).reshape(-1)),
    )
