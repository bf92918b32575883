"""The lesion-level part of the random-split protocol: lesion-level control, slider-safe bands, and
lesion-wise metrics of every method, on the same splits as :mod:`.protocol`.

Methods added to each split (calibration side -> test side)
----------------------------------------------------------
* **lesion** (:mod:`ConformalSegLib.conformal.lesion_level`): the conformal cutoff of the calibration
  scans' lesion-level scores (joint with the voxel FNR when ``voxel_epsilon`` is set), per epsilon and
  alpha. Its population is the scans with at least one lesion.
* **slider-safe bands** (:mod:`ConformalSegLib.conformal.simultaneous`) of CLS and of the lesion-level
  method: per alpha, one band over the whole epsilon grid (sorted), so a test scan *passes* when it keeps
  the promise at every epsilon of the grid at once (``simultaneous_ecr``). Next to it, the per-epsilon
  methods' ``posthoc_ecr``: the fraction of test scans that keep the promise at every epsilon with the
  fixed-epsilon thresholds -- what a user who picks epsilon after looking gets.

Metrics (per split: the mean over that split's test scans; exact, from the summaries)
------------------------------------------------------------------------------------
For every method (baseline 0.5, CLS, CRC, lesion-level) at every epsilon (and alpha): ``lesion_ecr`` =
fraction of test scans with ``missed lesions <= floor(epsilon L)``, ``missed_rate`` = mean of
``missed / L`` (scans with a lesion; a lesion is missed by ``prob >= c`` iff its detection threshold is
below ``c``). At the main setting only: lesion-wise sensitivity per size class (pooled lesions of the
test scans, :data:`~ConformalSegLib.evaluation.lesion_metrics.SIZE_CLASSES`), and -- from the volumes in
pass 2 -- false-positive components and mL per scan (:func:`~.lesion_metrics.false_positives`: one
labelling of the mask per distinct cutoff).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..conformal.cls import conformal_lower_cutoff
from ..conformal.exact import allowed_misses_array, conformal_rank
from ..conformal.lesion_level import LesionLevelBuilder, LesionLevelSummaries, missed_lesions, scan_scores
from ..conformal.simultaneous import band_scores
from ..conformal.summaries import LesionSummaries
from .lesion_metrics import SIZE_CLASSES, equivalent_radius_mm, false_positives, size_class

#: The methods whose lesion-wise metrics are reported.
LESIONWISE_METHODS = ("baseline", "cls", "crc", "lesion")


@dataclass
class LesionStatistics:
    """Pass-1 extras: every scan's detection thresholds and lesion sizes, and its voxel volume."""

    summaries: LesionLevelSummaries
    voxel_mm3: np.ndarray  # (n,)

    @property
    def population(self) -> np.ndarray:
        """Scans with at least one lesion (the lesion-level method's population)."""
        return self.summaries.lesion_counts > 0

    def size_classes(self, i: int) -> list[str]:
        """The size class of each lesion of scan ``i`` (in the summaries' order)."""
        sizes = self.summaries.sizes[self.summaries.offsets[i] : self.summaries.offsets[i + 1]]
        return [size_class(float(r)) for r in equivalent_radius_mm(sizes, float(self.voxel_mm3[i]))]


class LesionStatisticsBuilder:
    """Builds :class:`LesionStatistics` while pass 1 streams the cases."""

    def __init__(self, detect_fraction: float):
        self._builder = LesionLevelBuilder(detect_fraction)
        self._voxel_mm3: list[float] = []

    def add_case(self, case_id: str, probability: np.ndarray, lesion: np.ndarray, voxel_mm3: float) -> None:
        self._builder.add_case(case_id, probability, lesion, voxel_mm3)
        self._voxel_mm3.append(float(voxel_mm3))

    def build(self) -> LesionStatistics:
        return LesionStatistics(self._builder.build(), np.asarray(self._voxel_mm3, dtype=np.float64))


@dataclass
class LesionSplit:
    """Per split: lesion-level cutoffs, slider-safe band cutoffs and the lesion population's test scans."""

    lesion_cut: np.ndarray  # (S, E, A)
    lesion_ncal: np.ndarray  # (S,)
    band_cut: dict[str, np.ndarray]  # "cls" / "lesion" -> (S, E, A), epsilons in the config's order
    band_level: dict[str, np.ndarray]  # (S, A): the common rank k_hat (n + 1 or more: trivial)
    test_lpop: np.ndarray  # (S, n)


