"""Expected-FNR control by conformal risk control (Angelopoulos et al., 2022).

Guarantee
---------
With calibration cases exchangeable with the test case, the mask ``prob >= c_hat`` satisfies
``E[FNR_test] <= epsilon`` (expectation over calibration and test draws). This bounds the *mean*
miss rate, not the chance that one scan misses too much: use CLS (:mod:`ConformalSegLib.conformal.cls`) for
the latter.

Formula and conventions
-----------------------
Masks are ``prob >= c``; larger sets for smaller ``c`` (``lambda = 1 - c`` in the paper's notation).
The loss ``FNR_i(c) = #{lesion voxels with prob < c} / m_i`` is in [0, 1] (B = 1) and
non-decreasing in ``c``. CRC picks

    c_hat = max{ c : n/(n+1) * Rhat(c) + 1/(n+1) <= epsilon },  Rhat(c) = mean_i FNR_i(c)

i.e. ``sum_i FNR_i(c) <= (n + 1) * epsilon - 1 =: budget``. ``sum_i FNR_i(c) = n_L - W(c)`` where
``W(c)`` sums the weights ``1/m_i`` of all lesion voxels with ``prob >= c`` (``n_L`` = cases with a
lesion). ``W`` only changes at lesion probabilities, so ``c_hat`` is one of them: sort all lesion
values descending, accumulate weights, and take the first value whose cumulated weight reaches
``n_L - budget`` (ties are merged: ``W`` is evaluated at distinct values, and the maximum over this
left-continuous step function is attained at a data value). The float cumulative sum only locates
the candidate; the candidate and its neighbour are then checked with a correctly rounded sum and,
inside its rounding band, with exact fractions, so ``c_hat`` is exact.

Edge cases: ``budget < 0`` (``n < 1/epsilon - 1``): no finite cutoff is valid, ``c_hat = -inf``
(whole image) with a :class:`CalibrationSetTooSmallWarning`. ``n_L <= budget``: every cutoff is
valid and ``c_hat = +inf`` (empty mask). Empty lesions follow the same policies as CLS
(``exclude`` by default: the mean is then over scans that have a lesion).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import ThresholdCalibration, too_small_message, used_cases, warn_if_whole_image_from_ties
from .exact import check_epsilon
from .summaries import LesionSummaries

#: Above this many lesion voxels, :func:`calibrate_crc` computes the same cutoff by the two-pass bracketed
#: path of :mod:`ConformalSegLib.conformal.bracketed_quantile` (64 consecutive-scan partitions, viewed, not
#: copied): its driver memory is ``8 x (voxels / 64)`` bytes of transient keys plus ``n x 65`` counts, where
#: :func:`crc_cutoff` sorts every voxel at once (about 40 bytes per voxel, cached for recalibration).
TWO_PASS_VOXELS = 1 << 25


def crc_budget(n: int, epsilon: float) -> Fraction:
    """``(n + 1) * epsilon - 1``: the largest allowed sum of per-case FNRs (exact)."""
    return (n + 1) * check_epsilon(epsilon) - 1


def min_crc_calibration_size(epsilon: float) -> int:
    """Smallest ``n`` with a non-negative budget: ``n >= 1/epsilon - 1``."""
    e = check_epsilon(epsilon)
    if e == 0:
        raise ConformalSegError("expected-FNR control needs epsilon > 0", fix="pass e.g. --epsilon 0.1")
    return max(0, math.ceil(1 / e - 1))


def _satisfies(summaries: LesionSummaries, cutoff: float, budget: Fraction) -> bool:
    """Exact test of ``sum_i FNR_i(cutoff) <= budget`` (empty lesions contribute 0).

    Miss counts are exact integers (:meth:`LesionSummaries.count_at_least`); the sum of the ratios is
    correctly rounded (``math.fsum``), with relative error below ``2 n u``; only inside that band is
    it recomputed with fractions.
    """
    sizes = summaries.lesion_sizes
    lesion = sizes > 0
    return fnr_sum_within((sizes - summaries.count_at_least(cutoff))[lesion], sizes[lesion], budget, summaries.n)


def fnr_sum_within(misses: np.ndarray, sizes: np.ndarray, budget: Fraction, n: int) -> bool:
    """Exact test of ``sum_i misses_i / sizes_i <= budget`` (cases with a lesion; ``n``: all cases, for the
    rounding band); shared with the partitioned path of :mod:`ConformalSegLib.conformal.bracketed_quantile`."""
    total = math.fsum((misses / sizes).tolist())
    tol = 2 * n * np.finfo(np.float64).eps * max(1.0, total) + 1e-300
    if total < float(budget) - tol:
        return True
    if total > float(budget) + tol:
        return False
    exact = sum((Fraction(int(d), int(m)) for d, m in zip(misses, sizes)), Fraction(0))
    return exact <= budget


def crc_cutoff(summaries: LesionSummaries, epsilon: float, *, n: int | None = None) -> float:
    """Exact CRC cutoff ``c_hat`` (see module docstring).

    ``n`` is the number of calibration cases (default: all cases of ``summaries``; with the
    ``exclude`` policy, the number of cases with a lesion: empty cases add no loss, so they need not
    be removed from the summaries). The global descending order of lesion values and the cumulated
    weights are computed once per summaries object (cached), so a new epsilon costs a binary search
    plus a couple of exact checks.
    """
    n = summaries.n if n is None else int(n)
    budget = crc_budget(n, epsilon)
    n_lesion = int(np.count_nonzero(summaries.lesion_sizes))
    if budget < 0:
        return float("-inf")
    if n_lesion <= budget:
        return float("inf")
    distinct, cumulative = summaries.weighted_distinct_descending()
    # cumulative[j] = W(distinct[j]): total weight of lesion voxels with prob >= distinct[j]
    j = int(np.searchsorted(cumulative, float(n_lesion - budget), side="left"))
    j = min(j, distinct.size - 1)
    if _satisfies(summaries, float(distinct[j]), budget):
        while j > 0 and _satisfies(summaries, float(distinct[j - 1]), budget):
            j -= 1
        return float(distinct[j])
    while not _satisfies(summaries, float(distinct[j]), budget):
        j += 1  # terminates: the smallest value gives a zero FNR sum
    return float(distinct[j])


def calibrate_crc(summaries: LesionSummaries, epsilon: float, *, empty: str = "exclude") -> ThresholdCalibration:
    """Expected-FNR calibration from summaries (``alpha`` does not apply: stored as ``None``)."""
    n = int(np.count_nonzero(used_cases(summaries, empty)))
    if n == 0:
        raise ConformalSegError(
            "no calibration case with a lesion: expected-FNR control needs lesion cases",
            fix="check the lesion label value(s) (--lesion-label) or use --empty include",
        )
    if summaries.values.size > TWO_PASS_VOXELS:  # the one-pass sort would need ~40 bytes per lesion voxel
        from .bracketed_quantile import LocalPartitions, case_ranges, crc_cutoff_partitioned

        cutoff = crc_cutoff_partitioned(LocalPartitions(case_ranges(summaries, 64)), epsilon, n=n)
    else:
        cutoff = crc_cutoff(summaries, epsilon, n=n)
    warn_if_whole_image_from_ties("Expected-FNR control", cutoff)
    if cutoff == float("-inf"):
        if check_epsilon(epsilon) == 0:  # one convention for impossible settings: the trivial set + a warning
            message = "Expected-FNR control needs epsilon > 0: at epsilon = 0 the result is the whole image."
        else:
            message = too_small_message(
                "Expected-FNR control", n, min_crc_calibration_size(epsilon), f"epsilon={epsilon}"
            )
        warnings.warn(message, CalibrationSetTooSmallWarning, stacklevel=2)
    with_lesion = int(np.count_nonzero(summaries.lesion_sizes > 0)) if empty == "include" else None
    return ThresholdCalibration("crc", float(epsilon), None, n, summaries.n - n, cutoff, n_with_lesion=with_lesion)
