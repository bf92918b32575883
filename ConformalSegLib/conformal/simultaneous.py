"""Slider-safe thresholds: one calibration event on which the guarantee holds for **every** epsilon of
a grid at once, so a user may move the epsilon slider after looking at the scan.

Why
---
CLS (and the lesion-level method) guarantee ``P(FNR_test(c_hat(eps)) <= eps) >= 1 - alpha`` for an
epsilon fixed *before* looking. A user who moves the slider until the mask looks right picks epsilon
after looking; over a 10-value grid this reaches ``P(FNR > eps_chosen) = 0.146`` at nominal 0.10
(statistics audit). Here the thresholds ``c_hat(eps)`` for all epsilons of the grid are chosen
together so that ``P(for every eps in the grid: FNR_test(c_hat(eps)) <= eps) >= 1 - alpha``.

The band family and each scan's score
-------------------------------------
Every calibration scan ``i`` has a critical curve ``eps -> c_i(eps)`` (its critical cutoff at each
grid epsilon: :func:`ConformalSegLib.conformal.cls.critical_cutoffs` for voxel FNR,
:meth:`~ConformalSegLib.conformal.lesion_level.LesionLevelSummaries.critical_cutoffs` for missed
lesions); the event "the mask at ``t`` keeps its promise at eps" is ``t <= c_i(eps)``.

* The **band of level k** is the curve ``B_k(eps)`` = the ``k``-th largest of the calibration values
  ``c_1(eps), ..., c_n(eps)`` (``-inf`` when ``k > n``): the same rank ``k`` at every epsilon. Bands
  are nested: a larger ``k`` is a lower curve (larger masks).
* A scan's **score** is the lowest band level its curve never falls below: ``M_j = max over the grid
  of D_j(eps)``, with the descending rank ``D_j(eps) = 1 + #{i != j : c_i(eps) > c_j(eps)}`` among the
  calibration scans. A scan whose curve is low at *any* epsilon gets a high score.
* With ``q = ceil((1 - alpha)(n + 1))`` the level is ``k_hat = M_(q) + 1`` (``M_(q)`` the ``q``-th
  smallest score), and ``c_hat(eps) = B_{k_hat}(eps)``. When ``q > n`` or ``k_hat > n`` the band is
  ``-inf`` (the whole image), with the usual warning.

Proof of validity
-----------------
Add the test scan as scan ``n + 1`` and let ``M'_j`` be the scores computed among all ``n + 1`` scans.
(1) The test scan keeps every promise iff ``c_test(eps) >= B_{k_hat}(eps)`` for every grid epsilon,
i.e. iff fewer than ``k_hat`` calibration values exceed ``c_test(eps)`` at every epsilon, i.e. iff
``M'_test <= k_hat``. (2) Adding one scan raises a rank by at most one, so ``M'_j <= M_j + 1`` for
``j <= n``: at least ``q`` of the ``n + 1`` scans have ``M'_j <= k_hat``. Hence the symmetric level
``k* =`` the ``q``-th smallest of ``M'_1, ..., M'_{n+1}`` is at most ``k_hat``. (3) ``k*`` is a
symmetric function of the ``n + 1`` exchangeable curves, so ``P(M'_test <= k*) >= q / (n + 1) >= 1 - alpha``
(at least ``q`` scans have ``M' <= k*``; ties only help). Together: the test scan keeps every promise
with probability ``>= 1 - alpha``. With a one-value grid this is CLS at one rank more conservative
(the ``+1`` of step (2)); the cost of simultaneity is how far ``k_hat`` rises above ``q``, i.e. how
often a scan that is good at one epsilon is bad at another.

The guarantee covers exactly the epsilons of the grid (the slider's stops); between stops it says
nothing. Computing the band is ``O(E n log n)`` for ``E`` grid values; it is done once per alpha, and
each slider step then only reads ``c_hat`` at the chosen stop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .exact import as_fraction, check_alpha, check_epsilon, conformal_rank, min_calibration_size

#: The default slider grid: epsilon from 0 to 1 in steps of 0.01 (101 stops).
DEFAULT_GRID = tuple(float(Fraction(i, 100)) for i in range(101))


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """A grid of epsilons: non-empty, each in [0, 1], strictly increasing (as typed)."""
    values = tuple(float(e) for e in grid)
    if not values:
        raise ConformalSegError("the epsilon grid is empty", fix="give at least one epsilon, e.g. 0.05 0.1 0.2")
    fractions = [check_epsilon(e) for e in values]
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ConformalSegError(f"the epsilon grid must be strictly increasing, got {list(values)}")
    return values


def descending_ranks(column: np.ndarray) -> np.ndarray:
    """``1 + #{i : column[i] > column[j]}`` for every ``j`` (ties share the best rank)."""
    ordered = np.sort(column)
    return 1 + column.size - np.searchsorted(ordered, column, side="right")


