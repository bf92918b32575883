"""Per-scan nonconformity scores of a calibrated method, and the calibration rebuilt from their quantiles.

Every per-scan guarantee of :mod:`ConformalSegLib.conformal` is a split-conformal quantile of one or two
per-scan scores (*channels*). In nonconformity form (larger = worse) the guarantee holds on a new scan
iff its score ``s`` is at most the channel's quantile ``q``, and ``q`` is the
``ceil((1 - alpha)(n + 1))``-th smallest calibration score (``+inf`` when that rank exceeds ``n``):

* cls, channel ``cutoff``: ``s_i = -c_i``, ``c_i`` the critical cutoff at epsilon; level ``alpha``;
  ``probability_threshold = -q``;
* lesion, channel ``cutoff``: ``s_i = -c_i``, ``c_i`` the lesion (or joint lesion + voxel) critical
  threshold; level ``alpha``; ``probability_threshold = -q``;
* sets, marginal or joint-split, channels ``inner``: ``s_i = tau_i``, level ``alpha_inner``,
  ``inner_threshold = q``; and ``outer``: ``s_i = gamma_i``, level ``alpha_outer``, ``outer_threshold = -q``;
* sets, joint-max, channel ``joint``: ``s_i = max(tau_i, gamma_i)``, level ``alpha``; ``inner_threshold = q``
  and ``outer_threshold = -q``.

(``c_test >= t  <=>  -c_test <= -t``: the CLS event "FNR <= eps" is ``s_test <= q`` with ``t = -q``;
the proofs are in :mod:`.cls`, :mod:`.lesion_level` and :mod:`.confidence_sets`.) Lesion-free scans
under the ``include`` policy have ``c_i = +inf``, i.e. ``s_i = -inf``: they are always covered.
Expected-FNR control (crc) bounds a mean, not a per-scan event, so it has no channel here.

:mod:`.mondrian` takes each channel's quantile within each group, :mod:`.weighted` a weighted quantile,
and :mod:`.monitoring` turns the ranks of the scores into conformal p-values. :func:`rebuild` puts the
new quantiles back into a calibration object of the same type (``dataclasses.replace``), so that masks,
profiles and guarantee sentences work unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..common.errors import ConformalSegError
from .cls import ThresholdCalibration, critical_cutoffs, used_cases
from .confidence_sets import SetsCalibration, SetStatistics
from .exact import as_fraction
from .lesion_level import LesionLevelCalibration, LesionLevelSummaries, scan_scores
from .summaries import LesionSummaries


class ProfileData(Protocol):
    """What a calibration's scores are computed from (a :class:`~.profile.CalibrationProfile` is one)."""

    @property
    def summaries(self) -> LesionSummaries: ...

    @property
    def set_statistics(self) -> SetStatistics | None: ...

    @property
    def lesion_level(self) -> LesionLevelSummaries | None: ...

    @property
    def empty_policy(self) -> str: ...


@dataclass(frozen=True)
class Channel:
    """One score of every calibration scan (float64, nonconformity: larger = worse), its level and, for a
    calibration-conditional (PAC) profile, the confidence parameter of its rank
    (:func:`~ConformalSegLib.conformal.exact.calibration_rank`; joint-split sets use ``pac_delta / 2``
    per set, as :func:`~ConformalSegLib.conformal.confidence_sets.calibrate_sets` does)."""

    name: str
    scores: np.ndarray
    alpha: float
    pac_delta: float | None = None


@dataclass(frozen=True)
class ScanScores:
    """The channels of a calibration, over all scans of the summaries; ``used`` marks the scans the
    calibration uses (lesion-free ones are dropped under the ``exclude`` policy)."""

    used: np.ndarray
    channels: tuple[Channel, ...]

    def monitoring_score(self) -> np.ndarray:
        """One nonconformity score per scan for exchangeability tests: the channel itself, or the
        larger of the two set scores (``max(tau, gamma)``) for marginal and joint-split sets."""
        stacked = np.vstack([c.scores for c in self.channels])
        score: np.ndarray = stacked.max(axis=0)
        return score


