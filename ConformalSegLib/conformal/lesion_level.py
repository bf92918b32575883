"""Lesion-level conformal control: with probability >= 1 - alpha the mask misses at most a fraction
epsilon of a new scan's **lesions** (not voxels); optionally jointly with the voxel FNR.

Voxel FNR is dominated by large lesions: a mask that keeps 95 % of the lesion voxels can still miss
every small metastasis. This method controls the number of *missed lesions* per scan, exactly.

Guarantee
---------
With calibration scans exchangeable with the test scan, the mask ``prob >= c_hat`` satisfies
``P(missed lesions of the test scan <= epsilon * L_test) >= 1 - alpha`` over scans with at least one
lesion (probability over calibration and test draws). With ``voxel_epsilon`` (joint): with probability
``>= 1 - alpha``, *both* at most a fraction epsilon of its lesions *and* at most a fraction
``voxel_epsilon`` of its lesion voxels are missed, on the same scan at once.

Definitions and conventions (all exact; epsilon, alpha and tau are read as the decimals typed, see
:mod:`ConformalSegLib.conformal.exact`)
---------------------------------------------------------------------------------------------------
* **Lesions** are the 26-connected components of the true lesion mask (``scipy.ndimage.label`` with
  the full 3x3x3 structure: lesions touching at a corner are one lesion). Components with fewer than
  ``min_lesion_voxels`` voxels, or a volume (voxels x voxel volume) below ``min_lesion_mm3`` mm^3, are
  **ignored**: they are not counted in ``L`` (the default ignores none). A scan's ``L`` is its number
  of counted lesions.
* A lesion of ``m`` voxels is **detected** by the mask ``prob >= t`` (``>=``: a voxel equal to the
  threshold is in the mask) iff at least ``r = ceil(tau * m)`` of its voxels are in the mask, with
  ``tau`` = ``detect_fraction`` in ``(0, 1]`` (default 0.5; ``r >= 1``, so a tiny ``tau`` means one
  voxel suffices and ``tau = 1`` means every voxel).
* **Detection threshold** of a lesion: ``d = `` the ``r``-th largest probability inside it. Then for every
  ``t``: the lesion is detected at ``t`` **iff** ``t <= d`` (at least ``r`` voxels have ``p >= t`` iff
  the ``r``-th largest is ``>= t``).
* **Critical threshold** of a scan with ``L >= 1`` lesions and detection thresholds
  ``d_(1) <= ... <= d_(L)``: with ``k = floor(epsilon * L)`` allowed misses, ``c = d_(k+1)``, and
  ``c = +inf`` when ``k >= L`` (any threshold is fine). For every ``t``:
  ``#missed(t) = #{l : d_l < t} <= k  <=>  t <= d_(k+1)``, and
  ``#missed / L <= epsilon  <=>  #missed <= floor(epsilon L)`` (integers), so
  ``missed fraction(t) <= epsilon  <=>  t <= c``.
* **Joint** with ``voxel_epsilon = e_v``: the scan's score is ``min(c, c_v)``, ``c_v`` the CLS
  critical cutoff of its lesion voxels at ``e_v`` (:func:`ConformalSegLib.conformal.cls.critical_cutoffs`:
  all lesion voxels of the label, ignored small lesions included). Both hold at ``t`` iff
  ``t <= min(c, c_v)``: one score, so the argument below holds as it is -- no union bound.
* **Conformal threshold**: ``c_hat`` = the ``k_a``-th largest of the ``n`` calibration scores,
  ``k_a = ceil((1 - alpha)(n + 1))``; ``-inf`` (the whole image) when ``k_a > n`` (``n`` too small
  for alpha, with a :class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning`).
  Proof: the event holds iff ``c_hat <= c_test``; by exchangeability of the ``n + 1`` scores this
  has probability ``>= k_a / (n + 1) >= 1 - alpha`` (ties only help).
* **Scans without a (counted) lesion** are excluded from calibration, as in CLS: the guarantee is for
  scans that have at least one lesion of the counted size.
* Stored detection thresholds are float32, rounded towards ``-inf`` from float64 maps (never above the
  exact value: thresholds can only get lower and masks larger; float32 maps are stored exactly).

Recalibration: :class:`LesionLevelSummaries` keeps every scan's sorted detection thresholds (and the
sizes of its lesions), so any new ``epsilon`` and ``alpha`` (and, with the voxel summaries, any
``voxel_epsilon``) is recalibrated without the volumes in ``O(n)``; ``tau`` and the size filter are
fixed at calibration (they change the thresholds themselves).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import (
    ThresholdCalibration,
    conformal_lower_cutoff,
    critical_cutoffs,
    too_small_message,
    warn_if_whole_image_from_ties,
)
from .exact import (
    allowed_misses_array,
    as_fraction,
    calibration_rank,
    check_alpha,
    check_detect_fraction,
    detection_counts,
    needed_calibration_size,
)
from .summaries import LesionSummaries, check_probabilities, round_down_float32

METHOD = "lesion"
DEFAULT_DETECT_FRACTION = 0.5
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def check_min_size(min_lesion_voxels: int = 0, min_lesion_mm3: float = 0.0) -> tuple[int, float]:
    """Validate the size filter: an integer ``>= 0`` and a finite number ``>= 0``."""
    if isinstance(min_lesion_voxels, bool) or int(min_lesion_voxels) != min_lesion_voxels or min_lesion_voxels < 0:
        raise ConformalSegError(
            f"the minimum lesion size in voxels must be an integer >= 0, got {min_lesion_voxels!r}",
            fix="e.g. --min-lesion-voxels 10",
        )
    mm3 = float(min_lesion_mm3)
    if not math.isfinite(mm3) or mm3 < 0:
        raise ConformalSegError(
            f"the minimum lesion volume must be a number >= 0 mm^3, got {min_lesion_mm3!r}",
            fix="e.g. --min-lesion-mm3 30",
        )
    return int(min_lesion_voxels), mm3


def lesion_labels(lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean lesion mask: ``(int32 labels, count)``."""
    labels, count = ndimage.label(np.asarray(lesion, dtype=bool), structure=STRUCTURE_26)
    return labels.astype(np.int32, copy=False), int(count)


