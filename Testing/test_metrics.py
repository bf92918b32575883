"""Per-case metrics (ConformalSegLib.evaluation.metrics) on hand-built arrays and against brute force."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.evaluation import metrics  # noqa: E402
from ConformalSegLib.evaluation.metrics import (  # noqa: E402
    count_at_least,
    count_greater,
    dice,
    dice_from_masks,
    ecr,
    finite_mean,
    fnr,
    fnr_within,
    hd95,
    lesion_hits,
    prediction_compactness,
)

# ----------------------------------------------------------------------------- FNR / ECR / PC / Dice


def test_fnr_from_counts_with_empty_lesion():
    np.testing.assert_array_equal(fnr([0, 1, 3, 0], [10, 10, 3, 0]), [0.0, 0.1, 1.0, 0.0])
    assert fnr(2, 8) == 0.25
    with pytest.raises(ValueError):
        fnr(4, 3)


def test_fnr_within_is_exact_integer_rule():
    # 0.29 * 100 == 28.999999999999996 in floating point: 29 misses of 100 are still allowed
    assert fnr_within(29, 100, 0.29)
    assert not fnr_within(30, 100, 0.29)
    np.testing.assert_array_equal(fnr_within([3, 4, 0, 0], [10, 10, 0, 5], 0.3), [True, False, True, True])
    assert fnr_within(5, 5, 1.0) and not fnr_within(1, 5, 0.0)


def test_ecr_fraction_of_cases():
    assert ecr([0, 2, 5, 0], [10, 10, 10, 0], 0.2) == 0.75
    assert np.isnan(ecr([], [], 0.1))


def test_prediction_compactness():
    np.testing.assert_array_equal(prediction_compactness([0, 5, 20], [20, 20, 20]), [0.0, 0.25, 1.0])
    with pytest.raises(ValueError):
        prediction_compactness(3, 0)


def test_dice_from_counts_and_masks_incl_empty():
    truth = np.zeros((4, 5, 6), bool)
    truth[1:3, 1:4, 2:5] = True  # 18 voxels
    pred = np.zeros_like(truth)
    pred[1:3, 2:4, 2:6] = True  # 16 voxels, 12 inside truth
    assert dice_from_masks(pred, truth) == pytest.approx(2 * 12 / (16 + 18))
    assert dice(12, 16, 18) == pytest.approx(24 / 34)
    empty = np.zeros_like(truth)
    assert dice_from_masks(empty, empty) == 1.0  # both empty: perfect agreement
    assert dice_from_masks(empty, truth) == 0.0
    assert dice_from_masks(pred, empty) == 0.0
    np.testing.assert_array_equal(dice([0, 0, 3], [0, 4, 3], [0, 0, 3]), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        dice(5, 4, 10)


# ----------------------------------------------------------------------------- HD95

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="MONAI not installed")


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric HD95 from surface voxels (mask minus its erosion) with linear-interpolated percentiles."""

    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_empty_mask_rule():
    truth = np.zeros((6, 7, 8), bool)
    truth[2:4, 2:5, 3:6] = True
    empty = np.zeros_like(truth)
    assert np.isnan(hd95(empty, empty, (2.5, 0.9, 0.8)))
    assert hd95(empty, truth, (2.5, 0.9, 0.8)) == np.inf
    assert hd95(truth, empty, (2.5, 0.9, 0.8)) == np.inf


@needs_monai
def test_hd95_single_voxels_uses_spacing_in_numpy_order():
    a = np.zeros((6, 7, 8), bool)
    b = np.zeros_like(a)
    a[2, 3, 1] = True
    b[2, 3, 4] = True  # 3 voxels apart along x (last numpy axis)
    assert hd95(a, b, (2.5, 0.9, 0.8)) == pytest.approx(3 * 0.8, rel=1e-6)
    c = np.zeros_like(a)
    c[4, 3, 1] = True  # 2 voxels apart along z
    assert hd95(a, c, (2.5, 0.9, 0.8)) == pytest.approx(2 * 2.5, rel=1e-6)
    assert hd95(a, a, (2.5, 0.9, 0.8)) == 0.0