def lesion_split_thresholds(
    lstats: LesionStatistics,
    voxel: LesionSummaries,
    critical: np.ndarray,
    cls_population: np.ndarray,
    test_mask: np.ndarray,
    epsilons: tuple[float, ...],
    alphas: tuple[float, ...],
    voxel_epsilon: float | None,
) -> LesionSplit:
    """Calibrate lesion-level control and both slider-safe bands on the calibration side of every split."""
    S, E, A = test_mask.shape[0], len(epsilons), len(alphas)
    lpop = lstats.population
    lesion_crit = np.stack(
        [scan_scores(lstats.summaries, e, voxel_epsilon=voxel_epsilon, voxel_summaries=voxel) for e in epsilons]
    )  # (E, n)
    out = LesionSplit(
        np.empty((S, E, A)),
        np.zeros(S, dtype=np.int64),
        {"cls": np.empty((S, E, A)), "lesion": np.empty((S, E, A))},
        {"cls": np.zeros((S, A), dtype=np.int64), "lesion": np.zeros((S, A), dtype=np.int64)},
        test_mask & lpop[None, :],
    )
    order = np.argsort(np.asarray(epsilons, dtype=np.float64), kind="stable")
    for s in range(S):
        cal = np.flatnonzero(~test_mask[s])
        cal_l = cal[lpop[cal]]
        out.lesion_ncal[s] = cal_l.size
        for e in range(E):
            for a, alpha in enumerate(alphas):
                out.lesion_cut[s, e, a] = conformal_lower_cutoff(lesion_crit[e, cal_l], alpha)
        for name, matrix, used in (("cls", critical, cal[cls_population[cal]]), ("lesion", lesion_crit, cal_l)):
            for a, alpha in enumerate(alphas):
                level, cuts = _band(matrix[order][:, used].T, alpha)
                out.band_level[name][s, a] = level
                out.band_cut[name][s, order, a] = cuts
    return out


def _band(criticals: np.ndarray, alpha: float) -> tuple[int, np.ndarray]:
    """The slider-safe band of an ``(n, E)`` matrix (as :func:`~ConformalSegLib.conformal.simultaneous.
    simultaneous_band`, without its warning): ``(k_hat, cutoffs (E,))``."""
    n, E = criticals.shape
    q = conformal_rank(n, alpha)
    if n == 0 or q > n:
        return n + 1, np.full(E, -np.inf)
    level = int(np.partition(band_scores(criticals), q - 1)[q - 1]) + 1
    if level > n:
        return level, np.full(E, -np.inf)
    return level, np.partition(criticals, n - level, axis=0)[n - level]


@dataclass
class LesionwiseSums:
    """Per split, sums over test scans (lesion population) of the lesion-wise metrics of every method."""

    lesion_ecr: dict[str, np.ndarray]  # method -> (S, E[, A])
    missed_rate: dict[str, np.ndarray]  # method -> (S, E[, A])
    detected: dict[str, dict[str, np.ndarray]]  # method -> size class -> (S,) at the main setting
    lesions: dict[str, np.ndarray]  # size class -> (S,)
    simultaneous: dict[str, np.ndarray] = field(default_factory=dict)  # band / posthoc -> (S, A)


def allowed_per_epsilon(count: int, epsilons: tuple[float, ...]) -> np.ndarray:
    """``floor(epsilon * count)`` for every epsilon (exact), ``(E,)``."""
    return np.array([int(allowed_misses_array(np.array([count]), e)[0]) for e in epsilons], dtype=np.int64)