def counted_sizes(
    sizes: np.ndarray, voxel_mm3: float, min_lesion_voxels: int = 0, min_lesion_mm3: float = 0.0
) -> np.ndarray:
    """Boolean: which lesions of ``sizes`` (voxels) are counted under the size filter."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return (sizes >= int(min_lesion_voxels)) & (sizes * float(voxel_mm3) >= float(min_lesion_mm3))


def detection_thresholds(
    probability: np.ndarray,
    lesion: np.ndarray,
    *,
    detect_fraction: float = DEFAULT_DETECT_FRACTION,
    voxel_mm3: float = 1.0,
    min_lesion_voxels: int = 0,
    min_lesion_mm3: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(d, sizes)``: detection threshold and size of every counted lesion, sorted by ``d`` ascending
    (ties by size). ``d`` keeps the map's dtype. O(V + V_lesion log V_lesion): one sort of the lesion
    voxels grouped by lesion."""
    check_detect_fraction(detect_fraction)
    check_min_size(min_lesion_voxels, min_lesion_mm3)
    probability = np.asarray(probability)
    if probability.shape != np.shape(lesion):
        raise ValueError(f"probability shape {probability.shape} != lesion shape {np.shape(lesion)}")
    labels, count = lesion_labels(lesion)
    if count == 0:
        return probability.ravel()[:0].copy(), np.zeros(0, dtype=np.int64)
    inside = labels > 0
    ids = labels[inside]
    values = probability[inside]
    order = np.lexsort((-values.astype(np.float64), ids))  # by lesion, then descending probability
    ids, values = ids[order], values[order]
    sizes = np.bincount(ids, minlength=count + 1)[1:].astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    need = detection_counts(sizes, detect_fraction)  # ceil(tau * m) >= 1
    d = values[starts + need - 1]
    keep = counted_sizes(sizes, voxel_mm3, min_lesion_voxels, min_lesion_mm3)
    d, sizes = d[keep], sizes[keep]
    order = np.lexsort((sizes, d.astype(np.float64)))
    return d[order], sizes[order]


def scan_critical(d_ascending: np.ndarray, epsilon: float) -> float:
    """Critical threshold of one scan from its ascending detection thresholds (``+inf`` when
    ``floor(epsilon L) >= L``; see the module docstring). A scan without lesions gives ``+inf``."""
    d = np.asarray(d_ascending)
    k = int(allowed_misses_array(np.array([d.size]), epsilon)[0])
    return float("inf") if k >= d.size else float(d[k])


