"""The anchor ``lambda_tilde``: the convex surrogate problem (PK) / (Psem), solved with cvxpy.

Surrogate loss (Teneggi et al. 2023, as in the authors' k-rcps code): with interval centre ``c``,
raw length ``I = q_hi - q_lo``, truth ``y`` and ``q = gamma / (1 - gamma)``, ``gamma in (0, 1)``,

    l_gamma(lambda) = max(0, 2 (1 + q) |y - c| / (I + 2 lambda) - q)

It is convex in ``lambda >= 0`` and bounds the 0-1 loss from above: ``y`` outside
``[q_lo - lambda, q_hi + lambda]`` means ``2|y - c| > I + 2 lambda``, so ``l_gamma > 1``.
(``I`` is floored at ``1e-9 * max(1, max I)`` so that ``I + 2 lambda > 0`` at ``lambda = 0``.)

Problem (PK)/(Psem) on the optimisation split::

    minimise   sum_k cost_k * lambda_k       cost_k = E_opt[|S_k(y)|] / E_opt[d]   (mean-length weights)
    subject to sum_v weight_v * l_gamma(lambda_{g(v)}) <= epsilon,   0 <= lambda_k <= upper

solved for every ``gamma`` of a small grid; the solution with the smallest objective wins (the
authors' choice). Voxels whose surrogate is already 0 at ``lambda = 0`` (``|y - c| <= gamma I / 2``)
are left out of that gamma's problem: the surrogate is non-increasing in lambda, so they contribute 0
at every feasible point (an exact reduction that shrinks the conic problem considerably). ``upper``
is ``lambda_max`` when given, otherwise the smallest value at which every sampled surrogate is 0 (so
the problem is always feasible).

Voxel subsampling (stratified by group): in each scan ``i`` and group ``k`` with ``n_ik > 0`` voxels,
``m_ik = min(n_ik, max(d_min, round(d_opt * n_ik / d_i)))`` voxels are drawn without replacement
and weighted ``(n_ik / d_i) / m_ik / n_opt``, so the weighted sum is an unbiased estimate of the
mean over scans of each scan's mean surrogate (the authors use unweighted samples; either choice is
only a heuristic: the anchor never affects validity, the backtracking step does).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import AnchorWarning, IntervalCalibrationError

DEFAULT_GAMMAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Cap on the paper's automatic ``d_opt = d_min / min_k E[|S_k| / d]`` (voxels per optimisation scan).
MAX_AUTO_D_OPT = 20000


@dataclass(frozen=True)
class AnchorSample:
    """Subsampled optimisation voxels: ``|y - c|``, raw length, group, weight; ``cost`` per group."""

    offset: np.ndarray
    width: np.ndarray
    group: np.ndarray
    weight: np.ndarray
    cost: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(self.cost.size)


@dataclass(frozen=True)
class AnchorResult:
    """The anchor, the chosen gamma, its objective, and per-gamma ``(gamma, status, objective)``."""

    lam: np.ndarray
    gamma: float | None
    objective: float
    solve_seconds: float
    trials: list[tuple[float, str, float]] = field(default_factory=list)


class SampleBuilder:
    """:func:`stratified_sample` one scan at a time (:meth:`add` in scan order, then :meth:`finish`).

    The draws of ``rng`` happen in :meth:`add`, in the same order as :func:`stratified_sample` makes them,
    so feeding the scans one by one gives a bit-identical sample without holding every scan in memory.
    ``n_scans`` (the number of scans that will be added) enters the weights.
    """

    def __init__(self, n_groups: int, n_scans: int, *, d_opt: int, d_min: int, rng: np.random.Generator) -> None:
        if d_opt < 1 or d_min < 0:
            raise IntervalCalibrationError(
                f"d_opt must be >= 1 and d_min >= 0, got d_opt={d_opt}, d_min={d_min}",
                fix="pass e.g. d_opt=3000, d_min=2",
            )
        self.n_groups, self.n_scans, self.d_opt, self.d_min, self.rng = n_groups, n_scans, d_opt, d_min, rng
        self.parts: dict[str, list[np.ndarray]] = {"offset": [], "width": [], "group": [], "weight": []}
        self.counts: list[np.ndarray] = []
        self.sizes: list[float] = []

    def add(self, need: np.ndarray, width: np.ndarray, group: np.ndarray) -> None:
        """Draw the optimisation voxels of one scan, stratified by group (module docstring)."""
        g = np.asarray(group)
        d = g.size
        n = self.n_scans
        self.sizes.append(float(d))
        counts = np.bincount(g, minlength=self.n_groups).astype(np.float64)
        self.counts.append(counts)
        for k in np.flatnonzero(counts):
            members = np.flatnonzero(g == k)
            n_ik = members.size
            m_ik = int(min(n_ik, max(self.d_min, round(self.d_opt * n_ik / d))))
            if m_ik == 0:
                continue
            pick = members if m_ik == n_ik else self.rng.choice(members, size=m_ik, replace=False)
            w = np.asarray(width, dtype=np.float64)[pick]
            self.parts["offset"].append(np.asarray(need, dtype=np.float64)[pick] + 0.5 * w)
            self.parts["width"].append(w)
            self.parts["group"].append(np.full(m_ik, k, dtype=np.int64))
            self.parts["weight"].append(np.full(m_ik, (n_ik / d) / m_ik / n))

    def finish(self) -> AnchorSample:
        counts = np.zeros((len(self.counts), self.n_groups), dtype=np.float64)
        for i, row in enumerate(self.counts):
            counts[i] = row
        sizes = np.asarray(self.sizes, dtype=np.float64)
        cost = counts.mean(axis=0) / max(sizes.mean(), 1.0)
        arrays = {key: np.concatenate(value) if value else np.zeros(0) for key, value in self.parts.items()}
        return AnchorSample(
            np.maximum(arrays["offset"], 0.0), arrays["width"], arrays["group"].astype(np.int64), arrays["weight"], cost
        )


def stratified_sample(
    need: Sequence[np.ndarray],
    width: Sequence[np.ndarray],
    group: Sequence[np.ndarray],
    n_groups: int,
    *,
    d_opt: int,
    d_min: int,
    rng: np.random.Generator,
) -> AnchorSample:
    """Draw the optimisation voxels of every scan, stratified by group (module docstring)."""
    builder = SampleBuilder(n_groups, len(need), d_opt=d_opt, d_min=d_min, rng=rng)
    for i in range(len(need)):
        builder.add(need[i], width[i], group[i])
    return builder.finish()


def auto_d_opt_from_counts(counts: np.ndarray, sizes: np.ndarray, d_min: int) -> int:
    """The paper's ``d_opt = d_min / min_k E[|S_k| / d]`` over groups present in ``S_opt`` (capped), from the
    ``(n_opt, K)`` group counts and the ``(n_opt, 1)`` counted-voxel numbers of the ``S_opt`` scans."""
    fractions = (counts / sizes).mean(axis=0)
    smallest = float(fractions[fractions > 0].min()) if (fractions > 0).any() else 1.0
    return int(min(MAX_AUTO_D_OPT, math.ceil(max(d_min, 1) / smallest)))


def surrogate_loss(offset: np.ndarray, width: np.ndarray, lam: np.ndarray, gamma: float) -> np.ndarray:
    """``max(0, 2 (1 + q) offset / (I + 2 lambda) - q)`` with ``q = gamma / (1 - gamma)`` (numpy)."""
    q = gamma / (1.0 - gamma)
    floor = _width_floor(width)
    return np.maximum(0.0, 2.0 * (1.0 + q) * offset / (np.maximum(width, floor) + 2.0 * lam) - q)


def surrogate_risk(sample: AnchorSample, lam: np.ndarray, gamma: float) -> float:
    """Weighted mean surrogate of the sample at per-group ``lam``."""
    lam = np.asarray(lam, dtype=np.float64)
    return float(np.sum(sample.weight * surrogate_loss(sample.offset, sample.width, lam[sample.group], gamma)))


def _width_floor(width: np.ndarray) -> float:
    return 1e-9 * max(1.0, float(np.max(width))) if np.size(width) else 1e-9


def surrogate_upper_bound(sample: AnchorSample, gammas: Sequence[float]) -> float:
    """Smallest lambda at which every sampled surrogate is 0 for all ``gammas``: ``(1+q)|y-c|/q - I/2``."""
    q = min(gammas) / (1.0 - min(gammas))
    if sample.offset.size == 0:
        return 0.0
    bound = float(np.max((1.0 + q) * sample.offset / q - 0.5 * sample.width))
    return max(0.0, bound) * (1.0 + 1e-6) + 1e-12


def _check_gammas(gammas: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(g) for g in gammas)
    if not values or not all(0.0 < g < 1.0 for g in values):
        raise IntervalCalibrationError(
            f"gamma values must lie strictly between 0 and 1, got {gammas!r}", fix="pass e.g. gammas=(0.1, 0.5, 0.9)"
        )
    return values


def solve_anchor(
    sample: AnchorSample,
    epsilon: float,
    *,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    lambda_max: float | None = None,
    solver: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> AnchorResult:
    """Solve (PK)/(Psem) for each gamma and keep the smallest objective (module docstring).

    Groups with zero cost (absent from the optimisation scans) get anchor 0. If no gamma yields a
    solution, the anchor is 0 with an :class:`AnchorWarning`. ``progress(done, total, text)`` after each gamma.
    """
    try:
        import cvxpy as cp
    except ImportError as exc:  # e.g. Slicer's Python without the package
        raise IntervalCalibrationError(
            "K-CRC and sem-CRC need the cvxpy package for the anchor problem",
            fix="pip install 'cvxpy>=1.4' (in Slicer: slicer.util.pip_install('cvxpy'))",
        ) from exc

    gammas = _check_gammas(gammas)
    k = sample.n_groups
    start = time.perf_counter()
    upper = float(lambda_max) if lambda_max is not None else surrogate_upper_bound(sample, gammas)
    if sample.offset.size == 0:
        return AnchorResult(np.zeros(k), None, 0.0, time.perf_counter() - start, [])
    width = np.maximum(sample.width, _width_floor(sample.width))
    installed = cp.installed_solvers()
    chosen = solver or next((s for s in ("CLARABEL", "ECOS", "SCS") if s in installed), None)
    trials: list[tuple[float, str, float]] = []
    best: tuple[float, np.ndarray, float] | None = None
    for gamma in gammas:
        q = gamma / (1.0 - gamma)
        # voxels whose surrogate is 0 at lambda = 0 stay 0 for every lambda >= 0 (non-increasing): drop them
        active = 2.0 * (1.0 + q) * sample.offset / width - q > 0
        status, value = _solve_one(cp, sample, width, active, q, k, upper, float(epsilon), chosen)
        if value is not None:
            value[sample.cost == 0] = 0.0
            objective = float(sample.cost @ value)
            trials.append((gamma, status, objective))
            if best is None or objective < best[2]:
                best = (gamma, value, objective)
        else:
            trials.append((gamma, status, math.nan))
        if progress is not None:
            progress(len(trials), len(gammas), f"gamma {gamma:g}: {status}")
    seconds = time.perf_counter() - start
    if best is None:
        warnings.warn(
            f"the anchor problem had no solution for any gamma in {gammas} (statuses: "
            f"{sorted({s for _, s, _ in trials})}); using anchor 0. Fix: raise lambda_max or epsilon",
            AnchorWarning,
            stacklevel=2,
        )
        return AnchorResult(np.zeros(k), None, 0.0, seconds, trials)
    return AnchorResult(best[1], best[0], best[2], seconds, trials)


def _solve_one(
    cp,
    sample: AnchorSample,
    width: np.ndarray,
    active: np.ndarray,
    q: float,
    k: int,
    upper: float,
    epsilon: float,
    solver: str | None,
) -> tuple[str, np.ndarray | None]:
    """One (PK)/(Psem) solve for one gamma on the active voxels; ``(status, lambda or None)``."""
    if not active.any():
        return "optimal", np.zeros(k)
    lam = cp.Variable(k)
    offset, group = sample.offset[active], sample.group[active]
    terms = cp.pos(2.0 * (1.0 + q) * cp.multiply(offset, cp.inv_pos(width[active] + 2 * lam[group])) - q)
    problem = cp.Problem(
        cp.Minimize(sample.cost @ lam), [lam >= 0, lam <= upper, sample.weight[active] @ terms <= epsilon]
    )
    try:
        problem.solve(solver=solver)
    except cp.error.SolverError as exc:  # pragma: no cover - solver failures are rare
        return f"solver error: {exc}", None
    status = str(problem.status)
    if status not in ("optimal", "optimal_inaccurate") or lam.value is None:
        return status, None
    return status, np.clip(np.asarray(lam.value, dtype=np.float64), 0.0, upper)