def _missed_at(d: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    return missed_lesions(d, cuts.ravel()).reshape(cuts.shape)


def lesionwise_sums(
    lstats: LesionStatistics,
    split_cuts: dict[str, np.ndarray],
    lsplit: LesionSplit,
    epsilons: tuple[float, ...],
    main: tuple[int, int],
) -> LesionwiseSums:
    """Lesion-wise metrics of every method (``split_cuts``: method -> cutoffs (S, E, A) / (S, E) / scalar)."""
    S = lsplit.test_lpop.shape[0]
    E = len(epsilons)
    shapes = {m: np.shape(c) for m, c in split_cuts.items()}
    sums = LesionwiseSums(
        {m: np.zeros(shapes[m] if shapes[m] else (S, E)) for m in split_cuts},
        {m: np.zeros(shapes[m] if shapes[m] else (S, E)) for m in split_cuts},
        {m: {name: np.zeros(S) for name, _, _ in SIZE_CLASSES} for m in split_cuts},
        {name: np.zeros(S) for name, _, _ in SIZE_CLASSES},
        {
            k: np.zeros(lsplit.band_level["cls"].shape)
            for k in ("cls_band", "lesion_band", "cls_posthoc", "lesion_posthoc")
        },
    )
    summaries = lstats.summaries
    for i in range(summaries.n):
        s_idx = np.flatnonzero(lsplit.test_lpop[:, i])
        if not s_idx.size:
            continue
        d = summaries.values[summaries.offsets[i] : summaries.offsets[i + 1]]
        L = d.size
        allowed = allowed_per_epsilon(L, epsilons)
        classes = lstats.size_classes(i)
        for name, _, _ in SIZE_CLASSES:
            sums.lesions[name][s_idx] += classes.count(name)
        for method, cuts in split_cuts.items():
            _add_method(sums, method, cuts, d, L, allowed, classes, s_idx, main)
        _add_simultaneous(sums, lsplit, split_cuts, d, L, allowed, s_idx)
    return sums


def _add_method(
    sums: LesionwiseSums,
    method: str,
    cuts: np.ndarray,
    d: np.ndarray,
    L: int,
    allowed: np.ndarray,
    classes: list[str],
    s_idx: np.ndarray,
    main: tuple[int, int],
) -> None:
    """One scan's lesion ECR, missed rate and (main setting) detected lesions per class for one method."""
    if np.ndim(cuts) == 0:  # the baseline: one cutoff for every split and epsilon
        missed = np.full((s_idx.size, len(allowed)), int(missed_lesions(d, [float(cuts)])[0]))
        main_cut = np.full(s_idx.size, float(cuts))
    else:
        missed = _missed_at(d, np.asarray(cuts)[s_idx])  # (S_i, E[, A])
        main_cut = (
            np.asarray(cuts)[s_idx][:, main[0], main[1]] if np.ndim(cuts) == 3 else np.asarray(cuts)[s_idx][:, main[0]]
        )
    bound = allowed.reshape((1, -1) + (1,) * (missed.ndim - 2))
    sums.lesion_ecr[method][s_idx] += missed <= bound
    sums.missed_rate[method][s_idx] += missed / L
    hit = d[None, :] >= main_cut[:, None]  # (S_i, L): lesion detected at the main setting's cutoff
    for name, _, _ in SIZE_CLASSES:
        members = np.array([c == name for c in classes])
        if members.any():
            sums.detected[method][name][s_idx] += hit[:, members].sum(axis=1)


def _add_simultaneous(
    sums: LesionwiseSums,
    lsplit: LesionSplit,
    split_cuts: dict[str, np.ndarray],
    d: np.ndarray,
    L: int,
    allowed: np.ndarray,
    s_idx: np.ndarray,
) -> None:
    """Whether the scan keeps the lesion-level promise at every epsilon: slider-safe band vs fixed epsilons."""
    band_missed = _missed_at(d, lsplit.band_cut["lesion"][s_idx])  # (S_i, E, A)
    sums.simultaneous["lesion_band"][s_idx] += np.all(band_missed <= allowed[None, :, None], axis=1)
    fixed_missed = _missed_at(d, np.asarray(split_cuts["lesion"])[s_idx])
    sums.simultaneous["lesion_posthoc"][s_idx] += np.all(fixed_missed <= allowed[None, :, None], axis=1)


def voxel_simultaneous(
    run: np.ndarray,
    m: int,
    band_cuts: np.ndarray,
    fixed_cuts: np.ndarray,
    epsilons: tuple[float, ...],
    hits: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """For one scan (descending lesion values ``run`` of ``m`` voxels): whether the CLS promise holds at every
    epsilon with the band cutoffs and with the fixed-epsilon cutoffs, ``(S_i, A)`` each."""
    allowed = allowed_per_epsilon(m, epsilons)[None, :, None]
    band_ok = np.all(m - hits(run, band_cuts) <= allowed, axis=1)
    fixed_ok = np.all(m - hits(run, fixed_cuts) <= allowed, axis=1)
    return band_ok, fixed_ok


def false_positives_at(
    probability: np.ndarray, lesion: np.ndarray, cutoffs: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """False-positive components and mL of ``prob >= c`` for each cutoff (one labelling per distinct cutoff)."""
    from ..conformal.cls import apply_threshold

    cutoffs = np.asarray(cutoffs, dtype=np.float64)
    distinct, inverse = np.unique(cutoffs, return_inverse=True)
    comps = np.empty(distinct.size)
    ml = np.empty(distinct.size)
    truth = np.asarray(lesion, dtype=bool)
    for k, c in enumerate(distinct):
        comps[k], ml[k] = false_positives(apply_threshold(probability, float(c)), truth, spacing_zyx)
    return comps[inverse].reshape(cutoffs.shape), ml[inverse].reshape(cutoffs.shape)