@dataclass(frozen=True)
class LesionLevelSummaries:
    """Per-scan ascending detection thresholds (CSR: ``values[offsets[i]:offsets[i+1]]``, float32) and
    the sizes of those lesions (same order), with the detection fraction and size filter they used."""

    values: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    case_ids: tuple[str, ...]
    detect_fraction: float = DEFAULT_DETECT_FRACTION
    min_lesion_voxels: int = 0
    min_lesion_mm3: float = 0.0

    def __post_init__(self) -> None:
        if (
            len(self.offsets) != len(self.case_ids) + 1
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.values)
            or len(self.sizes) != len(self.values)
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise ValueError("inconsistent lesion-level summary offsets")
        if self.values.dtype != np.float32:
            raise ValueError(f"lesion-level summary values must be float32, got {self.values.dtype}")

    @property
    def n(self) -> int:
        return len(self.case_ids)

    @property
    def lesion_counts(self) -> np.ndarray:
        """``L_i``: counted lesions per scan (int64)."""
        return np.diff(self.offsets)

    def case(self, i: int) -> np.ndarray:
        """Ascending detection thresholds of scan ``i`` (float64)."""
        return self.values[self.offsets[i] : self.offsets[i + 1]].astype(np.float64)

    def critical_cutoffs(self, epsilon: float) -> np.ndarray:
        """``c_i`` of every scan, vectorised (``+inf`` where ``floor(epsilon L_i) >= L_i``, including ``L_i = 0``)."""
        counts = self.lesion_counts
        k = allowed_misses_array(counts, epsilon)
        out = np.full(self.n, np.inf)
        binding = k < counts
        out[binding] = self.values[self.offsets[:-1][binding] + k[binding]].astype(np.float64)
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> LesionLevelSummaries:
        idx = np.asarray(indices, dtype=np.int64)
        counts = self.lesion_counts[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        take = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
            if idx.size
            else np.zeros(0, dtype=np.int64)
        )
        return LesionLevelSummaries(
            self.values[take],
            self.sizes[take],
            offsets,
            tuple(self.case_ids[i] for i in idx),
            self.detect_fraction,
            self.min_lesion_voxels,
            self.min_lesion_mm3,
        )

    def to_arrays(self, prefix: str = "lesionlevel_") -> dict[str, np.ndarray]:
        """Arrays for a profile's ``.npz`` (see :meth:`from_arrays`)."""
        return {f"{prefix}values": self.values, f"{prefix}sizes": self.sizes, f"{prefix}offsets": self.offsets}

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        case_ids: Sequence[str],
        *,
        detect_fraction: float,
        min_lesion_voxels: int,
        min_lesion_mm3: float,
        prefix: str = "lesionlevel_",
    ) -> LesionLevelSummaries:
        return cls(
            np.asarray(arrays[f"{prefix}values"]),
            np.asarray(arrays[f"{prefix}sizes"], dtype=np.int64),
            np.asarray(arrays[f"{prefix}offsets"], dtype=np.int64),
            tuple(case_ids),
            float(detect_fraction),
            int(min_lesion_voxels),
            float(min_lesion_mm3),
        )


class LesionLevelBuilder:
    """Accumulates :class:`LesionLevelSummaries` while scans are streamed (one scan in memory at a time)."""

    def __init__(
        self, detect_fraction: float = DEFAULT_DETECT_FRACTION, min_lesion_voxels: int = 0, min_lesion_mm3: float = 0.0
    ):
        check_detect_fraction(detect_fraction)
        self.min_lesion_voxels, self.min_lesion_mm3 = check_min_size(min_lesion_voxels, min_lesion_mm3)
        self.detect_fraction = float(detect_fraction)
        self._values: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._ids: list[str] = []

    def add_case(self, case_id: str, probability: np.ndarray, lesion: np.ndarray, voxel_mm3: float = 1.0) -> None:
        check_probabilities(np.asarray(probability)[np.asarray(lesion, dtype=bool)], str(case_id))
        d, sizes = detection_thresholds(
            probability,
            lesion,
            detect_fraction=self.detect_fraction,
            voxel_mm3=voxel_mm3,
            min_lesion_voxels=self.min_lesion_voxels,
            min_lesion_mm3=self.min_lesion_mm3,
        )
        d = np.asarray(d)
        self._values.append(round_down_float32(d if d.dtype.kind == "f" else d.astype(np.float64)))
        self._sizes.append(sizes)
        self._ids.append(str(case_id))

    def build(self) -> LesionLevelSummaries:
        offsets = np.zeros(len(self._values) + 1, dtype=np.int64)
        np.cumsum([v.size for v in self._values], out=offsets[1:])
        values = (
            np.concatenate(self._values).astype(np.float32, copy=False) if self._values else np.zeros(0, np.float32)
        )
        sizes = np.concatenate(self._sizes).astype(np.int64, copy=False) if self._sizes else np.zeros(0, np.int64)
        return LesionLevelSummaries(
            values, sizes, offsets, tuple(self._ids), self.detect_fraction, self.min_lesion_voxels, self.min_lesion_mm3
        )


@dataclass(frozen=True)
class LesionLevelCalibration(ThresholdCalibration):
    """Result of lesion-level calibration: the mask is ``prob >= probability_threshold``.

    ``n`` counts the scans with at least one counted lesion; ``n_excluded_empty`` the others.
    ``voxel_epsilon`` is None for the lesion guarantee alone, the voxel FNR tolerance when joint.
    """

    detect_fraction: float = DEFAULT_DETECT_FRACTION
    voxel_epsilon: float | None = None
    min_lesion_voxels: int = 0
    min_lesion_mm3: float = 0.0

    @property
    def is_joint(self) -> bool:
        return self.voxel_epsilon is not None


