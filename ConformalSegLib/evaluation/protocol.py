"""The papers' evaluation protocol, computed exactly and streaming (two passes over the cases).

Protocol (CLS paper, Tan et al.; also used for the confidence sets of Davenport)
-------------------------------------------------------------------------------
The cases are split ``splits`` times (default 100) at random into a calibration side of
``floor(cal_fraction * n)`` cases (default half; the fraction is read exactly as typed, see
:mod:`ConformalSegLib.conformal.exact`) and a test side (the rest), with ``numpy.random.default_rng(seed)``
(split ``s`` is the ``s``-th ``rng.permutation(n)``: its first ``n_cal`` entries calibrate). On each
split and for each ``epsilon`` / ``alpha`` of the grids:

* **CLS** (:mod:`ConformalSegLib.conformal.cls`): the cutoff is the conformal lower cutoff of the critical
  cutoffs of the calibration cases (critical cutoffs are computed once per epsilon for all cases);
  the test mask is ``prob >= cutoff``.
* **CRC** (expected-FNR control, :mod:`ConformalSegLib.conformal.crc`): ``crc_cutoff`` of the calibration
  summaries, per epsilon (no alpha).
* **Baseline**: the fixed cutoff 0.5 (``prob >= 0.5``); it does not depend on the split, but its
  per-split numbers are means over the same test cases as the other methods.
* **Confidence sets** (:mod:`ConformalSegLib.conformal.confidence_sets`) for each requested transform and mode:
  ``marginal`` calibrates inner and outer at ``alpha`` each, ``joint-split`` at ``alpha/2`` each
  (``joint-max`` is available too).

Populations and empty lesions. CLS, CRC and the baseline follow the empty-lesion policy of
:mod:`ConformalSegLib.conformal.cls`: with ``"exclude"`` (default) cases without lesion voxels are dropped from
the calibration *and* test sides of these three methods (the guarantee is conditional on a lesion),
with ``"include"`` they count everywhere (FNR 0). Confidence sets always use every case. So the
number of calibration / test cases of CLS/CRC varies a little between splits; it is recorded.

Metrics (per split: the mean over that split's test cases; then mean and std over splits)
-----------------------------------------------------------------------------------------
ECR (fraction of test cases with ``FNR <= epsilon``, exact integer rule), mean test FNR, PC
(predicted / total voxels), Dice (:mod:`ConformalSegLib.evaluation.metrics`), HD95 (mm, needs MONAI; at the
*main* setting only: ``main_epsilon`` (default: the first epsilon) and ``main_alpha``, and for the
baseline; cases with an empty prediction or lesion are left out of the mean and counted).
Sets: inner / outer / joint coverage (inner ok iff
``tau_test <= inner_threshold``; outer ok iff ``gamma_test <= -outer_threshold``; joint = both) and
mean sizes in voxels and mL. The inner *coverage* is that of ``I = {T > lambda_in}`` (the set of the
guarantee); the inner *size* is that of the displayed ``I & O`` (equal to ``|I|`` whenever
``lambda_in >= outer_threshold``, i.e. in every non-degenerate case). Standard deviations are
sample standard deviations over splits (``ddof=1``).

Exactness. Test FNRs come from the lesion summaries (number of stored lesion values ``>=`` the
cutoff: one ``searchsorted`` on each case's descending run); the summaries are float32 and every
cutoff is a float32 value or ``+-inf`` or 0.5, so this equals the count on the volume. Predicted
voxel counts are exact counts on the volume (:func:`ConformalSegLib.evaluation.metrics.count_at_least`,
``count_greater``), Dice uses ``TP = m - misses``.

Streaming. Pass 1 reads one case at a time and keeps only the summaries (sorted lesion
probabilities), per-case ``(tau, gamma)`` per transform and a few counts. The splits need no volume
(:mod:`.split_tasks` calibrates them in chunks, on the executor when one is given).
Pass 2 reads the cases again, one at a time, and counts each case's voxels at every distinct
cutoff / threshold it meets as a test case with one ``searchsorted`` pass. Peak memory is about
one probability map, its lesion mask and one transformed map, plus arrays of size
``splits x |epsilons| x |alphas|`` and ``splits x n``.

Too few cases. Each side of the split needs at least one case (else
:class:`~ConformalSegLib.common.errors.ConformalSegError`). Points whose calibration side is too small for
``alpha`` (the conformal quantile is infinite) are kept and reported as *trivial* (whole-image mask /
empty inner set, whole-image outer set), with a
:class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning` saying how many cases are needed.

This file is long because it is the protocol, to be read top to bottom: this docstring specifies it,
:func:`evaluate_dataset` calls one function per step (pass 1, the splits, test FNRs, pass 2, assembly),
and the steps hand each other small private containers. The parameters (:mod:`.config`), the cases
(:mod:`.cases`) and the results (:mod:`.results`) live in their own modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ..common.executors import ExecutorSpec, executor_session
from ..conformal.cls import apply_threshold, critical_cutoffs
from ..conformal.score_transforms import ScoreTransform
from ..conformal.threshold_scores import DEFAULT_SCORE
from .case_statistics import CaseStatistics, case_record, merge_records
from .case_tasks import Updates, map_cases
from .cases import CaseSource, EvalCase
from .config import DEFAULT_SET_MODES, EvaluationConfig, make_config, split_sizes
from .lesion_protocol import (
    LESIONWISE_METHODS,
    SIZE_CLASSES,
    LesionSplit,
    LesionwiseSums,
    false_positives_at,
    lesion_split_thresholds,
    lesionwise_sums,
    voxel_simultaneous,
)
from .metrics import count_at_least, count_greater, dice, fnr, fnr_within, lesion_hits, require_monai
from .metrics import hd95 as hd95_metric
from .progress import ProgressCallback
from .results import BASELINE_CUTOFF, EvaluationResult, trivial_warnings
from .split_tasks import calibrate_splits, draw_splits

__all__ = ["evaluate_dataset"]

#: Per-case sums of the confidence-set sizes: ``[transform][mode][key]`` (S, A).
SetArrays = dict[str, dict[str, dict[str, np.ndarray]]]


def evaluate_dataset(
    dataset_or_cases: Iterable[Any],
    *,
    epsilons: Sequence[float],
    alphas: Sequence[float],
    main_alpha: float | None = None,
    main_epsilon: float | None = None,
    splits: int = 100,
    cal_fraction: float = 0.5,
    seed: int = 0,
    transforms: Sequence[str | ScoreTransform] = ("identity",),
    set_modes: Sequence[str] = DEFAULT_SET_MODES,
    hd95: bool = True,
    empty: str = "exclude",
    progress: ProgressCallback | None = None,
    detect_fraction: float = 0.5,
    voxel_epsilon: float | None = None,
    lesionwise: bool = True,
    executor: ExecutorSpec | None = None,
    keep_going: bool = False,
    score: str = DEFAULT_SCORE,
) -> EvaluationResult:
    """Run the random-split protocol (module docstring) on a dataset, exactly, in two streaming passes.

    ``dataset_or_cases``: a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` or a re-iterable
    (e.g. a list) of objects with ``case_id``, ``probability`` and ``lesion`` arrays and ``geometry``.
    The *main setting* (HD95, the FNR distribution) is (``main_epsilon``, ``main_alpha``); each
    defaults to the first value of its grid and must be one of the grid's values. ``transforms``
    (names such as ``"distance"`` or :class:`ScoreTransform`) may be empty: no confidence sets.
    ``progress(done, total, stage)`` is called per case in each pass and per split, with ``stage``
    one of :data:`~ConformalSegLib.evaluation.progress.STAGES`. ``detect_fraction`` and ``voxel_epsilon``
    configure the lesion-level method (:mod:`.lesion_protocol`); ``lesionwise`` adds false-positive
    components and mL at the main setting (one labelling per distinct cutoff of each test case).

    ``executor`` runs each pass's per-case work as one task per case (a dataset only; :mod:`.case_tasks`):
    the result is bit-identical to serial. ``keep_going`` (a dataset only) leaves out the cases that cannot be
    read or fail their checks in pass 1, naming them all in one warning.

    ``score`` (:mod:`~ConformalSegLib.conformal.threshold_scores`): each case's probability map is replaced by
    that score before anything is computed (the fixed baseline, CLS, expected-FNR, lesion-level methods and the
    confidence sets all see the score), as ``calibrate --score`` and ``apply`` do for the threshold methods.
    """
    config, score_transforms = make_config(
        epsilons, alphas, main_alpha, main_epsilon, splits, cal_fraction, seed, transforms, set_modes, hd95, empty,
        detect_fraction, voxel_epsilon, lesionwise, score,
    )  # fmt: skip
    if hd95:
        require_monai()  # fail before the first pass, not after it
    source = CaseSource(dataset_or_cases, config.score)
    with executor_session(executor or ExecutorSpec()) as spec:  # one LocalCluster for both passes
        return _evaluate(source, config, score_transforms, _Run(spec, keep_going, progress))


def _evaluate(
    source: CaseSource, config: EvaluationConfig, score_transforms: list[ScoreTransform], run: _Run
) -> EvaluationResult:
    """The steps of :func:`evaluate_dataset`, in order."""
    stats = _pass1_statistics(source, config, score_transforms, run)
    n_cal, n_test = split_sizes(stats.n, config.cal_fraction)
    stats.check_population(config.empty)
    split = _split_thresholds(stats, config, n_cal, run)
    lsplit = lesion_split_thresholds(
        stats.lesions, stats.summaries, split.critical, stats.population, split.test_mask, config.epsilons,
        config.alphas, config.voxel_epsilon,
    )  # fmt: skip
    fnrs = _test_fnrs(stats, split, config)
    extra = _extra_voxel_sums(stats, split, lsplit, config)
    lesionwise_metrics = lesionwise_sums(
        stats.lesions, _method_cuts(split, lsplit), lsplit, config.epsilons,
        (config.main_epsilon_index, config.main_alpha_index),
    )  # fmt: skip
    sizes = _pass2_sizes(source, stats, split, lsplit, config, score_transforms, run)
    result = _assemble(config, stats, split, fnrs, sizes, n_cal, n_test)
    _assemble_lesion(result, stats, split, lsplit, extra, lesionwise_metrics, sizes)
    result.warnings.extend(trivial_warnings(result))
    for message in result.warnings:
        warnings.warn(message, CalibrationSetTooSmallWarning, stacklevel=3)  # the caller of evaluate_dataset
    return result


@dataclass
class _Run:
    """Where the per-case work runs, and which cases pass 1 kept (pass 2 reads the same ones)."""

    spec: ExecutorSpec
    keep_going: bool
    progress: ProgressCallback | None
    case_ids: list[str] | None = None
    workers: int = 1


def _report(progress: ProgressCallback | None, done: int, total: int | None, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)


# ----------------------------------------------------------------------------- pass 1: case statistics


def _pass1_statistics(
    source: CaseSource,
    config: EvaluationConfig,
    score_transforms: list[ScoreTransform],
    run: _Run,
) -> CaseStatistics:
    """Read every case once (one task per case); merge the records in case order (:mod:`.case_statistics`)."""
    mapped = map_cases(
        case_record, (config, score_transforms), source, run.spec, keep_going=run.keep_going, progress=run.progress
    )
    run.case_ids, run.workers = mapped.case_ids, mapped.workers
    if mapped.left_out:
        listed = "; ".join(f"{cid}: {error}" for cid, error in mapped.left_out)
        warnings.warn(
            f"--keep-going: left out {len(mapped.left_out)} unreadable case(s): {listed}", UserWarning, stacklevel=4
        )
    if hasattr(source.data, "check_lesion_labels_seen"):
        source.data.check_lesion_labels_seen()
    return merge_records(mapped.results, config, [t.name for t in score_transforms])


# ----------------------------------------------------------------------------- the splits (no volumes)


@dataclass
class _SplitThresholds:
    """Per split: which cases are tested, the calibrated cutoffs / thresholds and the set coverages."""

    test_mask: np.ndarray  # (S, n) bool
    cls_cut: np.ndarray  # (S, E, A)
    crc_cut: np.ndarray  # (S, E)
    cls_ncal: np.ndarray  # (S,) calibration cases of the population
    sets: SetArrays  # thresholds and coverages, (S, A)
    test_pop: np.ndarray  # (S, n) test cases of the population
    n_test_pop: np.ndarray  # (S,)
    inv_pop: np.ndarray  # (S,) 1 / n_test_pop, NaN without test cases
    critical: np.ndarray  # (E, n) CLS critical cutoffs of every case


def _split_thresholds(stats: CaseStatistics, config: EvaluationConfig, n_cal: int, run: _Run) -> _SplitThresholds:
    """Draw the splits and calibrate every method on each calibration side (:mod:`.split_tasks`: chunks of splits
    as tasks on the run's executor, bit-identical to serial)."""
    S, E, A, n = config.splits, len(config.epsilons), len(config.alphas), stats.n
    critical = np.stack([critical_cutoffs(stats.summaries, eps) for eps in config.epsilons])  # (E, n)
    shared = (stats.summaries, critical, stats.population, stats.set_stats, config, n_cal)
    progress = None if run.progress is None else (lambda done, total: _report(run.progress, done, total, "splits"))
    calibrated = calibrate_splits(shared, draw_splits(config.seed, S, n), run.spec, progress)
    test_mask = np.zeros((S, n), dtype=bool)
    cls_cut = np.empty((S, E, A))
    crc_cut = np.empty((S, E))
    cls_ncal = np.zeros(S, dtype=np.int64)
    set_thr: SetArrays = {name: {mode: {} for mode in config.set_modes} for name in stats.set_stats}
    for s, split in enumerate(calibrated):
        test_mask[s, split.test] = True
        cls_cut[s], crc_cut[s], cls_ncal[s] = split.cls_cut, split.crc_cut, split.cls_ncal
    for name in stats.set_stats:
        for mode in config.set_modes:
            for key in calibrated[0].sets[name][mode]:
                set_thr[name][mode][key] = np.stack([split.sets[name][mode][key] for split in calibrated])
    test_pop = test_mask & stats.population[None, :]
    n_test_pop = test_pop.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_pop = np.where(n_test_pop > 0, 1.0 / np.maximum(n_test_pop, 1), np.nan)
    return _SplitThresholds(test_mask, cls_cut, crc_cut, cls_ncal, set_thr, test_pop, n_test_pop, inv_pop, critical)


# ----------------------------------------------------------------------------- test FNRs from the summaries


@dataclass
class _TestFnrs:
    """Sums over each split's test population of the FNR and of ``FNR <= epsilon``, exactly."""

    cls_fnr_sum: np.ndarray  # (S, E, A)
    cls_ok_sum: np.ndarray  # (S, E, A)
    crc_fnr_sum: np.ndarray  # (S, E)
    crc_ok_sum: np.ndarray  # (S, E)
    cls_main_fnr: np.ndarray  # (S, n), NaN where the case is not a test case of the population
    base_hits: np.ndarray  # (n,) lesion voxels of the 0.5 mask


def _test_fnrs(stats: CaseStatistics, split: _SplitThresholds, config: EvaluationConfig) -> _TestFnrs:
    """Test FNRs of every split, counted on the summaries (one ``searchsorted`` per case)."""
    S, E, A, n = config.splits, len(config.epsilons), len(config.alphas), stats.n
    e_main, a_main = config.main_epsilon_index, config.main_alpha_index
    out = _TestFnrs(
        np.zeros((S, E, A)),
        np.zeros((S, E, A)),
        np.zeros((S, E)),
        np.zeros((S, E)),
        np.full((S, n), np.nan),
        np.zeros(n, dtype=np.int64),
    )
    summaries, offsets, sizes = stats.summaries, stats.summaries.offsets, stats.sizes
    for i in range(n):
        run = summaries.values[offsets[i] : offsets[i + 1]]
        m = int(sizes[i])
        out.base_hits[i] = int(lesion_hits(run, [BASELINE_CUTOFF])[0])
        s_idx = np.flatnonzero(split.test_pop[:, i])
        if s_idx.size == 0:
            continue
        miss_cls = m - lesion_hits(run, split.cls_cut[s_idx])  # (S_i, E, A)
        miss_crc = m - lesion_hits(run, split.crc_cut[s_idx])  # (S_i, E)
        fnr_cls = fnr(miss_cls, m)
        out.cls_fnr_sum[s_idx] += fnr_cls
        out.crc_fnr_sum[s_idx] += fnr(miss_crc, m)
        for e, eps in enumerate(config.epsilons):
            out.cls_ok_sum[s_idx, e, :] += fnr_within(miss_cls[:, e, :], m, eps)
            out.crc_ok_sum[s_idx, e] += fnr_within(miss_crc[:, e], m, eps)
        out.cls_main_fnr[s_idx, i] = fnr_cls[:, e_main, a_main]
    return out


@dataclass
class _ExtraVoxelSums:
    """Voxel-FNR sums of the lesion-level masks and of the CLS slider-safe band, and the band's and the
    fixed-epsilon CLS's "every epsilon at once" pass counts."""

    lesion_fnr_sum: np.ndarray  # (S, E, A), lesion population
    lesion_ok_sum: np.ndarray  # (S, E, A)
    band_fnr_sum: np.ndarray  # (S, E, A), CLS population
    band_ok_sum: np.ndarray  # (S, E, A)
    band_simultaneous: np.ndarray  # (S, A)
    posthoc: np.ndarray  # (S, A)


def _method_cuts(split: _SplitThresholds, lsplit: LesionSplit) -> dict[str, np.ndarray]:
    """Every method's cutoffs, for the lesion-wise metrics (the baseline's is one number)."""
    return {
        "baseline": np.asarray(BASELINE_CUTOFF),
        "cls": split.cls_cut,
        "crc": split.crc_cut,
        "lesion": lsplit.lesion_cut,
    }


def _extra_voxel_sums(
    stats: CaseStatistics, split: _SplitThresholds, lsplit: LesionSplit, config: EvaluationConfig
) -> _ExtraVoxelSums:
    """Test FNRs of the lesion-level masks and of the CLS band, counted on the summaries (exact)."""
    shape = split.cls_cut.shape
    per_alpha = (shape[0], shape[2])
    out = _ExtraVoxelSums(
        np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(per_alpha), np.zeros(per_alpha)
    )
    summaries, offsets, sizes = stats.summaries, stats.summaries.offsets, stats.sizes
    for i in range(stats.n):
        run, m = summaries.values[offsets[i] : offsets[i + 1]], int(sizes[i])
        for cuts, test, fnr_sum, ok_sum in (
            (lsplit.lesion_cut, lsplit.test_lpop, out.lesion_fnr_sum, out.lesion_ok_sum),
            (lsplit.band_cut["cls"], split.test_pop, out.band_fnr_sum, out.band_ok_sum),
        ):
            s_idx = np.flatnonzero(test[:, i])
            if not s_idx.size:
                continue
            miss = m - lesion_hits(run, cuts[s_idx])
            fnr_sum[s_idx] += fnr(miss, m)
            for e, eps in enumerate(config.epsilons):
                ok_sum[s_idx, e, :] += fnr_within(miss[:, e, :], m, eps)
        s_idx = np.flatnonzero(split.test_pop[:, i])
        if s_idx.size:
            band_ok, fixed_ok = voxel_simultaneous(
                run, m, lsplit.band_cut["cls"][s_idx], split.cls_cut[s_idx], config.epsilons, lesion_hits
            )
            out.band_simultaneous[s_idx] += band_ok
            out.posthoc[s_idx] += fixed_ok
    return out


# ----------------------------------------------------------------------------- pass 2: mask sizes (and HD95)


@dataclass
class _MaskSizes:
    """Sums over each split's test cases of PC and Dice, the main setting's HD95, the set sizes."""

    cls_pc_sum: np.ndarray  # (S, E, A)
    cls_dice_sum: np.ndarray  # (S, E, A)
    crc_pc_sum: np.ndarray  # (S, E)
    crc_dice_sum: np.ndarray  # (S, E)
    cls_main_hd: np.ndarray  # (S, n)
    set_sums: SetArrays  # inner/outer voxels and mL, (S, A)
    extra_pc_sum: dict[str, np.ndarray] = field(default_factory=dict)  # lesion / cls_band / lesion_band (S, E, A)
    extra_dice_sum: dict[str, np.ndarray] = field(default_factory=dict)
    fp_components_sum: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (S,), main setting
    fp_ml_sum: dict[str, np.ndarray] = field(default_factory=dict)


def _pass2_sizes(
    source: CaseSource,
    stats: CaseStatistics,
    split: _SplitThresholds,
    lsplit: LesionSplit,
    config: EvaluationConfig,
    score_transforms: list[ScoreTransform],
    run: _Run,
) -> _MaskSizes:
    """Read the cases again and count each one's voxels at every cutoff / threshold it meets as a test case."""
    S, E, A, n = config.splits, len(config.epsilons), len(config.alphas), stats.n
    sizes = _MaskSizes(
        np.zeros((S, E, A)),
        np.zeros((S, E, A)),
        np.zeros((S, E)),
        np.zeros((S, E)),
        np.full((S, n), np.nan),
        {
            name: {
                mode: {k: np.zeros((S, A)) for k in ("inner_voxels", "outer_voxels", "inner_ml", "outer_ml")}
                for mode in config.set_modes
            }
            for name in stats.set_stats
        },
        {k: np.zeros((S, E, A)) for k in ("lesion", "cls_band", "lesion_band")},
        {k: np.zeros((S, E, A)) for k in ("lesion", "cls_band", "lesion_band")},
        {m: np.zeros(S) for m in LESIONWISE_METHODS},
        {m: np.zeros(S) for m in LESIONWISE_METHODS},
    )
    if not (bool(stats.set_stats) or bool(split.test_pop.any()) or bool(lsplit.test_lpop.any())):
        return sizes
    shared = _Pass2(stats, split, lsplit, config, score_transforms)
    mapped = map_cases(
        _case_sizes, shared, source, run.spec, case_ids=run.case_ids, progress=run.progress, stage="sizes"
    )
    if len(mapped.results) != n:
        raise ConformalSegError(
            f"the cases changed between the two passes over the data ({len(mapped.results)} case(s) the second time, "
            f"{n} the first)",
            fix="pass a dataset that yields the same cases in the same order each time",
        )
    for updates in mapped.results:  # in case order: the same additions as an in-place serial loop
        updates.apply(sizes)
    return sizes


@dataclass
class _Pass2:
    """What every pass-2 task needs (sent to each worker once)."""

    stats: CaseStatistics
    split: _SplitThresholds
    lsplit: LesionSplit
    config: EvaluationConfig
    score_transforms: list[ScoreTransform]


def _case_sizes(shared: _Pass2, i: int, case: EvalCase) -> Updates:
    """Pass 2 on case ``i``: its additions to the per-split sums (the task function of the second map)."""
    stats, split, config = shared.stats, shared.split, shared.config
    if i >= stats.n or case.case_id != stats.ids[i] or case.probability.size != stats.n_voxels[i]:
        raise ConformalSegError(
            f"the cases changed between the two passes over the data (case {case.case_id!r} at position {i})",
            fix="pass a dataset that yields the same cases in the same order each time",
        )
    updates = Updates()
    _lesion_mask_sizes(case, i, stats, split, config, updates)
    _extra_mask_sizes(case, i, stats, split, shared.lsplit, config, updates)
    s_all = np.flatnonzero(split.test_mask[:, i])
    if s_all.size and stats.set_stats:
        _set_sizes(
            case, s_all, float(stats.voxel_ml[i]), shared.score_transforms, split.sets, config.set_modes, updates
        )
    return updates


def _lesion_mask_sizes(
    case: EvalCase, i: int, stats: CaseStatistics, split: _SplitThresholds, config: EvaluationConfig, sizes: Updates
) -> None:
    """Add case ``i``'s PC and Dice (and HD95 at the main setting) to the splits that test it."""
    s_pop = np.flatnonzero(split.test_pop[:, i])
    if not s_pop.size:
        return
    prob, m, n_voxels = case.probability, int(stats.sizes[i]), stats.n_voxels[i]
    cuts_cls, cuts_crc = split.cls_cut[s_pop], split.crc_cut[s_pop]
    counts = count_at_least(prob, np.concatenate([cuts_cls.ravel(), cuts_crc.ravel()]))
    pred_cls = counts[: cuts_cls.size].reshape(cuts_cls.shape)
    pred_crc = counts[cuts_cls.size :].reshape(cuts_crc.shape)
    offsets = stats.summaries.offsets
    run = stats.summaries.values[offsets[i] : offsets[i + 1]]
    sizes.add(("cls_pc_sum",), s_pop, pred_cls / n_voxels)
    sizes.add(("crc_pc_sum",), s_pop, pred_crc / n_voxels)
    sizes.add(("cls_dice_sum",), s_pop, dice(lesion_hits(run, cuts_cls), pred_cls, m))
    sizes.add(("crc_dice_sum",), s_pop, dice(lesion_hits(run, cuts_crc), pred_crc, m))
    if config.hd95:
        main_cuts = cuts_cls[:, config.main_epsilon_index, config.main_alpha_index]
        distinct, inverse = np.unique(main_cuts, return_inverse=True)
        values = np.array(
            [hd95_metric(apply_threshold(prob, c), case.lesion, case.geometry.spacing_zyx) for c in distinct]
        )
        sizes.assign(("cls_main_hd",), (s_pop, i), values[inverse.reshape(-1)])


def _extra_mask_sizes(
    case: EvalCase,
    i: int,
    stats: CaseStatistics,
    split: _SplitThresholds,
    lsplit: LesionSplit,
    config: EvaluationConfig,
    sizes: Updates,
) -> None:
    """PC and Dice of the lesion-level masks and of both bands; false positives at the main setting."""
    prob, m, n_voxels = case.probability, int(stats.sizes[i]), stats.n_voxels[i]
    offsets = stats.summaries.offsets
    run = stats.summaries.values[offsets[i] : offsets[i + 1]]
    for key, cuts, test in (
        ("lesion", lsplit.lesion_cut, lsplit.test_lpop),
        ("cls_band", lsplit.band_cut["cls"], split.test_pop),
        ("lesion_band", lsplit.band_cut["lesion"], lsplit.test_lpop),
    ):
        s_idx = np.flatnonzero(test[:, i])
        if s_idx.size:
            chosen = cuts[s_idx]
            predicted = count_at_least(prob, chosen.ravel()).reshape(chosen.shape)
            sizes.add(("extra_pc_sum", key), s_idx, predicted / n_voxels)
            sizes.add(("extra_dice_sum", key), s_idx, dice(lesion_hits(run, chosen), predicted, m))
    s_l = np.flatnonzero(lsplit.test_lpop[:, i])
    if not (config.lesionwise and s_l.size):
        return
    e, a = config.main_epsilon_index, config.main_alpha_index
    main = {
        "baseline": np.full(s_l.size, BASELINE_CUTOFF),
        "cls": split.cls_cut[s_l, e, a],
        "crc": split.crc_cut[s_l, e],
        "lesion": lsplit.lesion_cut[s_l, e, a],
    }
    spacing = case.geometry.spacing_zyx
    comps, ml = false_positives_at(prob, case.lesion, np.stack(list(main.values())), spacing)
    for k, method in enumerate(main):
        sizes.add(("fp_components_sum", method), s_l, comps[k])
        sizes.add(("fp_ml_sum", method), s_l, ml[k])


def _set_sizes(
    case: EvalCase,
    s_all: np.ndarray,
    voxel_ml: float,
    score_transforms: list[ScoreTransform],
    set_thr: SetArrays,
    set_modes: tuple[str, ...],
    updates: Updates,
) -> None:
    """Add the case's inner / outer set sizes to the splits ``s_all`` that test it."""
    for t in score_transforms:
        scores = t(case.probability, case.geometry)
        inner = np.stack([set_thr[t.name][mode]["inner_threshold"][s_all] for mode in set_modes])
        outer = np.stack([set_thr[t.name][mode]["outer_threshold"][s_all] for mode in set_modes])
        n_gt = count_greater(scores, inner)  # |T > lambda_in|   (M, S_i, A)
        n_ge_outer = count_at_least(scores, outer)  # |T >= t_out|
        del scores
        # displayed inner set I & O: = I when lambda_in >= t_out, else = O
        n_inner = np.where(inner >= outer, n_gt, n_ge_outer)
        for k, mode in enumerate(set_modes):
            path = ("set_sums", t.name, mode)
            updates.add((*path, "inner_voxels"), s_all, n_inner[k])
            updates.add((*path, "outer_voxels"), s_all, n_ge_outer[k])
            updates.add((*path, "inner_ml"), s_all, n_inner[k] * voxel_ml)
            updates.add((*path, "outer_ml"), s_all, n_ge_outer[k] * voxel_ml)


# ----------------------------------------------------------------------------- assembly


def _assemble(
    config: EvaluationConfig,
    stats: CaseStatistics,
    split: _SplitThresholds,
    fnrs: _TestFnrs,
    sizes: _MaskSizes,
    n_cal: int,
    n_test: int,
) -> EvaluationResult:
    """Per-split means of every metric, in the arrays of :class:`EvaluationResult`."""
    S, E = config.splits, len(config.epsilons)
    inv_pop, test_pop = split.inv_pop, split.test_pop
    pop_f = test_pop.astype(np.float64)

    def split_mean(per_case: np.ndarray) -> np.ndarray:
        return (pop_f @ np.asarray(per_case, dtype=np.float64)) * inv_pop

    base = _baseline_per_case(stats, fnrs.base_hits, config.epsilons)
    cls = {
        "cutoff": split.cls_cut,
        "trivial": split.cls_cut <= 0,  # -inf (too few scans) or 0 (ties at 0): the whole image
        "n_cal": split.cls_ncal,
        "n_test": split.n_test_pop,
        "ecr": fnrs.cls_ok_sum * inv_pop[:, None, None],
        "fnr": fnrs.cls_fnr_sum * inv_pop[:, None, None],
        "pc": sizes.cls_pc_sum * inv_pop[:, None, None],
        "dice": sizes.cls_dice_sum * inv_pop[:, None, None],
    }
    crc = {
        "cutoff": split.crc_cut,
        "trivial": split.crc_cut <= 0,
        "ecr": fnrs.crc_ok_sum * inv_pop[:, None],
        "fnr": fnrs.crc_fnr_sum * inv_pop[:, None],
        "pc": sizes.crc_pc_sum * inv_pop[:, None],
        "dice": sizes.crc_dice_sum * inv_pop[:, None],
    }
    baseline = {
        "ecr": np.stack([split_mean(base["ok"][e]) for e in range(E)], axis=1),
        "fnr": split_mean(base["fnr"]),
        "pc": split_mean(base["pc"]),
        "dice": split_mean(base["dice"]),
        "inside": split_mean(base["inside"]),
        "contains": split_mean(base["contains"]),
    }
    if config.hd95:
        base_hd_split = np.where(test_pop, stats.base_hd[None, :], np.nan)
        cls["hd95"], cls["hd95_excluded"] = _hd_split_means(sizes.cls_main_hd, test_pop)
        baseline["hd95"], baseline["hd95_excluded"] = _hd_split_means(base_hd_split, test_pop)
    else:
        for d in (cls, baseline):
            d["hd95"], d["hd95_excluded"] = np.full(S, np.nan), np.zeros(S, dtype=np.int64)
    sets = _set_results(stats, split, sizes, config.set_modes, n_test)
    per_case = {
        "baseline_fnr": np.where(stats.population, base["fnr"], np.nan),
        "baseline_pc": base["pc"],
        "baseline_dice": base["dice"],
        "baseline_hd95": stats.base_hd,
        "cls_main_fnr": fnrs.cls_main_fnr,
        "cls_main_hd95": sizes.cls_main_hd,
    }
    return EvaluationResult(
        config,
        tuple(stats.ids),
        stats.sizes.copy(),
        stats.n_voxels,
        stats.voxel_ml,
        stats.population,
        split.test_mask,
        n_cal,
        n_test,
        cls,
        crc,
        baseline,
        sets,
        per_case,
    )


def _assemble_lesion(
    result: EvaluationResult,
    stats: CaseStatistics,
    split: _SplitThresholds,
    lsplit: LesionSplit,
    extra: _ExtraVoxelSums,
    lw: LesionwiseSums,
    sizes: _MaskSizes,
) -> None:
    """Per-split means of the lesion-level method, the bands and the lesion-wise metrics (in ``result``)."""
    n_l = lsplit.test_lpop.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_l = np.where(n_l > 0, 1.0 / np.maximum(n_l, 1), np.nan)
    il, ip = inv_l[:, None, None], split.inv_pop[:, None, None]
    result.lesion = {
        "cutoff": lsplit.lesion_cut,
        "trivial": lsplit.lesion_cut <= 0,
        "n_cal": lsplit.lesion_ncal,
        "n_test": n_l,
        "ecr": extra.lesion_ok_sum * il,
        "fnr": extra.lesion_fnr_sum * il,
        "pc": sizes.extra_pc_sum["lesion"] * il,
        "dice": sizes.extra_dice_sum["lesion"] * il,
        "lesion_ecr": lw.lesion_ecr["lesion"] * il,
        "missed_rate": lw.missed_rate["lesion"] * il,
    }
    result.bands = {
        "cls": {
            "cutoff": lsplit.band_cut["cls"],
            "level": lsplit.band_level["cls"],
            "trivial": lsplit.band_cut["cls"] <= 0,
            "ecr": extra.band_ok_sum * ip,
            "fnr": extra.band_fnr_sum * ip,
            "pc": sizes.extra_pc_sum["cls_band"] * ip,
            "dice": sizes.extra_dice_sum["cls_band"] * ip,
            "simultaneous_ecr": extra.band_simultaneous * split.inv_pop[:, None],
            "posthoc_ecr": extra.posthoc * split.inv_pop[:, None],
        },
        "lesion": {
            "cutoff": lsplit.band_cut["lesion"],
            "level": lsplit.band_level["lesion"],
            "trivial": lsplit.band_cut["lesion"] <= 0,
            "pc": sizes.extra_pc_sum["lesion_band"] * il,
            "dice": sizes.extra_dice_sum["lesion_band"] * il,
            "simultaneous_ecr": lw.simultaneous["lesion_band"] * inv_l[:, None],
            "posthoc_ecr": lw.simultaneous["lesion_posthoc"] * inv_l[:, None],
        },
    }
    lesions = {name: lw.lesions[name] for name, _, _ in SIZE_CLASSES}
    result.lesionwise = {}
    for method in LESIONWISE_METHODS:
        scale = inv_l.reshape((-1,) + (1,) * (lw.lesion_ecr[method].ndim - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            sensitivity = {
                name: np.where(lesions[name] > 0, lw.detected[method][name] / np.maximum(lesions[name], 1), np.nan)
                for name in lesions
            }
        result.lesionwise[method] = {
            "lesion_ecr": lw.lesion_ecr[method] * scale,
            "missed_rate": lw.missed_rate[method] * scale,
            "sensitivity": sensitivity,
            "fp_components": sizes.fp_components_sum[method] * inv_l
            if result.config.lesionwise
            else np.full_like(inv_l, np.nan),
            "fp_ml": sizes.fp_ml_sum[method] * inv_l if result.config.lesionwise else np.full_like(inv_l, np.nan),
        }
    result.lesionwise["lesions_per_class"] = lesions


def _set_results(
    stats: CaseStatistics, split: _SplitThresholds, sizes: _MaskSizes, set_modes: tuple[str, ...], n_test: int
) -> SetArrays:
    """Per transform and mode: thresholds, coverages, trivial flags and mean sizes per split."""
    sets: SetArrays = {}
    for name in stats.set_stats:
        sets[name] = {}
        for mode in set_modes:
            arrays = dict(split.sets[name][mode])
            arrays["trivial"] = np.isposinf(arrays["inner_threshold"]) | np.isneginf(arrays["outer_threshold"])
            for k, v in sizes.set_sums[name][mode].items():
                arrays[k] = v / n_test
            sets[name][mode] = arrays
    return sets


def _baseline_per_case(
    stats: CaseStatistics, base_hits: np.ndarray, epsilons: tuple[float, ...]
) -> dict[str, np.ndarray]:
    """The fixed 0.5 threshold per case: FNR, ``FNR <= epsilon`` (E, n), PC, Dice, inside / contains."""
    sizes = stats.sizes
    base_miss = sizes - base_hits
    return {
        "fnr": fnr(base_miss, sizes),
        "ok": np.stack([fnr_within(base_miss, sizes, eps) for eps in epsilons]),
        "pc": stats.base_pred / stats.n_voxels,
        "dice": dice(base_hits, stats.base_pred, sizes),
        "inside": stats.base_fp == 0,
        "contains": base_miss == 0,
    }


def _hd_split_means(values: np.ndarray, test_pop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per split: mean HD95 over finite values of the test population, and how many were left out."""
    finite = np.isfinite(values) & test_pop
    excluded = (test_pop & ~finite).sum(axis=1)
    counts = finite.sum(axis=1)
    totals = np.where(finite, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return means, excluded.astype(np.int64)
