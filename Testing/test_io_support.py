"""Shared helpers for the test_io_* tests (no tests here): a non-trivial geometry and file writers
that use SimpleITK/numpy directly, independently of the code under test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running pytest from any folder
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.geometry import Geometry  # noqa: E402


def rotation_direction(degrees: float = 30.0) -> tuple[float, ...]:
    """Row-major direction matrix: rotation about z then a flip of the y axis (non-identity, det -1)."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    return tuple((rot @ np.diag([1.0, -1.0, 1.0])).reshape(-1))


SHAPE = (5, 6, 7)  # (z, y, x)
GEOM = Geometry(shape=SHAPE, spacing=(0.7, 0.9, 2.5), origin=(-12.5, 30.25, 7.0), direction=rotation_direction())


def random_probabilities(shape: tuple[int, ...] = SHAPE, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(dtype)


def write_sitk(array: np.ndarray, path: Path, geometry: Geometry | None = GEOM, *, is_vector: bool = False) -> Path:
    """Write ``array`` (numpy order) with ``geometry`` (None: SimpleITK defaults) using SimpleITK directly."""
    img = sitk.GetImageFromArray(array, isVector=is_vector)
    if geometry is not None:
        img.SetSpacing(geometry.spacing)
        img.SetOrigin(geometry.origin)
        img.SetDirection(geometry.direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def write_garbage(path: Path, size: int = 600, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def files_in(folder: Path) -> list[str]:
    """All entry names in ``folder`` (hidden ones included), sorted."""
    return sorted(p.name for p in folder.iterdir())