def has_scan_scores(calibration: ThresholdCalibration | SetsCalibration) -> bool:
    """True for the per-scan methods (cls, lesion, sets); False for expected-FNR control."""
    return isinstance(calibration, SetsCalibration) or calibration.method in ("cls", "lesion")


def scan_scores_of(calibration: ThresholdCalibration | SetsCalibration, data: ProfileData) -> ScanScores:
    """The channels of ``calibration`` (its parameters: epsilon, alpha, levels, mode) on ``data``."""
    if isinstance(calibration, SetsCalibration):
        return _set_scores(calibration, data)
    if isinstance(calibration, LesionLevelCalibration):
        assert data.lesion_level is not None and calibration.alpha is not None  # stored together
        critical = scan_scores(
            data.lesion_level,
            calibration.epsilon,
            voxel_epsilon=calibration.voxel_epsilon,
            voxel_summaries=data.summaries,
        )
        used = data.lesion_level.lesion_counts > 0
        return ScanScores(used, (Channel("cutoff", -critical, calibration.alpha, calibration.pac_delta),))
    if calibration.method != "cls":
        raise ConformalSegError(
            "expected-FNR control bounds a mean over scans, not a per-scan event: it has no per-scan score",
            fix="use --method cls (or lesion, sets) for weighted calibration and monitoring",
        )
    assert calibration.alpha is not None  # CLS always has one
    cutoffs = critical_cutoffs(data.summaries, calibration.epsilon)
    channel = Channel("cutoff", -cutoffs, calibration.alpha, calibration.pac_delta)
    return ScanScores(used_cases(data.summaries, data.empty_policy), (channel,))


def _set_scores(c: SetsCalibration, data: ProfileData) -> ScanScores:
    stats = data.set_statistics
    assert stats is not None  # sets profiles carry their statistics
    used = np.ones(stats.n, dtype=bool) if data.empty_policy == "include" else stats.lesion_sizes > 0
    if c.mode == "joint-max":
        return ScanScores(used, (Channel("joint", np.maximum(stats.tau, stats.gamma), c.alpha, c.pac_delta),))
    delta = c.pac_delta
    if delta is not None and c.mode == "joint-split":
        delta = float(as_fraction(delta) / 2)
    inner, outer = (
        Channel("inner", stats.tau, c.alpha_inner, delta),
        Channel("outer", stats.gamma, c.alpha_outer, delta),
    )
    return ScanScores(used, (inner, outer))


def rebuild(
    calibration: ThresholdCalibration | SetsCalibration,
    quantiles: Mapping[str, float],
    *,
    n: int,
    n_excluded: int = 0,
    rank: int | None = None,
    n_with_lesion: int | None = None,
) -> ThresholdCalibration | SetsCalibration:
    """``calibration`` with the thresholds that the channel quantiles ``q`` give (module table), its
    ``n`` (and, for cls/crc/lesion, the excluded lesion-free scans, the rank and, under the ``include``
    policy, how many of the ``n`` have a lesion) replaced."""
    if isinstance(calibration, SetsCalibration):
        if calibration.mode == "joint-max":
            q = quantiles["joint"]
            return dataclasses.replace(calibration, n=n, inner_threshold=q, outer_threshold=-q)
        return dataclasses.replace(
            calibration, n=n, inner_threshold=quantiles["inner"], outer_threshold=-quantiles["outer"]
        )
    return dataclasses.replace(
        calibration,
        n=n,
        n_excluded_empty=n_excluded,
        probability_threshold=-quantiles["cutoff"],
        rank=rank,
        n_with_lesion=n_with_lesion,
    )


def channel_quantiles(calibration: ThresholdCalibration | SetsCalibration) -> dict[str, float]:
    """The quantile ``q`` of each channel that ``calibration``'s thresholds stand for (the inverse of
    :func:`rebuild`): a scan is covered iff each of its channel scores is ``<= q``."""
    if isinstance(calibration, SetsCalibration):
        if calibration.mode == "joint-max":
            return {"joint": calibration.inner_threshold}
        return {"inner": calibration.inner_threshold, "outer": -calibration.outer_threshold}
    return {"cutoff": -calibration.probability_threshold}
