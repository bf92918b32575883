"""Exact integer arithmetic for the two integer roundings every method relies on.

Two roundings decide every guarantee in this package:

* the conformal rank ``k = ceil((1 - alpha) * (n + 1))`` (how many calibration scores the threshold
  must dominate), and
* the allowed number of missed lesion voxels ``floor(epsilon * m)`` for a lesion of ``m`` voxels.

Evaluated in floating point both can be off by one: ``(1 - 0.1) * 10`` is ``9.000000000000002``
in some orders of evaluation, whose ceiling is 10, not 9; ``0.29 * 100`` is ``28.999999999999996``,
whose floor is 28, not 29. An off-by-one in the rank silently weakens the guarantee (or wastes
power), so we never round a float product.

**Convention.** A user parameter ``x`` (epsilon or alpha) is interpreted as the *shortest decimal
that round-trips to the same float*, i.e. ``Fraction(repr(x))``: ``0.1`` means exactly 1/10 and
``0.29`` exactly 29/100. That is what the user typed, and every product and comparison against it is
then done in exact integer/rational arithmetic.
"""

from __future__ import annotations

from fractions import Fraction
from math import ceil, floor

import numpy as np

from ..common.errors import ConformalSegError

_INT64_SAFE = 2**62


def as_fraction(x: float) -> Fraction:
    """The exact rational a float parameter stands for: the shortest round-trip decimal of ``x``."""
    value = float(x)
    if not np.isfinite(value):
        raise ConformalSegError(f"parameter must be a finite number, got {x!r}")
    return Fraction(repr(value))


def check_alpha(alpha: float, name: str = "alpha") -> Fraction:
    """Validate a risk level, which must lie strictly between 0 and 1; return it as a fraction."""
    try:
        a = as_fraction(alpha)
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(f"{name} must be a number, got {alpha!r}") from exc
    if not 0 < a < 1:
        raise ConformalSegError(
            f"{name} must be strictly between 0 and 1, got {alpha}", fix=f"pass e.g. --{name.replace('_', '-')} 0.1"
        )
    return a


def check_epsilon(epsilon: float) -> Fraction:
    """Validate an FNR tolerance in [0, 1]; return it as a fraction."""
    try:
        e = as_fraction(epsilon)
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(f"epsilon must be a number, got {epsilon!r}") from exc
    if not 0 <= e <= 1:
        raise ConformalSegError(f"epsilon must lie in [0, 1], got {epsilon}", fix="pass e.g. --epsilon 0.1")
    return e


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((1 - alpha) * (n + 1))`` computed exactly.

    The split-conformal threshold is the ``k``-th smallest of ``n`` exchangeable scores; when
    ``k > n`` it is ``+inf`` (the calibration set is too small for ``alpha``).
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    a = check_alpha(alpha)
    return ceil((1 - a) * (n + 1))


def min_calibration_size(alpha: float) -> int:
    """Smallest ``n`` for which ``conformal_rank(n, alpha) <= n`` (a finite conformal quantile).

    ``ceil((1-a)(n+1)) <= n  <=>  (1-a)(n+1) <= n  <=>  n >= (1-a)/a``.
    """
    a = check_alpha(alpha)
    return ceil((1 - a) / a)


def allowed_misses(lesion_size: int, epsilon: float) -> int:
    """``floor(epsilon * m)``: the most lesion voxels a mask may miss while FNR <= epsilon.

    ``FNR = misses / m <= epsilon  <=>  misses <= epsilon * m  <=>  misses <= floor(epsilon * m)``.
    """
    e = check_epsilon(epsilon)
    return floor(e * int(lesion_size))


