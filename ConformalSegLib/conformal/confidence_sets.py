"""Conformal confidence sets for segmentation (Davenport): inner and outer sets around the lesion.

Notation (the paper's labels are swapped in places; these signs follow from the proofs)
--------------------------------------------------------------------------------------
``T = f(s)`` is a transformed score, higher = more lesion-like (:mod:`ConformalSegLib.conformal.score_transforms`).
For each calibration case ``i`` with true lesion ``Y_i``:

* ``tau_i   = max_{v not in Y_i} T_i(v)``   (highest score on true background; ``-inf`` if none),
* ``gamma_i = max_{v in Y_i} -T_i(v)``      (minus the lowest score on true lesion; ``-inf`` if the
  lesion is empty).

With ``q(x, a)`` = the ``ceil((1 - a)(n + 1))``-th smallest of ``x_1..x_n`` (``+inf`` if that rank
exceeds ``n``):

* **Inner set** ``I = {v : T(v) > lambda_in}``, ``lambda_in = q(tau, alpha_in)`` (strict ``>``).
  *Proof sketch.* ``I`` contains a background voxel iff some background ``T(v) > lambda_in`` iff
  ``tau_test > lambda_in``. The ``tau`` are exchangeable, so ``P(tau_test <= lambda_in) >= 1 - alpha_in``,
  hence ``P(I subset of Y) >= 1 - alpha_in``.
* **Outer set** ``O = {v : T(v) >= -mu}``, ``mu = q(gamma, alpha_out)`` (``>=``); we store
  ``outer_threshold = -mu``. *Proof sketch.* ``Y`` is inside ``O`` iff every lesion voxel has
  ``-T(v) <= mu`` iff ``gamma_test <= mu``, which has probability ``>= 1 - alpha_out``.
* **Joint, split** (Corollary 2.3): the two marginal sets with ``alpha_in + alpha_out <= alpha``;
  by the union bound ``P(I subset Y subset O) >= 1 - alpha``.
* **Joint, max** (Theorem 2.4): ``lambda = q(max(tau, gamma), alpha)``; ``I = {T > lambda}`` and
  ``O = {T >= -lambda}``. On the event ``max(tau_test, gamma_test) <= lambda`` (probability
  ``>= 1 - alpha``) both containments hold.

Conventions and edge cases
--------------------------
* With the identity transform the thresholds are probabilities: inner = ``prob > inner_threshold``,
  outer = ``prob >= outer_threshold``.
* Too few cases (rank > n): ``lambda_in = +inf`` (inner set empty) and ``outer_threshold = -inf``
  (outer set = whole image), with a :class:`CalibrationSetTooSmallWarning`.
* Empty true lesion: ``gamma = -inf`` (the outer set trivially contains it) and ``tau`` is the
  maximum over the whole image (the inner set must then be empty). Such cases are *included* by
  default: the guarantee is then over all scans, lesion-free ones included, and the inner set also
  controls false detections on lesion-free scans.
* Nesting: the reported inner set is ``I & O``. On the joint event this changes nothing; for the
  marginal inner guarantee a subset of ``I`` is still inside ``Y``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ..common.geometry import Geometry
from .cls import apply_threshold, too_small_message
from .exact import (
    as_fraction,
    calibration_rank,
    check_alpha,
    needed_calibration_size,
)
from .score_transforms import IDENTITY, ScoreTransform, parse_transform
from .summaries import check_probabilities

MODES = ("marginal", "joint-split", "joint-max")


def conformal_upper_quantile(scores: np.ndarray, alpha: float, pac_delta: float | None = None) -> float:
    """``ceil((1 - alpha)(n + 1))``-th smallest score (with ``pac_delta``: the PAC rank), ``+inf`` when that
    rank exceeds ``n``."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    k = calibration_rank(n, alpha, pac_delta)
    if k > n:
        return float("inf")
    return float(np.partition(scores, k - 1)[k - 1])


def case_statistics(
    probability: np.ndarray,
    lesion: np.ndarray,
    geometry: Geometry,
    inner: ScoreTransform = IDENTITY,
    outer: ScoreTransform = IDENTITY,
) -> tuple[float, float]:
    """``(tau, gamma)`` of one case (see module docstring)."""
    lesion = np.asarray(lesion, dtype=bool)
    t_inner = inner(probability, geometry)
    t_outer = t_inner if outer == inner else outer(probability, geometry)
    background = ~lesion
    tau = float(t_inner[background].max()) if background.any() else float("-inf")
    gamma = float(-t_outer[lesion].min()) if lesion.any() else float("-inf")
    return tau, gamma


