"""The low-memory signed distance transform (ConformalSegLib.conformal.score_transforms.signed_distance_mm)
against the whole-grid float64 computation it replaces: equal after float32 rounding, on random masks (sparse,
dense, touching the grid border, a single voxel, empty, full) and anisotropic spacings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal import score_transforms  # noqa: E402
from ConformalSegLib.conformal.score_transforms import signed_distance_mm  # noqa: E402


def whole_grid(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The previous implementation: two whole-grid float64 EDTs."""
    if not mask.any() or mask.all():
        diagonal = float(np.linalg.norm(np.asarray(mask.shape) * np.asarray(spacing)))
        return np.full(mask.shape, diagonal if mask.all() else -diagonal, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.where(mask, inside, -outside).astype(np.float32)


def geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    return Geometry(shape=shape, spacing=tuple(reversed(spacing)))


def masks(rng: np.random.Generator, shape: tuple[int, int, int]) -> list[np.ndarray]:
    blob = ndimage.gaussian_filter(rng.random(shape), 1.5)
    corner = np.zeros(shape, dtype=bool)
    corner[: shape[0] // 2, :3, -4:] = True  # touches three faces of the grid
    single = np.zeros(shape, dtype=bool)
    single[tuple(int(rng.integers(s)) for s in shape)] = True
    return [
        rng.random(shape) < 0.02,
        rng.random(shape) < 0.7,
        blob > np.quantile(blob, 0.9),
        corner,
        single,
        ~single,
        np.zeros(shape, dtype=bool),
        np.ones(shape, dtype=bool),
    ]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (0.8, 1.3, 3.1)])
def test_equals_the_whole_grid_transform(seed: int, spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(seed)
    shape = ((9, 17, 13), (1, 20, 20), (14, 6, 11), (5, 5, 40))[seed]
    for mask in masks(rng, shape):
        got = signed_distance_mm(mask, geometry(shape, spacing))
        want = whole_grid(mask, spacing)
        assert got.dtype == np.float32 and got.shape == shape
        # equal after float32 rounding (a nearest voxel found in the cropped box may differ from the whole-grid
        # one only at an exact tie, where both distances agree to within one float64 rounding)
        np.testing.assert_array_max_ulp(got, want, maxulp=1)
        assert np.array_equal(got > 0, mask)


def test_slabs_do_not_change_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    shape, spacing = (12, 10, 9), (1.7, 0.9, 1.1)
    mask = rng.random(shape) < 0.05
    want = whole_grid(mask, spacing)
    for slab in (1, 90, 91, 1 << 21):
        monkeypatch.setattr(score_transforms, "_SLAB_VOXELS", slab)
        np.testing.assert_array_max_ulp(signed_distance_mm(mask, geometry(shape, spacing)), want, maxulp=1)
