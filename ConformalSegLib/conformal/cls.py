"""Conformal Lesion Segmentation (CLS, Tan et al.): high-probability control of the FNR.

Guarantee
---------
With calibration cases exchangeable with the test case, the mask ``prob >= c_hat`` satisfies
``P(FNR_test <= epsilon) >= 1 - alpha`` (probability over calibration and test draws).

Conventions (all exact; see :mod:`ConformalSegLib.conformal.exact` for how epsilon and alpha are read)
-------------------------------------------------------------------------------------------
* A mask at cutoff ``c`` is ``prob >= c`` (**>=**, so a voxel whose probability equals the cutoff is
  kept). The paper writes the threshold as ``1 - t``; we store and compare the probability cutoff
  ``c = 1 - t`` itself and never recompute ``1 - t`` in floating point.
* ``FNR_i(c) = #{lesion voxels with prob < c} / m_i``; for an empty lesion (``m_i = 0``) FNR := 0.
* **Critical cutoff** (paper eq. 4, in probability units): ``c_i = max{c : FNR_i(c) <= epsilon}``.
  ``FNR_i(c) <= eps  <=>  #{prob >= c} >= k_i := m_i - floor(eps * m_i)``, so ``c_i`` is the
  ``k_i``-th largest lesion probability (an order statistic: no search). ``c_i = +inf`` when
  ``k_i = 0`` (``eps = 1``) or the lesion is empty (any cutoff is fine).
  For every ``c``: ``FNR_i(c) <= eps  <=>  c <= c_i``.
* **Conformal cutoff** (eq. 5): with ``k = ceil((1 - alpha)(n + 1))``, ``c_hat`` is the ``k``-th
  largest of ``c_1..c_n`` (equivalently ``t_hat = 1 - c_hat`` is the ``k``-th smallest ``t_i``).
  Proof: ``FNR_test(c_hat) <= eps  <=>  c_hat <= c_test``, i.e. the nonconformity score ``-c_test`` is
  at most the ``k``-th smallest of the ``-c_i``; by exchangeability this has probability
  ``>= k / (n + 1) >= 1 - alpha`` (ties only help).
* **Too few cases**: when ``k > n`` (``n < (1 - alpha) / alpha``) the quantile is infinite:
  ``c_hat = -inf``, the mask is the whole image (the guarantee then holds trivially) and a
  :class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning` says how many cases are needed.
* **Empty lesions**: policy ``"exclude"`` (default) drops calibration cases without lesion voxels;
  the guarantee then reads ``P(FNR_test <= eps | the test case has a lesion) >= 1 - alpha`` (and
  holds marginally too, since lesion-free cases have FNR 0). ``"include"`` keeps them with
  ``c_i = +inf``, which is valid only marginally over a population with the same share of
  lesion-free scans, and yields smaller masks on the scans that do have a lesion.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError, WholeImageWarning
from .exact import allowed_misses, allowed_misses_array, calibration_rank, check_alpha, needed_calibration_size
from .summaries import LesionSummaries

EMPTY_POLICIES = ("exclude", "include")


def critical_cutoff(probability: np.ndarray, lesion: np.ndarray, epsilon: float) -> float:
    """Exact critical cutoff ``c_i`` of one case, in O(V) (a boolean gather and a partition).

    Returns the largest ``c`` such that the mask ``probability >= c`` misses at most
    ``floor(epsilon * m)`` of the ``m`` lesion voxels (``+inf`` if ``m == 0`` or all may be missed).
    """
    values = probability[np.asarray(lesion, dtype=bool)]
    m = values.size
    k = m - allowed_misses(m, epsilon)
    if m == 0 or k == 0:
        return float("inf")
    return float(np.partition(values, m - k)[m - k])


def critical_cutoffs(summaries: LesionSummaries, epsilon: float) -> np.ndarray:
    """``c_i`` for every case of ``summaries`` (float64; ``+inf`` for empty lesions), vectorised."""
    sizes = summaries.lesion_sizes
    k = sizes - allowed_misses_array(sizes, epsilon)
    out = np.full(summaries.n, np.inf)
    has = k > 0
    # the k-th largest value sits at position k - 1 of a case's descending run
    out[has] = summaries.decode(summaries.values[summaries.offsets[:-1][has] + k[has] - 1])
    return out


def conformal_lower_cutoff(cutoffs: np.ndarray, alpha: float, pac_delta: float | None = None) -> float:
    """``k``-th largest of ``cutoffs`` with ``k = ceil((1 - alpha)(n + 1))`` (with ``pac_delta``: the PAC
    rank of :func:`~ConformalSegLib.conformal.exact.pac_rank`); ``-inf`` when ``k > n``.

    This is the largest cutoff ``c`` that, by exchangeability, is at most a fresh case's ``c_test``
    with probability ``>= 1 - alpha``.
    """
    cutoffs = np.asarray(cutoffs, dtype=np.float64)
    n = cutoffs.size
    k = calibration_rank(n, alpha, pac_delta)
    if k > n:
        return float("-inf")
    return float(np.partition(cutoffs, n - k)[n - k])


def check_empty_policy(empty: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ConformalSegError(f"empty-lesion policy must be one of {EMPTY_POLICIES}, got {empty!r}")


def used_cases(summaries: LesionSummaries, empty: str) -> np.ndarray:
    """Boolean mask of the cases a calibration uses under the empty-lesion policy (no copy of values)."""
    check_empty_policy(empty)
    if empty == "include":
        return np.ones(summaries.n, dtype=bool)
    return summaries.lesion_sizes > 0


@dataclass(frozen=True)
class ThresholdCalibration:
    """Result of CLS or expected-FNR calibration: the mask is ``prob >= probability_threshold``."""

    method: str
    epsilon: float
    alpha: float | None
    n: int  # cases the threshold was computed from
    n_excluded_empty: int
    probability_threshold: float  # may be -inf (whole image) or +inf (empty mask)
    rank: int | None = None  # conformal rank k for CLS
    pac_delta: float | None = None  # calibration-conditional (PAC) confidence 1 - pac_delta; None: marginal
    n_with_lesion: int | None = None  # with the "include" policy: how many of the n scans have a lesion
    tie_seed: int | None = None  # randomised tie-breaking (:mod:`.ties`): the seed; None: no tie-breaking
    tie_threshold: float | None = None  # with tie_seed: u_hat, the mask is prob > c or (prob == c and u >= u_hat)

    @property
    def is_trivial(self) -> bool:
        """True when the mask is the whole image: the calibration set was too small (cutoff ``-inf``), or
        ties at probability 0 put a finite cutoff at ``<= 0`` (``prob >= 0`` is every voxel)."""
        return self.probability_threshold <= 0 and (self.tie_threshold is None or self.tie_threshold <= 0)

    @property
    def whole_image_from_ties(self) -> bool:
        """The whole image from a finite cutoff (ties at 0), not from too few scans."""
        return self.is_trivial and self.probability_threshold != float("-inf")


def warn_if_whole_image_from_ties(method: str, cutoff: float) -> None:
    """A :class:`~ConformalSegLib.common.errors.WholeImageWarning` naming the cause when a finite cutoff is ``<= 0``."""
    if cutoff != float("-inf") and cutoff <= 0:
        warnings.warn(
            f"{method}: the calibrated cutoff is {cutoff:g}, so the mask 'prob >= cutoff' is the whole image: "
            "too many calibration scans have lesion voxels tied at probability 0 (saturated or quantised "
            "probability maps, or a cascade's zero outside its ROIs). Calibrate on unquantised maps or logits, "
            "or use --tie-breaking random.",
            WholeImageWarning,
            stacklevel=3,
        )


def too_small_message(method: str, n: int, needed: int, parameter: str) -> str:
    return (
        f"{method}: {n} calibration case(s) is too few for {parameter}; at least {needed} are needed. "
        f"The conformal quantile is infinite, so the result is the trivial set (whole image / empty inner set)."
    )


def checked_cls_cases(
    summaries: LesionSummaries, alpha: float, empty: str, pac_delta: float | None = None
) -> np.ndarray:
    """The cases a CLS calibration uses (:func:`used_cases`), after checking ``alpha`` and ``pac_delta``;
    refuses a calibration set without a lesion (shared by :func:`calibrate_cls` and
    :func:`ConformalSegLib.conformal.ties.calibrate_cls_ties`)."""
    check_alpha(alpha)
    if pac_delta is not None:
        check_alpha(pac_delta, "pac_delta")
    used = used_cases(summaries, empty)
    if not used.any():
        raise ConformalSegError(
            "no calibration case with a lesion: CLS needs cases with lesion voxels",
            fix="check the lesion label value(s) (--lesion-label) or use --empty include",
        )
    return used


def calibrate_cls(
    summaries: LesionSummaries,
    epsilon: float,
    alpha: float,
    *,
    empty: str = "exclude",
    pac_delta: float | None = None,
) -> ThresholdCalibration:
    """CLS calibration from summaries: exact, in O(n) after the summaries exist.

    With ``pac_delta`` the guarantee is calibration-conditional: with probability ``>= 1 - pac_delta``
    over the draw of the calibration scans, ``P(FNR_test <= epsilon | calibration) >= 1 - alpha``
    (the rank of :func:`~ConformalSegLib.conformal.exact.pac_rank`; module docstring of ``exact``).
    """
    used = checked_cls_cases(summaries, alpha, empty, pac_delta)
    n = int(np.count_nonzero(used))
    cutoff = conformal_lower_cutoff(critical_cutoffs(summaries, epsilon)[used], alpha, pac_delta)
    warn_if_whole_image_from_ties("CLS", cutoff)
    if cutoff == float("-inf"):
        warnings.warn(
            too_small_message("CLS", n, needed_calibration_size(alpha, pac_delta), _levels(alpha, pac_delta)),
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    return ThresholdCalibration(
        "cls",
        float(epsilon),
        float(alpha),
        n,
        summaries.n - n,
        cutoff,
        calibration_rank(n, alpha, pac_delta),
        None if pac_delta is None else float(pac_delta),
        int(np.count_nonzero(summaries.lesion_sizes > 0)) if empty == "include" else None,
    )


def _levels(alpha: float, pac_delta: float | None) -> str:
    return f"alpha={alpha}" if pac_delta is None else f"alpha={alpha} with PAC delta={pac_delta}"


def apply_threshold(probability: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """The mask ``probability >= threshold``, compared exactly whatever the array's float dtype.

    A float64 threshold is first rounded *up* to the array's dtype (the smallest representable value
    ``>= threshold``), so that ``prob >= rounded  <=>  prob >= threshold`` for every stored value.
    ``out`` (a bool array of the same shape) avoids allocating a new mask, e.g. for slider updates.
    """
    probability = np.asarray(probability)
    if out is None:
        out = np.empty(probability.shape, dtype=bool)
    if np.isneginf(threshold):
        out.fill(True)
    elif np.isposinf(threshold):
        out.fill(False)
    else:
        np.greater_equal(probability, round_up_to_dtype(threshold, probability.dtype), out=out)
    return out


def round_up_to_dtype(value: float, dtype: np.dtype) -> np.floating:
    """Smallest value of float ``dtype`` that is ``>= value``."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    cast: np.floating = dtype.type(value)
    if float(cast) < value:
        cast = np.nextafter(cast, dtype.type(np.inf))
    return cast