def band_scores(criticals: np.ndarray) -> np.ndarray:
    """Per-scan score ``M_j`` (the module docstring) of an ``(n, E)`` matrix of critical cutoffs."""
    criticals = np.asarray(criticals, dtype=np.float64)
    if criticals.ndim != 2:
        raise ValueError("criticals must be an (n scans, E epsilons) matrix")
    if criticals.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.stack([descending_ranks(criticals[:, e]) for e in range(criticals.shape[1])], axis=1)
    scores: np.ndarray = ranks.max(axis=1).astype(np.int64)
    return scores


@dataclass(frozen=True)
class SimultaneousBand:
    """Slider-safe thresholds: ``threshold(eps)`` for every ``eps`` of ``grid`` (one event; see the module
    docstring)."""

    grid: tuple[float, ...]
    thresholds: tuple[float, ...]  #: c_hat at each grid epsilon (-inf: the whole image)
    alpha: float
    n: int
    level: int  #: k_hat, the common descending rank (n + 1 or more: trivial)
    fixed_rank: int  #: q = ceil((1 - alpha)(n + 1)), the rank one fixed epsilon would use

    @property
    def is_trivial(self) -> bool:
        return self.level > self.n

    def threshold(self, epsilon: float) -> float:
        """``c_hat`` at a grid epsilon (refuses an epsilon that is not a stop of the grid)."""
        target = as_fraction(epsilon)
        for e, t in zip(self.grid, self.thresholds):
            if as_fraction(e) == target:
                return t
        raise ConformalSegError(
            f"epsilon {epsilon} is not on the slider-safe grid",
            fix="use a grid epsilon, or the per-(epsilon, alpha) mode for other values",
        )


def simultaneous_band(
    critical_curve: Callable[[float], np.ndarray],
    used: np.ndarray,
    alpha: float,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    warn: bool = True,
) -> SimultaneousBand:
    """The slider-safe band from ``critical_curve(eps)`` (each scan's critical cutoff at ``eps``; the
    scans where ``used`` is True are the calibration set)."""
    check_alpha(alpha)
    grid = check_grid(grid)
    used = np.asarray(used, dtype=bool)
    criticals = np.stack([np.asarray(critical_curve(e), dtype=np.float64)[used] for e in grid], axis=1)
    n = criticals.shape[0]
    if n == 0:
        raise ConformalSegError(
            "no calibration scan with a lesion: the slider-safe band needs scans with lesions",
            fix="check the lesion label value(s) (--lesion-label)",
        )
    q = conformal_rank(n, alpha)
    if q > n:
        level = n + 1
    else:
        scores = band_scores(criticals)
        level = int(np.partition(scores, q - 1)[q - 1]) + 1
    if level > n:
        thresholds = tuple(float("-inf") for _ in grid)
        if warn:
            needed = min_calibration_size(alpha)
            warnings.warn(
                f"slider-safe band: {n} calibration scan(s) give no finite band for alpha={alpha} "
                f"(a fixed epsilon needs at least {needed}; the band needs more when the scans' curves "
                "cross). The mask is the whole image.",
                CalibrationSetTooSmallWarning,
                stacklevel=2,
            )
    else:
        # the level-th largest of each column
        thresholds = tuple(float(v) for v in np.partition(criticals, n - level, axis=0)[n - level])
    return SimultaneousBand(grid, thresholds, float(alpha), n, level, q)