def allowed_misses_array(lesion_sizes: np.ndarray, epsilon: float) -> np.ndarray:
    """Vectorised :func:`allowed_misses` (int64), exact for every size.

    Uses ``(p * m) // q`` in int64 when it cannot overflow, Python integers otherwise.
    """
    e = check_epsilon(epsilon)
    sizes = np.asarray(lesion_sizes, dtype=np.int64)
    p, q = e.numerator, e.denominator
    largest = int(sizes.max()) if sizes.size else 0
    if p * largest < _INT64_SAFE and q < _INT64_SAFE:
        allowed: np.ndarray = (sizes * np.int64(p)) // np.int64(q)
        return allowed
    return np.array([(p * int(m)) // q for m in sizes], dtype=np.int64)


def fnr_exceeds(misses: np.ndarray | int, lesion_size: np.ndarray | int, epsilon: float) -> np.ndarray:
    """Exact test of ``misses / lesion_size > epsilon`` (False where the lesion is empty: FNR := 0)."""
    m = np.asarray(lesion_size, dtype=np.int64)
    return np.asarray(misses, dtype=np.int64) > allowed_misses_array(np.atleast_1d(m), epsilon).reshape(m.shape)


def check_detect_fraction(tau: float) -> Fraction:
    """Validate a lesion detection fraction in ``(0, 1]``; return it as a fraction."""
    try:
        t = as_fraction(tau)
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(f"the detection fraction must be a number, got {tau!r}") from exc
    if not 0 < t <= 1:
        raise ConformalSegError(
            f"the detection fraction must lie in (0, 1], got {tau}",
            fix="pass e.g. --detect-fraction 0.5 (half of a lesion's voxels in the mask)",
        )
    return t


def detection_count(lesion_size: int, tau: float) -> int:
    """``ceil(tau * m)``: how many of a lesion's ``m`` voxels a mask must hold to *detect* it (>= 1).

    ``tau`` is read as the decimal typed (``0.29`` is exactly 29/100), so ``ceil`` is exact.
    """
    return max(1, ceil(check_detect_fraction(tau) * int(lesion_size)))


def detection_counts(lesion_sizes: np.ndarray, tau: float) -> np.ndarray:
    """Vectorised :func:`detection_count` (int64), exact: ``ceil(p m / q) = (p m + q - 1) // q``."""
    t = check_detect_fraction(tau)
    sizes = np.asarray(lesion_sizes, dtype=np.int64)
    p, q = t.numerator, t.denominator
    largest = int(sizes.max()) if sizes.size else 0
    if p * largest + q < _INT64_SAFE:
        counts = (sizes * np.int64(p) + np.int64(q - 1)) // np.int64(q)
    else:
        counts = np.array([-((-p * int(m)) // q) for m in sizes], dtype=np.int64)
    result: np.ndarray = np.maximum(counts, 1)
    return result


def _binomial_tail_exact(n: int, p: Fraction, k: int) -> Fraction:
    """``P(Binomial(n, p) >= k)`` in exact rational arithmetic."""
    q = 1 - p
    total = Fraction(0)
    term = q**n  # P(X = 0)
    for j in range(n + 1):
        if j >= k:
            total += term
        if j < n:
            term = term * (n - j) / (j + 1) * p / q if q else Fraction(0)
    return total if q else Fraction(int(k <= n))


def pac_rank(n: int, alpha: float, delta: float) -> int:
    """Calibration-conditional (PAC) rank: the smallest ``k`` in ``1..n`` with
    ``BetaCDF_{k, n+1-k}(1 - alpha) <= delta``, or ``n + 1`` when none works (the trivial set).

    The conditional coverage of the ``k``-th smallest of ``n`` exchangeable continuous scores (given
    the calibration set) is Beta(k, n + 1 - k) distributed, so with this ``k``
    ``P(coverage >= 1 - alpha) >= 1 - delta`` over the calibration draw (ties only raise the coverage).
    ``BetaCDF_{k,n+1-k}(x) = P(Binomial(n, x) >= k)`` falls strictly as ``k`` rises, so the smallest
    ``k`` is found by bisection on the integers (an exact answer, not an approximation): each test is
    scipy's binomial tail, decided in exact rational arithmetic (``alpha`` and ``delta`` as typed)
    whenever scipy's value is within 1e-9 of ``delta``.
    """
    from scipy.stats import binom

    if n < 0:
        raise ValueError("n must be non-negative")
    x = 1 - check_alpha(alpha)
    d = check_alpha(delta, "delta")

    def works(k: int) -> bool:
        approx = float(binom.sf(k - 1, n, float(x)))  # P(Bin(n, x) >= k)
        if abs(approx - float(d)) <= 1e-9:
            return _binomial_tail_exact(n, x, k) <= d
        return approx <= float(d)

    lo, hi = 1, n + 1  # invariant: the answer lies in [lo, hi]; hi = n + 1 means none works
    while lo < hi:
        mid = (lo + hi) // 2
        if works(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def calibration_rank(n: int, alpha: float, pac_delta: float | None = None) -> int:
    """The rank a conformal threshold uses: :func:`conformal_rank` (marginal guarantee), or with
    ``pac_delta`` the calibration-conditional :func:`pac_rank` (guarantee for this calibration set with
    confidence ``1 - pac_delta``)."""
    return conformal_rank(n, alpha) if pac_delta is None else pac_rank(n, alpha, pac_delta)


def min_pac_calibration_size(alpha: float, delta: float) -> int:
    """Smallest ``n`` whose PAC rank is finite (``<= n``): ``(1 - alpha)^n <= delta`` up to the exact rule."""
    n = min_calibration_size(alpha)
    while pac_rank(n, alpha, delta) > n:
        n += 1
    return n


def needed_calibration_size(alpha: float, pac_delta: float | None = None) -> int:
    """How many scans a finite threshold needs (marginal or PAC)."""
    return min_calibration_size(alpha) if pac_delta is None else min_pac_calibration_size(alpha, pac_delta)