@dataclass(frozen=True)
class SetStatistics:
    """Per-case ``tau`` and ``gamma`` for one (inner, outer) transform pair: all a recalibration needs."""

    tau: np.ndarray
    gamma: np.ndarray
    case_ids: tuple[str, ...]
    inner_transform: str = "identity"
    outer_transform: str = "identity"
    lesion_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SetStatistics:
        idx = np.asarray(indices, dtype=np.int64)
        sizes = self.lesion_sizes[idx] if self.lesion_sizes.size else self.lesion_sizes
        return SetStatistics(
            self.tau[idx],
            self.gamma[idx],
            tuple(self.case_ids[i] for i in idx),
            self.inner_transform,
            self.outer_transform,
            sizes,
        )

    def without_empty(self) -> SetStatistics:
        if not self.lesion_sizes.size:
            raise ValueError("lesion sizes unknown")
        return self.subset(np.flatnonzero(self.lesion_sizes > 0))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"sets_tau": self.tau, "sets_gamma": self.gamma, "sets_lesion_sizes": self.lesion_sizes}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, Any], case_ids: Sequence[str], inner_transform: str, outer_transform: str
    ) -> SetStatistics:
        return cls(
            np.asarray(arrays["sets_tau"], np.float64),
            np.asarray(arrays["sets_gamma"], np.float64),
            tuple(case_ids),
            inner_transform,
            outer_transform,
            np.asarray(arrays["sets_lesion_sizes"], np.int64),
        )


class SetStatisticsBuilder:
    """Accumulates ``(tau, gamma)`` while cases are streamed."""

    def __init__(self, inner: ScoreTransform = IDENTITY, outer: ScoreTransform = IDENTITY):
        self.inner, self.outer = inner, outer
        self._tau: list[float] = []
        self._gamma: list[float] = []
        self._ids: list[str] = []
        self._sizes: list[int] = []

    def add_case(self, case_id: str, probability: np.ndarray, lesion: np.ndarray, geometry: Geometry) -> None:
        check_probabilities(probability, str(case_id))
        tau, gamma = case_statistics(probability, lesion, geometry, self.inner, self.outer)
        self._tau.append(tau)
        self._gamma.append(gamma)
        self._ids.append(str(case_id))
        self._sizes.append(int(np.count_nonzero(lesion)))

    def build(self) -> SetStatistics:
        return SetStatistics(
            np.array(self._tau, np.float64),
            np.array(self._gamma, np.float64),
            tuple(self._ids),
            self.inner.name,
            self.outer.name,
            np.array(self._sizes, np.int64),
        )


@dataclass(frozen=True)
class SetsCalibration:
    """Calibrated inner/outer thresholds: inner = ``T_in > inner_threshold``, outer = ``T_out >= outer_threshold``."""

    mode: str
    alpha: float  # overall level of the statement (the max of the two marginal levels when marginal)
    alpha_inner: float
    alpha_outer: float
    n: int
    inner_threshold: float
    outer_threshold: float
    inner_transform: str
    outer_transform: str
    pac_delta: float | None = None  # calibration-conditional (PAC) confidence 1 - pac_delta; None: marginal