def test_hd95_without_monai_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.metrics", None)  # makes the import fail
    a = np.zeros((4, 4, 4), bool)
    a[1, 1, 1] = True
    assert np.isnan(hd95(a & False, a & False))  # the empty-mask rule needs no MONAI
    with pytest.raises(ConformalSegError, match="MONAI.*Fix"):
        hd95(a, a)


@needs_monai
def test_hd95_matches_brute_force_and_crop_is_exact():
    rng = np.random.default_rng(5)
    spacing = (2.0, 0.9, 0.7)
    truth = ndimage.binary_dilation(rng.random((14, 16, 18)) > 0.995, iterations=2)
    pred = ndimage.binary_dilation(truth, iterations=1) & (rng.random(truth.shape) > 0.1)
    pred[0, 0, 0] = True  # a far-away false positive at the array border
    value = hd95(pred, truth, spacing)
    assert value == pytest.approx(_brute_hd95(pred, truth, spacing), rel=1e-5)
    assert value == pytest.approx(hd95(pred, truth, spacing, crop=False), rel=1e-6)


def test_finite_mean_counts_excluded():
    mean, excluded = finite_mean([1.0, np.inf, np.nan, 3.0])
    assert mean == 2.0 and excluded == 2
    mean, excluded = finite_mean([np.nan])
    assert np.isnan(mean) and excluded == 1


# ----------------------------------------------------------------------------- exact counting


def _tied_volume(rng, dtype, shape=(7, 9, 11)):
    return (rng.integers(0, 9, size=shape) / 8).astype(dtype)  # only 9 distinct values: many ties


def _thresholds(values: np.ndarray, rng) -> np.ndarray:
    levels = np.unique(values).astype(np.float64)
    tricky = np.concatenate(
        [
            levels,  # exactly at tied values
            np.nextafter(levels, np.inf),
            np.nextafter(levels, -np.inf),  # float64 neighbours of float32 values
            rng.random(10),
            [-np.inf, np.inf, 0.0, 1.0, 0.5, 0.5, -3.0, 7.0],  # repeats, out of range
        ]
    )
    return rng.permutation(tricky)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counting_equals_brute_force_with_ties(dtype, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_VOXELS", 97)  # force many chunks
    rng = np.random.default_rng(11)
    values = _tied_volume(rng, dtype)
    thresholds = _thresholds(values, rng)
    ge = count_at_least(values, thresholds)
    gt = count_greater(values, thresholds)
    values64 = values.astype(np.float64)
    np.testing.assert_array_equal(ge, [(values64 >= t).sum() for t in thresholds])
    np.testing.assert_array_equal(gt, [(values64 > t).sum() for t in thresholds])
    assert ge.dtype == np.int64 and ge.shape == thresholds.shape
    # thresholds of any shape come back in that shape
    grid = thresholds[:12].reshape(3, 4)
    np.testing.assert_array_equal(count_at_least(values, grid), ge[:12].reshape(3, 4))
    assert count_at_least(values, np.zeros((0,))).shape == (0,)


def test_counting_continuous_scores_like_distance_maps():
    rng = np.random.default_rng(2)
    scores = (rng.normal(size=(10, 12, 14)) * 7).astype(np.float32)
    picks = rng.choice(scores.ravel(), 20).astype(np.float64)  # thresholds taken from the data (ties)
    thresholds = np.concatenate([picks, picks + 1e-9, rng.normal(size=5) * 7])
    np.testing.assert_array_equal(count_greater(scores, thresholds), [(scores > t).sum() for t in thresholds])
    np.testing.assert_array_equal(count_at_least(scores, thresholds), [(scores >= t).sum() for t in thresholds])


def test_lesion_hits_on_descending_runs():
    rng = np.random.default_rng(3)
    values = np.sort(_tied_volume(rng, np.float32, (50,)))[::-1]
    cutoffs = _thresholds(values, rng)
    np.testing.assert_array_equal(lesion_hits(values, cutoffs), [(values >= c).sum() for c in cutoffs])
    np.testing.assert_array_equal(lesion_hits(values[:0], [0.5, -np.inf]), [0, 0])
    np.testing.assert_array_equal(lesion_hits(values, np.array([[0.5, -np.inf]])).shape, (1, 2))