def scan_scores(
    summaries: LesionLevelSummaries,
    epsilon: float,
    *,
    voxel_epsilon: float | None = None,
    voxel_summaries: LesionSummaries | None = None,
) -> np.ndarray:
    """Per-scan score: the lesion critical threshold, or ``min(lesion, voxel)`` critical when joint."""
    scores = summaries.critical_cutoffs(epsilon)
    if voxel_epsilon is None:
        return scores
    if voxel_summaries is None:
        raise ConformalSegError("the joint lesion + voxel guarantee needs the voxel summaries of the same scans")
    if tuple(voxel_summaries.case_ids) != tuple(summaries.case_ids):
        raise ConformalSegError("the voxel and lesion-level summaries are not of the same scans in the same order")
    joint: np.ndarray = np.minimum(scores, critical_cutoffs(voxel_summaries, voxel_epsilon))
    return joint


def calibrate_lesion(
    summaries: LesionLevelSummaries,
    epsilon: float,
    alpha: float,
    *,
    voxel_epsilon: float | None = None,
    voxel_summaries: LesionSummaries | None = None,
    warn: bool = True,
    pac_delta: float | None = None,
) -> LesionLevelCalibration:
    """Lesion-level (or joint lesion + voxel) calibration from summaries: exact, O(n) (see the module docstring).

    With ``pac_delta``: calibration-conditional, as for CLS (the PAC rank of
    :func:`~ConformalSegLib.conformal.exact.pac_rank`).
    """
    check_alpha(alpha)
    if pac_delta is not None:
        check_alpha(pac_delta, "pac_delta")
    if not 0 <= as_fraction(epsilon) <= 1:
        raise ConformalSegError(f"epsilon must lie in [0, 1], got {epsilon}", fix="pass e.g. --epsilon 0.25")
    used = summaries.lesion_counts > 0
    n = int(np.count_nonzero(used))
    if n == 0:
        size = ""
        if summaries.min_lesion_voxels or summaries.min_lesion_mm3:
            size = f" of at least {summaries.min_lesion_voxels} voxels and {summaries.min_lesion_mm3:g} mm^3"
        raise ConformalSegError(
            f"no calibration scan has a lesion{size}: lesion-level calibration needs scans with lesions",
            fix="check the lesion label value(s) (--lesion-label) and the size filter",
        )
    scores = scan_scores(summaries, epsilon, voxel_epsilon=voxel_epsilon, voxel_summaries=voxel_summaries)
    cutoff = conformal_lower_cutoff(scores[used], alpha, pac_delta)
    if warn:
        warn_if_whole_image_from_ties("lesion-level", cutoff)
    if warn and cutoff == float("-inf"):
        levels = f"alpha={alpha}" if pac_delta is None else f"alpha={alpha} with PAC delta={pac_delta}"
        warnings.warn(
            too_small_message("lesion-level", n, needed_calibration_size(alpha, pac_delta), levels),
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    return LesionLevelCalibration(
        method=METHOD,
        epsilon=float(epsilon),
        alpha=float(alpha),
        n=n,
        n_excluded_empty=summaries.n - n,
        probability_threshold=cutoff,
        rank=calibration_rank(n, alpha, pac_delta),
        pac_delta=None if pac_delta is None else float(pac_delta),
        detect_fraction=summaries.detect_fraction,
        voxel_epsilon=None if voxel_epsilon is None else float(voxel_epsilon),
        min_lesion_voxels=summaries.min_lesion_voxels,
        min_lesion_mm3=summaries.min_lesion_mm3,
    )


def missed_lesions(d_ascending: np.ndarray, cutoffs: np.ndarray | Sequence[float]) -> np.ndarray:
    """Exact number of a scan's lesions missed by ``prob >= cutoff`` for each cutoff: ``#{d < cutoff}``."""
    d = np.asarray(d_ascending, dtype=np.float64)
    return np.searchsorted(d, np.asarray(cutoffs, dtype=np.float64), side="left").astype(np.int64)


def build_lesion_level(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, float]],
    *,
    detect_fraction: float = DEFAULT_DETECT_FRACTION,
    min_lesion_voxels: int = 0,
    min_lesion_mm3: float = 0.0,
) -> LesionLevelSummaries:
    """Summaries from ``(case_id, probability, lesion mask, voxel volume mm^3)`` tuples."""
    builder = LesionLevelBuilder(detect_fraction, min_lesion_voxels, min_lesion_mm3)
    for case_id, probability, lesion, voxel_mm3 in cases:
        builder.add_case(case_id, probability, lesion, voxel_mm3)
    return builder.build()