def resolve_levels(
    alpha: float | None, alpha_inner: float | None, alpha_outer: float | None, mode: str
) -> tuple[float, float, float]:
    """Fill in default levels and check them: returns ``(alpha, alpha_inner, alpha_outer)``.

    marginal: each level defaults to ``alpha``. joint-split: a missing level is the rest of ``alpha``
    (``alpha/2`` each when both are missing) and ``alpha_inner + alpha_outer <= alpha`` is required
    (checked exactly). joint-max: one ``alpha``.
    """
    if mode not in MODES:
        raise ConformalSegError(f"unknown confidence-set mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    if mode == "joint-max":
        if alpha is None:
            raise ConformalSegError("joint (max) confidence sets need --alpha")
        check_alpha(alpha)
        return alpha, alpha, alpha
    if mode == "joint-split":
        if alpha is None:
            if alpha_inner is None or alpha_outer is None:
                raise ConformalSegError("joint confidence sets need --alpha or both --alpha-inner and --alpha-outer")
            alpha = float(as_fraction(alpha_inner) + as_fraction(alpha_outer))
        if alpha_inner is None:
            alpha_inner = _largest_float_at_most(
                as_fraction(alpha) / 2 if alpha_outer is None else as_fraction(alpha) - as_fraction(alpha_outer)
            )
        if alpha_outer is None:
            alpha_outer = _largest_float_at_most(as_fraction(alpha) - as_fraction(alpha_inner))
        check_alpha(alpha_inner, "alpha_inner")
        check_alpha(alpha_outer, "alpha_outer")
        if as_fraction(alpha_inner) + as_fraction(alpha_outer) > as_fraction(alpha):
            raise ConformalSegError(
                f"alpha_inner + alpha_outer = {alpha_inner} + {alpha_outer} exceeds alpha = {alpha}",
                fix="choose levels whose sum is at most --alpha (Corollary 2.3's union bound)",
            )
        check_alpha(alpha)
        return alpha, alpha_inner, alpha_outer
    alpha_inner = alpha if alpha_inner is None else alpha_inner
    alpha_outer = alpha if alpha_outer is None else alpha_outer
    if alpha_inner is None or alpha_outer is None:
        raise ConformalSegError("confidence sets need --alpha (or --alpha-inner and --alpha-outer)")
    check_alpha(alpha_inner, "alpha_inner")
    check_alpha(alpha_outer, "alpha_outer")
    return max(alpha_inner, alpha_outer), alpha_inner, alpha_outer


def _largest_float_at_most(value: Fraction) -> float:
    """The largest float whose decimal reading (:func:`as_fraction`) does not exceed ``value``, so that
    default levels never break ``alpha_inner + alpha_outer <= alpha`` by a rounding."""
    x = float(value)
    while as_fraction(x) > value:
        x = float(np.nextafter(x, -np.inf))
    return x


def calibrate_sets(
    stats: SetStatistics,
    *,
    alpha: float | None = None,
    alpha_inner: float | None = None,
    alpha_outer: float | None = None,
    mode: str = "marginal",
    warn: bool = True,
    pac_delta: float | None = None,
) -> SetsCalibration:
    """Calibrate inner/outer thresholds from per-case statistics (exact order statistics).

    With ``pac_delta`` (calibration-conditional, PAC): ``marginal`` calibrates each set at
    ``(alpha_x, pac_delta)`` (each statement holds for this calibration set with confidence
    ``1 - pac_delta``); ``joint-max`` its one score at ``(alpha, pac_delta)``; ``joint-split`` each set
    at ``(alpha_x, pac_delta / 2)``, so that by the union bound, with confidence ``1 - pac_delta`` both
    conditional coverages hold together and the joint one is ``>= 1 - alpha_inner - alpha_outer``.
    """
    alpha, alpha_inner, alpha_outer = resolve_levels(alpha, alpha_inner, alpha_outer, mode)
    if stats.n == 0:
        raise ConformalSegError("no calibration cases for confidence sets")
    delta = None
    if pac_delta is not None:
        check_alpha(pac_delta, "pac_delta")
        delta = float(as_fraction(pac_delta) / 2) if mode == "joint-split" else pac_delta
    if mode == "joint-max":
        units = (parse_transform(stats.inner_transform).units, parse_transform(stats.outer_transform).units)
        if units[0] != units[1]:
            raise ConformalSegError(
                f"joint (max) confidence sets compare the inner score in {units[0]} with the outer score in "
                f"{units[1]}: one threshold for both is valid but meaningless across units",
                fix="use --joint-method split (one threshold per set), or transforms in the same units",
            )
        lam = conformal_upper_quantile(np.maximum(stats.tau, stats.gamma), alpha, delta)
        inner_thr, outer_thr = lam, -lam
    else:
        inner_thr = conformal_upper_quantile(stats.tau, alpha_inner, delta)
        outer_thr = -conformal_upper_quantile(stats.gamma, alpha_outer, delta)
    if warn and (np.isposinf(inner_thr) or np.isneginf(outer_thr)):
        level = min(alpha_inner, alpha_outer)
        what = f"alpha={level}" if delta is None else f"alpha={level} with PAC delta={delta}"
        warnings.warn(
            too_small_message("Confidence sets", stats.n, needed_calibration_size(level, delta), what),
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    return SetsCalibration(
        mode,
        float(alpha),
        float(alpha_inner),
        float(alpha_outer),
        stats.n,
        inner_thr,
        outer_thr,
        stats.inner_transform,
        stats.outer_transform,
        None if pac_delta is None else float(pac_delta),
    )


def apply_sets(
    probability: np.ndarray, geometry: Geometry, calibration: SetsCalibration
) -> tuple[np.ndarray, np.ndarray]:
    """``(inner, outer)`` boolean masks for a test probability map (inner is intersected with outer)."""
    inner_t = parse_transform(calibration.inner_transform)
    outer_t = parse_transform(calibration.outer_transform)
    t_inner = inner_t(probability, geometry)
    t_outer = t_inner if outer_t == inner_t else outer_t(probability, geometry)
    outer = _at_least(t_outer, calibration.outer_threshold)
    inner = _greater(t_inner, calibration.inner_threshold) & outer
    return inner, outer


def _greater(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values > threshold`` exactly for any float dtype (threshold rounded *down* to the dtype)."""
    if np.isposinf(threshold):
        return np.zeros(values.shape, dtype=bool)
    if np.isneginf(threshold):
        return np.ones(values.shape, dtype=bool)
    dtype = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
    cast = dtype.type(threshold)
    if float(cast) > threshold:
        cast = np.nextafter(cast, dtype.type(-np.inf))
    above: np.ndarray = values > cast
    return above


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    return apply_threshold(values, threshold)


@dataclass(frozen=True)
class TransformSelection:
    """Outcome of :func:`select_transforms`: the chosen transforms and the mean set sizes (voxels)."""

    inner: ScoreTransform
    outer: ScoreTransform
    mean_inner_size: dict[str, float]
    mean_outer_size: dict[str, float]


def select_transforms(
    learning_cases: Iterable[tuple[np.ndarray, np.ndarray, Geometry]],
    candidates: Sequence[ScoreTransform],
    *,
    alpha_inner: float,
    alpha_outer: float,
    repeats: int = 20,
    seed: int = 0,
) -> TransformSelection:
    """Pick the inner and outer transforms giving the tightest sets on a *learning* set.

    The learning cases must be kept apart from the calibration and test data (then the choice does
    not affect validity). For each candidate, the learning set is split in half ``repeats`` times
    (seeded): thresholds are calibrated on one half and set sizes measured on the other. The inner
    transform maximises the mean inner-set size, the outer one minimises the mean outer-set size.
    Memory: one sorted float32 copy of each transformed map per case and candidate.
    """
    if not candidates:
        raise ConformalSegError("no candidate transforms given")
    if len({c.name for c in candidates}) != len(candidates):
        raise ConformalSegError("candidate transforms must be distinct", fix="list each transform once")
    per_transform: dict[str, tuple[list[float], list[float], list[np.ndarray]]] = {
        c.name: ([], [], []) for c in candidates
    }
    n = 0
    for probability, lesion, geometry in learning_cases:
        n += 1
        for transform in candidates:
            tau, gamma = case_statistics(probability, lesion, geometry, transform, transform)
            taus, gammas, sorted_scores = per_transform[transform.name]
            taus.append(tau)
            gammas.append(gamma)
            sorted_scores.append(np.sort(transform(probability, geometry).ravel()).astype(np.float32))
    if n < 4:
        raise ConformalSegError(f"transform selection needs at least 4 learning cases, got {n}")
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n) for _ in range(repeats)]
    inner_size: dict[str, float] = {}
    outer_size: dict[str, float] = {}
    for transform in candidates:
        taus, gammas, sorted_scores = per_transform[transform.name]
        taus_a, gammas_a = np.array(taus), np.array(gammas)
        inner_total = outer_total = 0.0
        count = 0
        for perm in splits:
            cal, held = perm[: n // 2], perm[n // 2 :]
            lam_in = conformal_upper_quantile(taus_a[cal], alpha_inner)
            thr_out = -conformal_upper_quantile(gammas_a[cal], alpha_outer)
            for j in held:
                scores = sorted_scores[j]
                inner_total += scores.size - np.searchsorted(scores, lam_in, side="right")
                outer_total += scores.size - np.searchsorted(scores, thr_out, side="left")
                count += 1
        inner_size[transform.name] = inner_total / count
        outer_size[transform.name] = outer_total / count
    best_inner = max(candidates, key=lambda c: inner_size[c.name])
    best_outer = min(candidates, key=lambda c: outer_size[c.name])
    return TransformSelection(best_inner, best_outer, inner_size, outer_size)
