"""Bisection baselines for the CLS critical cutoff -- kept ONLY for the benchmarks' comparisons.

Nothing in :mod:`ConformalSegLib` uses this module. The library computes the critical cutoff of a
case exactly, as an order statistic (``ConformalSegLib.conformal.cls.critical_cutoff``: the ``k``-th largest
lesion probability, ``k = m - floor(epsilon * m)``); the benchmarks compare it with the search that
the CLS paper describes.

Algorithm 1 of the paper (CLS, Tan et al.), as benchmarked here
----------------------------------------------------------------
For each calibration case, bisect over ``t`` in ``[0, 1]`` with the mask ``prob >= 1 - t``:
``t = (lo + hi) / 2``; evaluate ``FNR(t)`` (a full threshold pass of the volume plus a count);
stop when ``|FNR(t) - epsilon| <= delta`` (``delta = 1e-4``); otherwise move ``lo = t`` when
``FNR(t) > epsilon`` (the mask must grow) and ``hi = t`` when ``FNR(t) < epsilon``. ``t_i`` is the
last ``t``; the conformal step then takes ``t_hat`` = the ``ceil((1 - alpha)(n + 1))``-th smallest
``t_i`` and thresholds at ``1 - t_hat``.

**Iteration cap.** ``FNR_i`` is a step function with steps of ``1 / m_i`` (or larger, at ties). When
no step lands inside ``[epsilon - delta, epsilon + delta]`` -- e.g. ``m = 57`` and ``epsilon = 0.1``
(FNR jumps from 5/57 = 0.0877 to 6/57 = 0.105), or any lesion with ``m < 1 / (2 delta)`` whose
``epsilon * m`` is not nearly an integer -- the paper's loop never terminates. We stop after
``max_iter = 60`` iterations (by then ``hi - lo = 2**-60``, below float64 resolution near 1) and
report ``converged=False``; ``t_i`` is then the last midpoint, on either side of the jump.

Why the baseline differs from the exact answer
----------------------------------------------
* **Tolerance, not a target.** The stop rule accepts any ``t`` with ``|FNR(t) - epsilon| <= delta``,
  so ``FNR(t_i)`` may *exceed* epsilon by up to ``delta`` (the per-case guarantee is then slightly
  violated) or fall short of it (a larger mask than needed). The exact ``c_i`` is the largest
  cutoff with ``FNR <= epsilon`` -- an order statistic, with no tolerance at all. After the cap, the
  answer can be on the wrong side of the jump by a whole step ``1 / m``.
* **The ``1 - t`` rounding.** The mask is ``prob >= 1 - t``: ``1 - t`` is evaluated in float64,
  and a Python float compared with a float32 array is rounded *to nearest* float32 (NumPy >= 2,
  NEP 50), so the mask evaluated is ``prob >= fl32(1 - t)``: when ``1 - t`` is rounded down it keeps
  voxels just below ``1 - t``, so it is not exactly the mask ``prob >= 1 - t`` that the returned
  ``t`` describes. The exact cutoff is a stored data value and is compared exactly
  (``ConformalSegLib.conformal.cls.apply_threshold`` rounds it *up* to the array's dtype). ``t`` itself is
  never a data value, so ``1 - t_hat`` is at best within the search resolution of ``c_hat``.
* **FNR in floating point.** ``FNR = misses / m`` compared with ``epsilon`` in floating point can be
  off by one voxel near the boundary (``0.29 * 100`` is ``28.999999999999996``); the library compares
  ``misses <= floor(epsilon * m)`` exactly (:mod:`ConformalSegLib.conformal.exact`).

:func:`largest_cutoff_bisection` is the *correct* variant: it bisects directly on the cutoff
``c`` (no ``1 - t``), keeps the invariant ``FNR(lo) <= epsilon < FNR(hi)`` with the exact
integer test, compares the cutoff exactly (rounded up to the array dtype), and returns ``lo`` once
``hi - lo <= tol``: always safe (``lo <= c_i``) and within ``tol`` of the exact ``c_i``, but still
``~log2(1 / tol)`` passes over the data instead of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ConformalSegLib.conformal.cls import round_up_to_dtype

DELTA = 1e-4
MAX_ITER = 60
DEFAULT_TOL = 2.0**-24  # float32 spacing just below 1.0 is 2**-24


@dataclass(frozen=True)
class BisectionResult:
    """Outcome of one per-case search."""

    cutoff: float  # probability cutoff of the answer (1 - t for Algorithm 1), float64
    t: float  # the paper's t = 1 - cutoff (for :func:`largest_cutoff_bisection`: 1 - cutoff)
    fnr: float  # FNR at the answer as the loop evaluated it
    iterations: int  # FNR evaluations (each one a pass over the data)
    converged: bool  # False when the iteration cap stopped the loop


round_up_to_float_dtype = round_up_to_dtype  # smallest value of the dtype >= value (exact comparisons)


class VolumeFNR:
    """FNR of the mask ``prob >= c`` on a whole volume, as Algorithm 1 evaluates it: threshold the
    full volume, intersect with the ground truth, count. One preallocated bool buffer is reused, so
    the baseline pays no allocation per iteration (a fair, not a crippled, baseline)."""

    def __init__(self, probability: np.ndarray, lesion: np.ndarray):
        self.probability = probability
        self.lesion = np.asarray(lesion, dtype=bool)
        self.m = int(np.count_nonzero(self.lesion))
        self._buffer = np.empty(probability.shape, dtype=bool)

    def misses(self, cutoff) -> int:
        """Lesion voxels with ``prob < cutoff``. A Python-float ``cutoff`` is rounded to the
        volume's dtype by NumPy (to nearest); pass a value from :func:`round_up_to_float_dtype` for
        an exact comparison."""
        np.greater_equal(self.probability, cutoff, out=self._buffer)
        np.logical_and(self._buffer, self.lesion, out=self._buffer)
        return self.m - int(np.count_nonzero(self._buffer))


class ValuesFNR:
    """FNR of ``prob >= c`` from the lesion probabilities alone (gathered from a volume, or one case
    of the summaries): one counting pass over the ``m`` values per evaluation."""

    def __init__(self, values: np.ndarray):
        self.probability = np.asarray(values)
        self.m = int(self.probability.size)

    def misses(self, cutoff) -> int:
        return int(np.count_nonzero(self.probability < cutoff))


class SortedValuesFNR:
    """FNR from values sorted *ascending* by binary search (``np.searchsorted``): O(log m) per
    evaluation. The strongest bisection baseline; it needs the values sorted ascending in advance."""

    def __init__(self, ascending: np.ndarray):
        self.probability = np.asarray(ascending)
        self.m = int(self.probability.size)

    def misses(self, cutoff) -> int:
        return int(np.searchsorted(self.probability, cutoff, side="left"))


def cls_bisection(oracle, epsilon: float, *, delta: float = DELTA, max_iter: int = MAX_ITER) -> BisectionResult:
    """Algorithm 1 of the CLS paper for one case (see module docstring): bisection on ``t`` with the
    mask ``prob >= 1 - t`` until ``|FNR(t) - epsilon| <= delta``, at most ``max_iter`` iterations.

    ``oracle`` is a :class:`VolumeFNR`, :class:`ValuesFNR` or :class:`SortedValuesFNR`. An empty
    lesion has FNR 0 everywhere: ``t = 0`` (cutoff 1.0) is returned at once.
    """
    m = oracle.m
    if m == 0:
        return BisectionResult(1.0, 0.0, 0.0, 0, True)
    lo, hi = 0.0, 1.0
    t, fnr = 0.5, float("nan")
    for iteration in range(1, max_iter + 1):
        t = (lo + hi) / 2
        fnr = oracle.misses(1.0 - t) / m  # Python float: rounded to the data's dtype by NumPy
        if abs(fnr - epsilon) <= delta:
            return BisectionResult(1.0 - t, t, fnr, iteration, True)
        if fnr > epsilon:
            lo = t  # mask too small: lower the cutoff (raise t)
        else:
            hi = t
    return BisectionResult(1.0 - t, t, fnr, max_iter, False)


def largest_cutoff_bisection(
    oracle, epsilon: float, *, tol: float = DEFAULT_TOL, max_iter: int = 200
) -> BisectionResult:
    """Largest cutoff ``c`` in ``[0, 1]`` with ``FNR(c) <= epsilon``, by bisection to ``tol``.

    Invariant: ``FNR(lo) <= epsilon`` (``FNR(0) = 0`` for probabilities in ``[0, 1]``) and
    ``FNR(hi) > epsilon``; the test is the exact ``misses <= floor(epsilon * m)`` and each cutoff is
    compared exactly (rounded up to the data's dtype). Returns ``lo``: ``c_i - tol < lo <= c_i``.
    """
    from fractions import Fraction

    m = oracle.m
    if m == 0:
        return BisectionResult(1.0, 0.0, 0.0, 0, True)
    e = Fraction(repr(float(epsilon)))
    allowed = math.floor(e * m)
    dtype = oracle.probability.dtype

    def ok(c: float) -> tuple[bool, int]:
        misses = oracle.misses(round_up_to_float_dtype(c, dtype))
        return misses <= allowed, misses

    good, misses = ok(1.0)
    iterations = 1
    if good:  # every lesion voxel allowed to be missed is below 1.0: the top of the range works
        return BisectionResult(1.0, 0.0, misses / m, iterations, True)
    lo, hi, lo_misses = 0.0, 1.0, 0
    while hi - lo > tol and iterations < max_iter:
        mid = (lo + hi) / 2
        good, misses = ok(mid)
        iterations += 1
        if good:
            lo, lo_misses = mid, misses
        else:
            hi = mid
    return BisectionResult(lo, 1.0 - lo, lo_misses / m, iterations, hi - lo <= tol)


def conformal_cutoff_from_t(t_values: np.ndarray, alpha: float) -> float:
    """The paper's conformal step: ``1 - t_hat`` with ``t_hat`` the ``k``-th smallest ``t_i``,
    ``k = ceil((1 - alpha)(n + 1))`` (computed exactly); ``-inf`` when ``k > n``."""
    from fractions import Fraction

    t_values = np.asarray(t_values, dtype=np.float64)
    n = t_values.size
    k = math.ceil((1 - Fraction(repr(float(alpha)))) * (n + 1))
    if k > n:
        return float("-inf")
    return 1.0 - float(np.partition(t_values, k - 1)[k - 1])
