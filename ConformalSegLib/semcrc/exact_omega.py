"""Exact CRC backtracking along ``lambda(omega) = max(0, anchor + omega)`` (eqs. 3, 6, 9, 12).

Voxel thresholds
----------------
Along the line, voxel ``v`` of group ``g`` gets ``lambda_v(omega) = max(0, fl(anchor_g + omega))``
(float64 addition, as :func:`lambdas_at` computes it; lambda is clipped at 0 as in the authors'
code). With ``need_v`` from :mod:`.intervals` the voxel is covered iff ``lambda_v(omega) >= need_v``
(closed interval). ``fl(anchor + omega)`` is non-decreasing in ``omega``, so

* ``need_v <= 0``: covered for every omega (threshold ``-inf``);
* otherwise covered iff ``omega >= t_v``, with ``t_v`` the smallest float64 such that
  ``fl(anchor_g + t_v) >= need_v`` (:func:`omega_thresholds`; ``t_v = need_v - anchor_g`` up to
  the float rounding that function resolves exactly).

Loss curve and the CRC choice
-----------------------------
Scan ``i`` with ``d_i`` counted voxels has loss ``L_i(omega) = #{v : t_v > omega} / d_i``, a
right-continuous non-increasing step function in [0, 1] (``B = 1``). The CRC condition (eq. 3/6/9)

    n/(n+1) * Rhat(omega) + B/(n+1) <= epsilon
    <=>  F(omega) := sum_i L_i(omega) <= (n + 1) * epsilon - 1 =: budget

(``epsilon`` is the exact fraction of its shortest decimal, :func:`~ConformalSegLib.conformal.exact.as_fraction`).
``omega_hat = inf{omega in [omega_min, omega_max] : F(omega) <= budget}``. As ``F`` is a
right-continuous step function the infimum is attained and is either ``omega_min`` or one of the
``t_v``: the per-scan sorted thresholds are merged in one sorted list, ``F`` at each distinct value is
a suffix sum of weights ``1/d_i``, and ``omega_hat`` is the order statistic found by one binary search
on that monotone sequence. (For large curves only the slice of thresholds around the answer is
merged: a few exact checks at sample quantiles narrow the range first.) The float sums only locate
the candidate; the candidate and its neighbours are re-checked with exact per-scan miss counts
(correctly rounded sum; exact fractions inside its rounding band), so ``omega_hat`` is exact for the
stored ``need`` values.

No valid omega: ``budget < 0`` (``n < 1/epsilon - 1``) or ``F(omega_max) > budget`` for a finite
``omega_max``: ``omega_hat = +inf`` (lambda infinite: the whole real line, the only valid choice).

Guarantee (Angelopoulos et al., Thm. 1; Teneggi et al., Prop. 1): with the anchor fixed
independently of the ``n`` calibration scans and a test scan exchangeable with them,
``E[L_test(omega_hat)] <= epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..conformal.crc import crc_budget

_SIGN = np.int64(-0x8000000000000000)
_MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)


def _ordered(x: np.ndarray) -> np.ndarray:
    """Monotone map float64 -> int64 (``-0.0`` and ``0.0`` both map to 0)."""
    i = np.asarray(x, dtype=np.float64).view(np.int64)
    return np.where(i < 0, -(i & _MAGNITUDE), i)


def _unordered(o: np.ndarray) -> np.ndarray:
    o = np.asarray(o, dtype=np.int64)
    return np.where(o < 0, (-o) | _SIGN, o).view(np.float64)


def omega_thresholds(need: np.ndarray, anchor: np.ndarray | float, floor: np.ndarray | float = 0.0) -> np.ndarray:
    """Per voxel the smallest float64 ``t`` with ``fl(anchor + t) >= need`` (``-inf`` if ``need <= floor``:
    covered for every omega; ``floor`` is 0 for lambda clipped at 0, ``-width/2`` for shrinkable intervals).

    ``anchor`` is the per-voxel anchor (broadcast). Voxel ``v`` is covered at ``omega`` iff
    ``omega >= t_v`` (module docstring). Most thresholds are ``need - anchor`` checked against its
    float predecessor; the rest are found by bisection on the ordered float64 bit patterns.
    """
    need = np.asarray(need, dtype=np.float64)
    a = np.broadcast_to(np.asarray(anchor, dtype=np.float64), need.shape)
    out = np.full(need.shape, -np.inf)
    pos = need > np.broadcast_to(np.asarray(floor, dtype=np.float64), need.shape)
    if not pos.any():
        return out
    nv, av = need[pos], a[pos]
    t = nv - av
    ok = ((av + t) >= nv) & ((av + np.nextafter(t, -np.inf)) < nv)
    if not ok.all():
        bad = ~ok
        nb, ab, tb = nv[bad], av[bad], t[bad]
        slack = 4.0 * (np.spacing(np.abs(nb)) + np.spacing(np.abs(ab)))
        lo, hi = tb - slack, tb + slack
        for _ in range(8):  # make sure the bracket holds: pred(lo) false, pred(hi) true
            fix_lo, fix_hi = (ab + lo) >= nb, (ab + hi) < nb
            if not (fix_lo.any() or fix_hi.any()):
                break
            lo = np.where(fix_lo, lo - 2 * slack, lo)
            hi = np.where(fix_hi, hi + 2 * slack, hi)
            slack = 2 * slack
        olo, ohi = _ordered(lo), _ordered(hi)
        while True:
            open_ = ohi - olo > 1
            if not open_.any():
                break
            mid = olo + (ohi - olo) // 2
            true_ = (ab + _unordered(mid)) >= nb
            ohi = np.where(open_ & true_, mid, ohi)
            olo = np.where(open_ & ~true_, mid, olo)
        t[bad] = _unordered(ohi)
    out[pos] = t
    return out


def lambdas_at(anchor: np.ndarray | float, omega: float, *, clip: bool = True) -> np.ndarray:
    """``max(0, fl(anchor + omega))`` (``+inf`` when ``omega`` is ``+inf``); ``clip=False``: ``fl(anchor + omega)``
    (shrinkable intervals, clamped per voxel at ``-width/2`` instead)."""
    a = np.asarray(anchor, dtype=np.float64)
    if omega == math.inf:
        return np.full(a.shape, math.inf)
    return np.maximum(0.0, a + float(omega)) if clip else a + float(omega)


@dataclass(frozen=True)
class OmegaCurve:
    """The step function ``F(omega) = sum_i #{t > omega} / d_i`` of ``n`` scans.

    ``thresholds[i]`` holds scan ``i``'s finite thresholds sorted ascending (voxels covered for every
    omega are left out: they never count); ``sizes[i] = d_i > 0`` is its loss denominator.
    """

    thresholds: tuple[np.ndarray, ...]
    sizes: np.ndarray

    @classmethod
    def from_scans(cls, thresholds: Sequence[np.ndarray], sizes: Sequence[int]) -> OmegaCurve:
        kept = tuple(np.sort(np.asarray(t, dtype=np.float64)[np.isfinite(t)]) for t in thresholds)
        d = np.asarray(sizes, dtype=np.int64)
        if d.shape != (len(kept),) or (d <= 0).any():
            raise ValueError("every scan needs a positive loss denominator")
        if any(t.size > s for t, s in zip(kept, d)):
            raise ValueError("a scan has more thresholds than counted voxels")
        return cls(kept, d)

    @property
    def n(self) -> int:
        return int(self.sizes.size)

    def misses(self, omega: float) -> np.ndarray:
        """``#{v : t_v > omega}`` per scan (int64, exact)."""
        return np.array([t.size - np.searchsorted(t, omega, side="right") for t in self.thresholds], dtype=np.int64)

    def loss_sum(self, omega: float) -> float:
        """``F(omega)`` correctly rounded."""
        return math.fsum((self.misses(omega) / self.sizes).tolist())

    def mean_loss(self, omega: float) -> float:
        return self.loss_sum(omega) / self.n

    def satisfies(self, omega: float, budget: Fraction) -> bool:
        """Exact test of ``F(omega) <= budget``."""
        misses = self.misses(omega)
        total = math.fsum((misses / self.sizes).tolist())
        tol = 2 * (self.n + 1) * np.finfo(np.float64).eps * max(1.0, total) + 1e-300
        if total < float(budget) - tol:
            return True
        if total > float(budget) + tol:
            return False
        return sum((Fraction(int(c), int(d)) for c, d in zip(misses, self.sizes)), Fraction(0)) <= budget

    def between(self, lo: float, hi: float) -> list[np.ndarray]:
        """Per scan the thresholds ``t`` with ``lo < t < hi`` (views)."""
        return [t[np.searchsorted(t, lo, side="right") : np.searchsorted(t, hi, side="left")] for t in self.thresholds]

    def bracket(
        self, lo: float, hi: float, budget: Fraction, *, limit: int = 1 << 16, pivots: int = 63
    ) -> tuple[float, float]:
        """Narrow ``(lo, hi)`` (``F(lo) > budget``; ``F(hi) <= budget`` or ``hi = inf``) to at most ``limit``
        thresholds strictly inside, by exact checks at ``pivots`` sample quantiles of the thresholds
        (a binary search over the pivots: about 6 checks per round, each round keeps ~1/64)."""
        while True:
            parts = self.between(lo, hi)
            total = sum(p.size for p in parts)
            if total <= limit:
                return lo, hi
            step = max(1, total // (64 * (pivots + 1)))
            sample = np.sort(np.concatenate([p[::step] for p in parts if p.size]))
            candidates = np.unique(sample[np.linspace(0, sample.size - 1, pivots + 2).astype(np.int64)[1:-1]])
            a, b = -1, candidates.size  # candidates[a] fails, candidates[b] satisfies (virtual ends)
            while b - a > 1:
                mid = (a + b) // 2
                if self.satisfies(float(candidates[mid]), budget):
                    b = mid
                else:
                    a = mid
            new_lo = float(candidates[a]) if a >= 0 else lo
            new_hi = float(candidates[b]) if b < candidates.size else hi
            if (new_lo, new_hi) == (lo, hi):
                return lo, hi
            lo, hi = new_lo, new_hi

    def merged(self, lo: float, hi: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
        """Distinct thresholds in ``(lo, hi]`` ascending and ``F`` at each of them (float, for locating)."""
        parts = [
            t[np.searchsorted(t, lo, side="right") : np.searchsorted(t, hi, side="right")] for t in self.thresholds
        ]
        base = 0.0 if hi == math.inf else math.fsum(((self.misses(hi)) / self.sizes).tolist())
        weights = np.concatenate([np.full(p.size, 1.0 / d) for p, d in zip(parts, self.sizes)])
        values = np.concatenate(parts)
        order = np.argsort(values, kind="stable")  # timsort: a merge of the per-scan sorted runs
        values, weights = values[order], weights[order]
        if values.size == 0:
            return values, values
        last = np.flatnonzero(np.append(values[1:] != values[:-1], True))
        distinct = values[last]
        total_at_or_above = np.cumsum(weights[::-1])[::-1]  # weight of thresholds >= values[j] (within range)
        above = np.append(total_at_or_above[last[:-1] + 1], 0.0)  # weight strictly above distinct[j]
        return distinct, above + base


def exact_omega(
    curve: OmegaCurve,
    epsilon: float,
    *,
    omega_min: float = 0.0,
    omega_max: float = math.inf,
    merge_limit: int = 1 << 16,
) -> float:
    """``inf{omega in [omega_min, omega_max] : n/(n+1) Rhat(omega) + 1/(n+1) <= epsilon}`` exactly.

    Returns ``+inf`` when no omega in the range satisfies the condition (module docstring). For
    large curves the candidate range is first narrowed by exact checks at sample quantiles
    (:meth:`OmegaCurve.bracket`), so at most about ``merge_limit`` thresholds are merged.
    """
    budget = crc_budget(curve.n, epsilon)
    if budget < 0:
        return math.inf
    if curve.satisfies(omega_min, budget):
        return float(omega_min)
    lo, hi = curve.bracket(float(omega_min), math.inf, budget, limit=merge_limit)
    distinct, f_values = curve.merged(lo, hi)
    # f_values is non-increasing along ascending distinct; the answer is the smallest distinct value
    # whose F is <= budget (the largest one always qualifies: it is hi, or the largest threshold).
    j = int(np.searchsorted(-f_values, -float(budget), side="left"))
    j = min(j, distinct.size - 1)
    if curve.satisfies(float(distinct[j]), budget):
        while j > 0 and curve.satisfies(float(distinct[j - 1]), budget):
            j -= 1
    else:
        while not curve.satisfies(float(distinct[j]), budget):
            j += 1
    omega = float(distinct[j])
    return omega if omega <= omega_max else math.inf


def bisect_omega(
    curve: OmegaCurve,
    epsilon: float,
    *,
    omega_min: float = 0.0,
    omega_max: float = math.inf,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> float:
    """Baseline: bisection on the same exact predicate, to ``tol``; returns the upper (valid) end.

    Converges to :func:`exact_omega` from above (the valid set is ``[omega_hat, omega_max]``).
    """
    budget = crc_budget(curve.n, epsilon)
    if budget < 0:
        return math.inf
    if curve.satisfies(omega_min, budget):
        return float(omega_min)
    top = max((float(t[-1]) for t in curve.thresholds if t.size), default=omega_min)
    hi = min(omega_max, top)
    if not curve.satisfies(hi, budget):
        return math.inf
    lo = float(omega_min)
    for _ in range(max_iter):
        if hi - lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if curve.satisfies(mid, budget):
            hi = mid
        else:
            lo = mid
    return hi
