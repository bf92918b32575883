"""Per-case evaluation metrics, computed from integer counts wherever possible (hence exactly).

Conventions
-----------
* A mask at probability cutoff ``c`` is ``prob >= c`` (as in :mod:`ConformalSegLib.conformal.cls`); an inner
  confidence set is ``T > lambda`` and an outer one ``T >= t`` (as in
  :mod:`ConformalSegLib.conformal.confidence_sets`).
* **FNR** ``= misses / m`` for a lesion of ``m`` voxels; **FNR := 0 when the lesion is empty**
  (nothing can be missed). Whether ``FNR <= epsilon`` is decided by the exact integer rule
  ``misses <= floor(epsilon * m)`` of :func:`ConformalSegLib.conformal.exact.fnr_exceeds`, never by comparing
  the float ratio.
* **ECR** (empirical coverage rate, Tan et al.): the fraction of (test) cases with
  ``FNR <= epsilon``.
* **PC** (prediction compactness, Tan et al.): predicted voxels / total voxels of the image.
* **Dice** ``= 2 TP / (|pred| + |truth|)``; **Dice := 1 when both masks are empty** (perfect
  agreement on a lesion-free scan).
* **HD95** (mm): the symmetric 95th-percentile Hausdorff distance of MONAI
  (``monai.metrics.compute_hausdorff_distance(..., percentile=95, spacing=...)``: the larger of the
  two directed 95th percentiles of surface distances), with the voxel spacing in numpy axis order.
  Rule for empty masks: **both empty -> NaN** (undefined, nothing to compare); **exactly one empty ->
  +inf** (no surface to measure against). Neither enters a mean: :func:`finite_mean` drops them and
  returns how many it dropped, which reports must show next to the mean.

Exact voxel counting at many thresholds
---------------------------------------
:func:`count_at_least` and :func:`count_greater` count ``#{v >= t}`` / ``#{v > t}`` for every
threshold ``t`` of a list in one pass over the volume: each float64 threshold is first rounded to
the volume's float dtype in the direction that preserves the comparison (up for ``>=``, down for
``>``, as :func:`ConformalSegLib.conformal.cls.apply_threshold` does), the distinct rounded thresholds are
sorted, every voxel is located with one ``searchsorted`` (chunked, so the int64 index array never
exceeds a few MB), the positions are histogrammed with ``bincount`` and a reverse cumulative sum
gives the counts. The result equals the brute-force ``(values >= t).sum()`` exactly, ties included.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.exact import fnr_exceeds

__all__ = [
    "CHUNK_VOXELS",
    "count_at_least",
    "count_greater",
    "dice",
    "dice_from_masks",
    "ecr",
    "finite_mean",
    "fnr",
    "fnr_within",
    "hd95",
    "lesion_hits",
    "prediction_compactness",
    "require_monai",
]

#: Voxels located per ``searchsorted`` call in :func:`count_at_least` / :func:`count_greater`.
CHUNK_VOXELS = 1 << 20


# ----------------------------------------------------------------------------- FNR / ECR


def fnr(misses: np.ndarray | int, lesion_size: np.ndarray | int) -> np.ndarray:
    """``misses / m`` as float64 (0 where the lesion is empty); broadcasts like numpy."""
    misses = np.asarray(misses, dtype=np.int64)
    m = np.asarray(lesion_size, dtype=np.int64)
    if np.any(misses < 0) or np.any(misses > m):
        raise ValueError("misses must lie between 0 and the lesion size")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(m > 0, misses / np.maximum(m, 1), 0.0)
    return out.astype(np.float64)


def fnr_within(misses: np.ndarray | int, lesion_size: np.ndarray | int, epsilon: float) -> np.ndarray:
    """Exact ``FNR <= epsilon`` (True for empty lesions), by the integer rule of
    :mod:`ConformalSegLib.conformal.exact`."""
    misses, m = np.broadcast_arrays(np.asarray(misses, dtype=np.int64), np.asarray(lesion_size, dtype=np.int64))
    return ~fnr_exceeds(misses, m, epsilon)


def ecr(misses: np.ndarray, lesion_sizes: np.ndarray, epsilon: float) -> float:
    """Fraction of cases with ``FNR <= epsilon`` (exact rule); NaN when there are no cases."""
    within = fnr_within(np.atleast_1d(misses), np.atleast_1d(lesion_sizes), epsilon)
    return float(within.mean()) if within.size else float("nan")


# ----------------------------------------------------------------------------- PC / Dice


def prediction_compactness(predicted: np.ndarray | int, total: np.ndarray | int) -> np.ndarray:
    """PC = predicted voxels / total voxels (float64)."""
    predicted = np.asarray(predicted, dtype=np.int64)
    total = np.asarray(total, dtype=np.int64)
    if np.any(total <= 0):
        raise ValueError("the total number of voxels must be positive")
    if np.any(predicted < 0) or np.any(predicted > total):
        raise ValueError("predicted voxels must lie between 0 and the total")
    return (predicted / total).astype(np.float64)


def dice(true_positives: np.ndarray | int, predicted: np.ndarray | int, truth: np.ndarray | int) -> np.ndarray:
    """``2 TP / (|pred| + |truth|)`` from counts (float64); 1 where both masks are empty."""
    tp = np.asarray(true_positives, dtype=np.int64)
    pred = np.asarray(predicted, dtype=np.int64)
    true = np.asarray(truth, dtype=np.int64)
    if np.any(tp < 0) or np.any(tp > np.minimum(pred, true)):
        raise ValueError("true positives must lie between 0 and min(|pred|, |truth|)")
    denominator = pred + true
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), 1.0)
    return out.astype(np.float64)


def dice_from_masks(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(prediction & truth))
    return float(dice(tp, int(np.count_nonzero(prediction)), int(np.count_nonzero(truth))))


# ----------------------------------------------------------------------------- HD95


def _crop_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by one voxel (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def hd95(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | np.ndarray | None = None, *, crop: bool = True
) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two boolean masks, computed by MONAI.

    ``spacing`` is per *array axis* (numpy ``(z, y, x)`` order, i.e. ``Geometry.spacing_zyx``;
    ``None`` = 1 mm). Both masks empty -> NaN; exactly one empty -> +inf (see module docstring).
    With ``crop`` (default) both masks are cut to the bounding box of their union plus one voxel
    before MONAI sees them; surface voxels and their Euclidean distances are unchanged, so the value
    is the same as on the full grid, with far less memory.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    has_pred, has_truth = bool(prediction.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return float("nan")
    if has_pred != has_truth:
        return float("inf")
    if crop:
        box = _crop_box(prediction | truth)
        prediction, truth = prediction[box], truth[box]
    spacing_list = [1.0] * prediction.ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing_list) != prediction.ndim:
        raise ValueError(f"spacing needs {prediction.ndim} values (numpy axis order), got {spacing}")
    compute_hausdorff_distance = require_monai()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices and empty-mask warnings
        value = compute_hausdorff_distance(
            prediction[None, None], truth[None, None], include_background=True, percentile=95, spacing=spacing_list
        )
    return float(value.reshape(-1)[0])


def require_monai():
    """MONAI's ``compute_hausdorff_distance``; :class:`ConformalSegError` with the fix when MONAI is missing."""
    try:
        from monai.metrics import compute_hausdorff_distance
    except ImportError as exc:
        raise ConformalSegError(
            f"HD95 needs MONAI, which cannot be imported ({exc})",
            fix="install it (pip install 'conformalseg[inference]', torch first) or turn HD95 "
            "off (hd95=False, --no-hd95)",
        ) from exc
    return compute_hausdorff_distance


