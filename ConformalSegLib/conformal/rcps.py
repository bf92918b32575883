"""Risk-controlling prediction sets (RCPS, Bates et al., 2021) for the expected voxel FNR.

Guarantee
---------
With calibration scans exchangeable with (i.i.d. as) new scans, the mask ``prob >= t_hat`` satisfies,
**with probability >= 1 - delta over the calibration draw**, ``E[FNR_new] <= epsilon`` (the expectation
over new scans). Between CRC (:mod:`ConformalSegLib.conformal.crc`: ``E[FNR] <= epsilon`` averaged over
calibration draws too) and CLS (:mod:`ConformalSegLib.conformal.cls`: a per-scan bound): the risk is an
expectation, but the statement holds for *this* calibration set with confidence ``1 - delta``.

Loss and conventions
--------------------
Masks are ``prob >= t`` (``>=``: a voxel equal to the threshold is kept). ``FNR_i(t) = #{lesion voxels
with prob < t} / m_i`` is in [0, 1], non-decreasing in ``t``, and constant on each interval
``(v', v]`` between consecutive distinct lesion values of scan ``i``. The empirical risk
``Rhat(t) = mean_i FNR_i(t)`` is therefore a step function whose jumps are the union of all scans'
lesion values: on ``(v', v]`` (``v' < v`` consecutive distinct values of the union) it is constant, so
the largest valid threshold of such an interval is ``v`` itself. Every candidate is evaluated there --
no grid, no bisection. Empty lesions follow CLS's policies (``exclude`` by default).

Upper confidence bounds (at confidence ``1 - delta``, ``n`` scans, losses ``L_i`` in [0, 1])
--------------------------------------------------------------------------------------------
* **Hoeffding-Bentkus** (``hb``): the p-value of ``H0: R > epsilon`` is
  ``p(Rhat) = min( exp(-n h(min(Rhat, epsilon), epsilon)), e * P(Binom(n, epsilon) <= ceil(n Rhat)) )``,
  ``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` (Bates et al., Prop. 3 and 4; the same formula as
  MAPIE's ``mapie.risk_control.methods.compute_hoeffding_bentkus_p_value``, checked in a test).
  ``UCB = sup{R : p_R(Rhat) > delta}``; ``p_R`` is continuous and non-increasing in ``R``, so
  ``UCB <= epsilon`` iff ``p_epsilon(Rhat) <= delta``: the test is evaluated as this p-value, never by
  searching for the bound. ``ceil(n Rhat) = ceil(sum_i FNR_i)`` is computed exactly (fractions near an
  integer, as in :mod:`ConformalSegLib.conformal.crc`).
* **Waudby-Smith-Ramdas** (``wsr``, the betting bound of Bates et al., Prop. 5) with the losses in the
  stored case order (the dataset's case-id order, fixed independently of the losses):
  ``mu_i = (1/2 + sum_{j<=i} L_j) / (i + 1)``,
  ``s2_i = (1/4 + sum_{j<=i} (L_j - mu_j)^2) / (i + 1)``,
  ``nu_i = min(1, sqrt(2 log(1/delta) / (n s2_{i-1})))``, ``K_i(R) = prod_{j<=i} (1 - nu_j (L_j - R))``;
  ``UCB = inf{R >= 0 : max_i K_i(R) > 1/delta}``. ``K_i(R)`` is a non-negative supermartingale at the true
  risk (``nu_j`` uses only earlier losses) and non-decreasing in ``R``, so by continuity
  ``UCB <= epsilon`` iff ``max_i K_i(epsilon) >= 1/delta``, and Ville's inequality gives
  ``P(max_i K_i(R) >= 1/delta) <= delta``. Products are computed as float64 log-sums.

The RCPS rule and why it is valid
---------------------------------
Larger masks (smaller ``t``) have smaller risk. ``t_hat = sup{t : UCB(t') <= epsilon for every t' <= t}``:
scan the candidates from the smallest threshold (the largest mask, risk 0) upwards and stop before the
first violation. Since ``Rhat`` and the bounds are constant between consecutive candidates, this is the
same rule over the continuum of thresholds. The true risk ``R(t) = E[FNR(t)]`` is non-decreasing and
left-continuous (``{prob < t}`` grows to ``{prob < s}`` as ``t`` rises to ``s``), so
``{t : R(t) <= epsilon} = (-inf, s]`` for a fixed ``s``. If ``R(t_hat) > epsilon`` then ``t_hat > s``, so for
a fixed sequence ``t_k`` decreasing to ``s`` the events ``A_k = {t_hat >= t_k}`` increase to it, and each
``A_k`` implies ``UCB(t_k) <= epsilon < R(t_k)``, of probability ``<= delta`` (the bound at one fixed
threshold). By continuity of measure ``P(R(t_hat) > epsilon) <= delta``. (For WSR the scan is needed: its
bound need not be monotone in ``t``; for HB it is, and the scan's end is found by binary search.)

Edge cases: when even the smallest candidate (risk 0) fails -- too few scans for (epsilon, delta), for
HB ``n < log(delta) / log(1 - epsilon)`` -- ``t_hat = -inf`` (whole image) with a
:class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning`. When every candidate and the empty
mask (``t = +inf``) pass, ``t_hat = +inf``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import stats

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import ThresholdCalibration, too_small_message, used_cases, warn_if_whole_image_from_ties
from .exact import as_fraction, check_alpha, check_epsilon
from .summaries import LesionSummaries

BOUNDS = ("hb", "wsr")
_CHUNK = 2048


def _kl_bernoulli(a: np.ndarray, b: float) -> np.ndarray:
    """``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` with ``0 log 0 = 0``."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, a * np.log(a / b), 0.0)
        second = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0 if b < 1 else np.inf)
    out: np.ndarray = first + second
    return out


def hb_p_value(
    risk_hat: np.ndarray | float, n: int, epsilon: float, *, ceil_sum: np.ndarray | None = None
) -> np.ndarray:
    """Hoeffding-Bentkus p-value of ``H0: R > epsilon`` for empirical risks ``risk_hat`` of ``n`` losses.

    ``ceil_sum`` (optional) is ``ceil(n * risk_hat)`` computed exactly by the caller; without it the float
    product is used (as MAPIE does).
    """
    r = np.atleast_1d(np.asarray(risk_hat, dtype=np.float64))
    eps = float(epsilon)
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(r, eps), eps))
    k = np.ceil(n * r) if ceil_sum is None else np.asarray(ceil_sum, dtype=np.float64)
    bentkus = math.e * stats.binom.cdf(k, n, eps)
    out: np.ndarray = np.minimum(1.0, np.minimum(hoeffding, bentkus))
    return out


def wsr_passes(losses: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """WSR test ``UCB <= epsilon`` for each column of ``losses`` (shape ``n x k``, rows in case order)."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[0]
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    mu = (0.5 + np.cumsum(losses, axis=0)) / (i + 1)
    s2 = (0.25 + np.cumsum((losses - mu) ** 2, axis=0)) / (i + 1)
    s2_prev = np.vstack([np.full((1, losses.shape[1]), 0.25), s2[:-1]])
    nu = np.minimum(1.0, np.sqrt(2 * math.log(1 / delta) / (n * s2_prev)))
    with np.errstate(divide="ignore"):
        log_k = np.cumsum(np.log1p(-nu * (losses - float(epsilon))), axis=0)
    passed: np.ndarray = log_k.max(axis=0) >= math.log(1 / delta) - 1e-12
    return passed


def min_rcps_calibration_size(epsilon: float, delta: float, bound: str = "hb") -> int:
    """Smallest ``n`` for which the test can pass at risk 0 (no miss at all): for HB ``(1 - epsilon)^n <= delta``;
    for WSR the smallest ``n`` whose all-zero losses pass (found by counting up; 0 when epsilon = 0: never)."""
    e, d = float(check_epsilon(epsilon)), float(check_alpha(delta, "delta"))
    if e <= 0:
        return 0
    if e >= 1:
        return 1
    if bound == "wsr":
        n = 1
        while not bool(wsr_passes(np.zeros((n, 1)), e, d)[0]):
            n += 1
        return n
    return max(1, math.ceil(math.log(d) / math.log1p(-e) - 1e-12))


@dataclass(frozen=True)
class RiskPath:
    """The per-scan FNR of the used scans as a step function: candidate thresholds and exact miss sums."""

    summaries: LesionSummaries
    used: np.ndarray  # bool per case

    def candidates(self) -> np.ndarray:
        """Distinct lesion values of the used scans, ascending (the jumps of ``Rhat``)."""
        values = [self.summaries.case(int(i)) for i in np.flatnonzero(self.used)]
        return np.unique(np.concatenate(values)) if values else np.zeros(0)

    def misses(self, thresholds: np.ndarray) -> np.ndarray:
        """``#{lesion voxels with prob < t}`` for each used scan (rows, case order) and threshold (columns)."""
        t = np.asarray(thresholds, dtype=np.float64)
        rows = [np.searchsorted(self.summaries.case(int(i))[::-1], t) for i in np.flatnonzero(self.used)]
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(thresholds))

    def losses(self, thresholds: np.ndarray) -> np.ndarray:
        """``FNR_i(t)`` for each used scan (rows; 0 for a scan without lesion voxels) and threshold (columns)."""
        sizes = self.summaries.lesion_sizes[self.used].astype(np.float64)[:, None]
        out: np.ndarray = self.misses(thresholds) / np.maximum(sizes, 1.0)
        return out


def ceil_sums(misses: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``ceil(sum_i misses_i / sizes_i)`` per column, exactly (fractions only when the float sum is near an
    integer; scans with ``sizes_i = 0`` contribute 0)."""
    keep = sizes > 0
    misses, sizes = misses[keep], sizes[keep]
    totals = (misses / sizes[:, None]).sum(axis=0)
    out: np.ndarray = np.ceil(totals)
    tol = 4 * (len(sizes) + 1) * np.finfo(np.float64).eps * np.maximum(1.0, totals)
    for j in np.flatnonzero(np.abs(totals - np.round(totals)) <= tol):
        exact = sum((Fraction(int(d), int(m)) for d, m in zip(misses[:, j], sizes)), Fraction(0))
        out[j] = math.ceil(exact)
    return out


def first_failure(passes: Callable[[np.ndarray], np.ndarray], ascending: np.ndarray) -> int:
    """Index of the first candidate (ascending) that fails, ``len(ascending)`` if none (chunked scan)."""
    start = 0
    size = _CHUNK
    while start < ascending.size:
        ok = passes(ascending[start : start + size])
        bad = np.flatnonzero(~ok)
        if bad.size:
            return start + int(bad[0])
        start += size
        size *= 2
    return int(ascending.size)


def first_failure_monotone(passes: Callable[[np.ndarray], np.ndarray], ordered: np.ndarray) -> int:
    """The first failing index when the passing candidates are a prefix (binary search, O(log K) tests).

    For HB p-values of monotone losses (RCPS; each fixed sequence of :mod:`ConformalSegLib.conformal.ltt`): along
    the sequence every loss moves one way, so each empirical risk, the exact ``ceil`` of its sum and the HB
    p-value (non-decreasing in both) move one way, and so does a maximum over risks: the rejections form a
    prefix, and the scan stops at the first index this search finds.
    """
    lo, hi = 0, int(ordered.size)  # invariant: ordered[:lo] pass, ordered[hi:] fail (or are past the end)
    while lo < hi:
        mid = (lo + hi) // 2
        if bool(passes(ordered[mid : mid + 1])[0]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def rcps_cutoff(
    summaries: LesionSummaries, epsilon: float, delta: float, *, bound: str = "hb", empty: str = "exclude"
) -> float:
    """Exact RCPS threshold ``t_hat`` (see module docstring)."""
    if bound not in BOUNDS:
        raise ConformalSegError(f"unknown bound {bound!r}", fix=f"use one of {', '.join(BOUNDS)}")
    eps, d = float(check_epsilon(epsilon)), float(check_alpha(delta, "delta"))
    path = RiskPath(summaries, used_cases(summaries, empty))
    n = int(np.count_nonzero(path.used))
    ascending = path.candidates()
    if bound == "hb":

        def passes(t: np.ndarray) -> np.ndarray:
            misses = path.misses(t)
            sizes = summaries.lesion_sizes[path.used]
            risk = (misses / np.maximum(sizes, 1)[:, None]).mean(axis=0)
            ok: np.ndarray = hb_p_value(risk, n, eps, ceil_sum=ceil_sums(misses, sizes)) <= d
            return ok
    else:

        def passes(t: np.ndarray) -> np.ndarray:
            return wsr_passes(path.losses(t), eps, d)

    # below the smallest candidate every lesion voxel is kept: risk 0, the same as at the smallest candidate
    probe = ascending if ascending.size else np.array([0.0])
    j = (first_failure_monotone if bound == "hb" else first_failure)(passes, probe)
    if j == 0:
        return float("-inf")
    if j < ascending.size:
        return float(ascending[j - 1])
    return float("inf") if bool(passes(np.array([np.inf]))[0]) else float(probe[-1])


@dataclass(frozen=True)
class RcpsCalibration(ThresholdCalibration):
    """An RCPS result: ``alpha`` holds ``delta`` (the miscoverage of the calibration draw), plus the bound."""

    bound: str = "hb"

    @property
    def delta(self) -> float:
        assert self.alpha is not None  # RCPS always has a delta
        return self.alpha


def calibrate_rcps(
    summaries: LesionSummaries, epsilon: float, delta: float, *, bound: str = "hb", empty: str = "exclude"
) -> RcpsCalibration:
    """RCPS calibration from summaries (``delta`` is stored in ``alpha``)."""
    used = used_cases(summaries, empty)
    n = int(np.count_nonzero(used))
    if n == 0:
        raise ConformalSegError(
            "no calibration case with a lesion: RCPS needs lesion cases",
            fix="check the lesion label value(s) (--lesion-label) or use --empty include",
        )
    cutoff = rcps_cutoff(summaries, epsilon, delta, bound=bound, empty=empty)
    warn_if_whole_image_from_ties("RCPS", cutoff)
    if cutoff == float("-inf"):
        if as_fraction(epsilon) == 0:
            message = "RCPS needs epsilon > 0: at epsilon = 0 the result is the whole image."
        else:
            needed = min_rcps_calibration_size(epsilon, delta, bound)
            message = too_small_message("RCPS", n, needed, f"epsilon={epsilon}, delta={delta} ({bound})")
        warnings.warn(message, CalibrationSetTooSmallWarning, stacklevel=2)
    with_lesion = int(np.count_nonzero(summaries.lesion_sizes > 0)) if empty == "include" else None
    return RcpsCalibration(
        "rcps",
        float(epsilon),
        float(delta),
        n,
        summaries.n - n,
        cutoff,
        n_with_lesion=with_lesion,
        bound=bound,
    )


def rcps_json(c: RcpsCalibration) -> dict[str, Any]:
    """The profile keys of an RCPS calibration besides the threshold ones (:mod:`ConformalSegLib.conformal.profile`)."""
    return {"delta": c.delta, "bound": c.bound}


def read_rcps(doc: dict[str, Any], n: int, threshold: float) -> RcpsCalibration:
    """The calibration stored by :func:`rcps_json` (``ValueError`` / ``KeyError`` when malformed)."""
    if doc["bound"] not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {doc['bound']!r}")
    return RcpsCalibration(
        "rcps",
        float(doc["epsilon"]),
        float(doc["delta"]),
        n,
        int(doc.get("n_excluded_empty", 0)),
        threshold,
        n_with_lesion=doc.get("n_with_lesion"),
        bound=str(doc["bound"]),
    )