def finite_mean(values: np.ndarray | Sequence[float]) -> tuple[float, int]:
    """Mean of the finite values and the number of non-finite ones left out (NaN mean if none)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(values)
    n_excluded = int(values.size - np.count_nonzero(finite))
    mean = float(values[finite].mean()) if finite.any() else float("nan")
    return mean, n_excluded


# ----------------------------------------------------------------------------- exact counting


def _rounded_thresholds(thresholds: np.ndarray, dtype: np.dtype, strict: bool) -> np.ndarray:
    """Thresholds in ``dtype`` such that ``v >= r <=> v >= t`` (``strict``: ``v > r <=> v > t``)."""
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if np.isnan(t).any():
        raise ValueError("thresholds must not be NaN")
    with np.errstate(over="ignore"):
        cast = t.astype(dtype)
    back = cast.astype(np.float64)
    if strict:  # largest dtype value <= t: v > t <=> v > r for every v of the dtype
        fix = back > t
        cast[fix] = np.nextafter(cast[fix], dtype.type(-np.inf))
    else:  # smallest dtype value >= t
        fix = back < t
        cast[fix] = np.nextafter(cast[fix], dtype.type(np.inf))
    return cast


def _count(values: np.ndarray, thresholds: np.ndarray | Sequence[float], strict: bool) -> np.ndarray:
    values = np.asarray(values)
    dtype = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    shape = thresholds.shape
    if thresholds.size == 0:
        return np.zeros(shape, dtype=np.int64)
    rounded = _rounded_thresholds(thresholds, dtype, strict)
    distinct, inverse = np.unique(rounded, return_inverse=True)
    flat = values.reshape(-1)
    side: Literal["left", "right"] = (
        "left" if strict else "right"
    )  # position = #{distinct < v} (strict) or #{distinct <= v}
    histogram = np.zeros(distinct.size + 1, dtype=np.int64)
    for start in range(0, flat.size, CHUNK_VOXELS):
        chunk = flat[start : start + CHUNK_VOXELS]
        if chunk.dtype != dtype:
            chunk = chunk.astype(dtype)
        histogram += np.bincount(np.searchsorted(distinct, chunk, side=side), minlength=distinct.size + 1)
    # a voxel at position j satisfies the comparison for distinct[0..j-1]: count(k) = #{j > k}
    at_or_above = np.cumsum(histogram[::-1])[::-1]
    return at_or_above[1:][inverse.reshape(-1)].reshape(shape)


def count_at_least(values: np.ndarray, thresholds: np.ndarray | Sequence[float]) -> np.ndarray:
    """``[(values >= t).sum() for t in thresholds]`` exactly, in one pass (int64, thresholds' shape).

    Thresholds may be ``+-inf`` and in any order or repeated; ``values`` any float array (other
    dtypes are compared as float64).
    """
    return _count(values, thresholds, strict=False)


def count_greater(values: np.ndarray, thresholds: np.ndarray | Sequence[float]) -> np.ndarray:
    """``[(values > t).sum() for t in thresholds]`` exactly, in one pass (int64, thresholds' shape)."""
    return _count(values, thresholds, strict=True)


def lesion_hits(descending: np.ndarray, cutoffs: np.ndarray | Sequence[float]) -> np.ndarray:
    """``#{v >= c}`` for each cutoff ``c``, for a case's lesion values sorted in *descending* order
    (a run of :class:`~ConformalSegLib.conformal.summaries.LesionSummaries`): one ``searchsorted``, exact.

    The misses of the mask ``prob >= c`` are then ``m - hits``.
    """
    descending = np.asarray(descending)
    dtype = descending.dtype if descending.dtype.kind == "f" else np.dtype(np.float64)
    cutoffs = np.asarray(cutoffs, dtype=np.float64)
    rounded = _rounded_thresholds(cutoffs, dtype, strict=False).reshape(cutoffs.shape)
    # v >= c <=> -v <= -c; -descending is ascending (negation is exact)
    ascending = -descending.astype(dtype, copy=False)
    return np.searchsorted(ascending, -rounded, side="right").astype(np.int64)
