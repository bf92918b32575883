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
probabilities), per-case ``(tau, gamma)`` per transform and a few counts. The splits need no volume.
Pass 2 reads the cases again, one at a time, and counts each case's voxels at every distinct
cutoff / threshold it meets as a test case with one ``searchsorted`` pass. Peak memory is about
one probability map, its lesion mask and one transformed map, plus arrays of size
``splits x |epsilons| x |alphas|`` and ``splits x n``.

Too few cases. Each side of the split needs at least one case (else
:class:`~ConformalSegLib.common.errors.ConformalSegError`). Points whose calibration side is too small for
``alpha`` (the conformal quantile is infinite) are kept and reported as *trivial* (whole-image mask /
empty inner set, whole-image outer set), with a
:class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning` saying how many cases are needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ..conformal.cls import EMPTY_POLICIES, apply_threshold, conformal_lower_cutoff, critical_cutoffs
from ..conformal.confidence_sets import MODES, SetStatisticsBuilder, calibrate_sets
from ..conformal.crc import crc_cutoff
from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ..common.jsonable import jsonable
from ..conformal.exact import as_fraction, check_alpha, check_epsilon, min_calibration_size
from ..common.geometry import Geometry
from .metrics import (count_at_least, count_greater, dice, fnr, fnr_within, hd95 as hd95_metric, lesion_hits,
                      require_monai)
from ..conformal.summaries import SummaryBuilder
from ..conformal.score_transforms import ScoreTransform, parse_transform

__all__ = [
    "BASELINE_CUTOFF",
    "DEFAULT_SET_MODES",
    "EvalCase",
    "CaseSource",
    "EvaluationConfig",
    "EvaluationResult",
    "ProgressCallback",
    "STAGES",
    "TqdmProgress",
    "as_eval_case",
    "binomial_tolerance",
    "coverage_status",
    "evaluate_dataset",
    "mean_std",
]

#: The fixed threshold of the baseline segmentation.
BASELINE_CUTOFF = 0.5
DEFAULT_SET_MODES = ("marginal", "joint-split")
#: Progress stages, in order: pass 1 over the cases, the calibration splits, pass 2 over the cases.
STAGES = ("statistics", "splits", "sizes")
#: ``progress(done, total, stage)``; ``total`` is None in pass 1 when the number of cases is unknown.
ProgressCallback = Callable[[int, "int | None", str], None]


# ----------------------------------------------------------------------------- input adapter


@dataclass
class EvalCase:
    """One case as the evaluation sees it: float probability map, bool lesion mask, geometry."""

    case_id: str
    probability: np.ndarray
    lesion: np.ndarray
    geometry: Geometry


def _unwrap(value: Any) -> tuple[np.ndarray, Geometry | None]:
    """An array and its geometry from a :class:`~ConformalSegLib.io.volumes.Volume` or a bare array."""
    if hasattr(value, "array") and hasattr(value, "geometry"):
        return np.asarray(value.array), value.geometry
    return np.asarray(value), None


def as_eval_case(item: Any) -> EvalCase:
    """Adapt an :class:`~ConformalSegLib.io.dataset.Case` (Volumes) or any object with ``case_id``,
    ``probability`` and ``lesion`` arrays and an optional ``geometry`` (e.g. a
    :class:`~ConformalSegLib.phantoms.simulated_maps.SyntheticCase`)."""
    try:
        case_id = str(item.case_id)
        probability, prob_geometry = _unwrap(item.probability)
        lesion, lesion_geometry = _unwrap(item.lesion)
    except AttributeError as exc:
        raise ConformalSegError(f"cannot evaluate {type(item).__name__!r} objects: a case needs case_id, "
                                "probability and lesion attributes",
                                fix="pass a CalibrationDataset or objects like SyntheticCase") from exc
    geometry = prob_geometry or getattr(item, "geometry", None) or lesion_geometry
    if probability.ndim != 3:
        raise ConformalSegError(f"case {case_id!r}: the probability map is {probability.ndim}D, expected 3D",
                                fix="give one 3D probability map per case")
    if probability.dtype.kind != "f":
        raise ConformalSegError(f"case {case_id!r}: the probability map has {probability.dtype} voxels, "
                                "expected floating point probabilities", fix="pass probabilities in [0, 1]")
    if lesion.shape != probability.shape:
        raise ConformalSegError(f"case {case_id!r}: lesion mask shape {lesion.shape} != probability map "
                                f"shape {probability.shape}", fix="resample both onto the same voxel grid")
    if geometry is None:
        geometry = Geometry(shape=probability.shape)
    elif tuple(geometry.shape) != probability.shape:
        raise ConformalSegError(f"case {case_id!r}: geometry shape {geometry.shape} != array shape "
                                f"{probability.shape}", fix="pass the geometry of the probability map")
    return EvalCase(case_id, probability, np.asarray(lesion, dtype=bool), geometry)


class CaseSource:
    """Re-iterable view of a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` or of any
    re-iterable of case-like objects (see :func:`as_eval_case`), yielding :class:`EvalCase`.

    One-shot iterators (generators, ``iter(list)``) are refused: the evaluation reads the cases twice.
    """

    def __init__(self, data: Iterable[Any]):
        if isinstance(data, CaseSource):
            data = data.data
        if isinstance(data, Iterator):  # generators, iter(list), map objects, ...; no iter() call here
            raise ConformalSegError("the evaluation reads the cases twice, but got a one-shot iterator "
                                    f"({type(data).__name__})",
                                    fix="pass a CalibrationDataset or a list of cases (e.g. list(make_cases(...)))")
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    @property
    def known_length(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None

    def __iter__(self) -> Iterator[EvalCase]:
        for item in self.data:
            yield as_eval_case(item)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EvaluationConfig:
    """Parameters of one evaluation (floats as given; read exactly via :func:`~ConformalSegLib.conformal.exact.as_fraction`)."""

    epsilons: tuple[float, ...]
    alphas: tuple[float, ...]
    main_epsilon: float
    main_alpha: float
    splits: int
    cal_fraction: float
    seed: int
    transforms: tuple[str, ...]
    set_modes: tuple[str, ...]
    hd95: bool
    empty: str

    @property
    def main_epsilon_index(self) -> int:
        return _index_of(self.epsilons, self.main_epsilon)

    @property
    def main_alpha_index(self) -> int:
        return _index_of(self.alphas, self.main_alpha)


def _index_of(values: Sequence[float], value: float) -> int:
    target = as_fraction(value)
    for i, v in enumerate(values):
        if as_fraction(v) == target:
            return i
    raise ValueError(f"{value} not in {values}")


def mean_std(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (``ddof=1``; 0 with one value) over ``axis``, ignoring NaN (all-NaN -> NaN)."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.sum(~np.isnan(values), axis=axis)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=axis)
        centred = np.nansum((values - np.expand_dims(mean, axis)) ** 2, axis=axis)
        std = np.where(valid > 1, np.sqrt(centred / np.maximum(valid - 1, 1)), np.where(valid == 1, 0.0, np.nan))
    return mean, std


def binomial_tolerance(alpha: float, n_test: float, z: float = 2.0) -> float:
    """Allowed shortfall of a mean coverage below ``1 - alpha``: ``z * sqrt(alpha (1 - alpha) / n_test)``.

    The test-side coverage of one split is a binomial proportion over ``n_test`` cases around a
    value ``>= 1 - alpha``; averaging over overlapping splits of one dataset does not remove the
    dataset's own sampling noise, so this single-split binomial standard error (times ``z``,
    default 2) is the yardstick of the PASS/CHECK verdicts.
    """
    a = float(alpha)
    if n_test <= 0:
        return float("nan")
    return z * math.sqrt(a * (1 - a) / n_test)


def coverage_status(mean_coverage: float, alpha: float, n_test: float, z: float = 2.0) -> str:
    """``"PASS"`` when ``mean_coverage >= 1 - alpha - binomial_tolerance``, else ``"CHECK"`` (``"n/a"``
    when the coverage is NaN)."""
    if not np.isfinite(mean_coverage):
        return "n/a"
    return "PASS" if mean_coverage >= 1 - float(alpha) - binomial_tolerance(alpha, n_test, z) else "CHECK"


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate_dataset` computed; per-split arrays are kept for plots.

    Shapes: ``S`` splits, ``E`` epsilons, ``A`` alphas, ``n`` cases. NaN marks "undefined" (e.g. no
    test case with a lesion on that split). Keys of the method dictionaries:

    * ``cls``: ``cutoff, trivial, ecr, fnr, pc, dice`` (S, E, A); ``n_cal, n_test`` (S,) (cases of the
      population on each side); ``hd95, hd95_excluded`` (S,) at the main setting.
    * ``crc``: ``cutoff, trivial, ecr, fnr, pc, dice`` (S, E).
    * ``baseline``: ``ecr`` (S, E); ``fnr, pc, dice, hd95, hd95_excluded`` (S,); ``inside`` /
      ``contains`` (S,): fraction of test cases whose 0.5-mask lies inside the lesion / contains it.
    * ``sets[transform][mode]``: ``inner_threshold, outer_threshold, trivial, inner_coverage,
      outer_coverage, joint_coverage, inner_voxels, outer_voxels, inner_ml, outer_ml`` (S, A);
      ``n_test`` is ``self.n_test``.
    * ``per_case``: ``baseline_fnr, baseline_pc, baseline_dice, baseline_hd95`` (n,);
      ``cls_main_fnr, cls_main_hd95`` (S, n), NaN where the case is not a test case of the population.
    """

    config: EvaluationConfig
    case_ids: tuple[str, ...]
    lesion_sizes: np.ndarray
    n_voxels: np.ndarray
    voxel_ml: np.ndarray
    population: np.ndarray  # (n,) bool: cases used by CLS / CRC / baseline
    test_mask: np.ndarray  # (S, n) bool
    n_cal: int
    n_test: int
    cls: dict[str, np.ndarray]
    crc: dict[str, np.ndarray]
    baseline: dict[str, np.ndarray]
    sets: dict[str, dict[str, dict[str, np.ndarray]]]
    per_case: dict[str, np.ndarray]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)

    @property
    def n_empty_lesions(self) -> int:
        return int(np.count_nonzero(self.lesion_sizes == 0))

    @property
    def mean_population_test(self) -> float:
        """Mean number of test cases per split in the CLS/CRC population."""
        return float(np.mean(self.cls["n_test"]))

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per (method, epsilon, alpha[, transform, mode]) with mean / std over splits."""
        cfg = self.config
        rows: list[dict[str, Any]] = []
        n_pop = self.mean_population_test

        def stats(array: np.ndarray) -> dict[str, float]:
            mean, std = mean_std(array)
            return {"mean": float(mean), "std": float(std)}

        for e, eps in enumerate(cfg.epsilons):
            rows.append({"method": "baseline", "epsilon": eps, "alpha": None, "cutoff": BASELINE_CUTOFF,
                         "trivial_splits": 0,
                         "metrics": {"ecr": stats(self.baseline["ecr"][:, e]), "fnr": stats(self.baseline["fnr"]),
                                     "pc": stats(self.baseline["pc"]), "dice": stats(self.baseline["dice"]),
                                     "hd95": stats(self.baseline["hd95"]),
                                     "hd95_excluded_per_split": float(np.mean(self.baseline["hd95_excluded"]))}})
            rows.append({"method": "crc", "epsilon": eps, "alpha": None,
                         "cutoff": stats(_finite_or_nan(self.crc["cutoff"][:, e])),
                         "trivial_splits": int(self.crc["trivial"][:, e].sum()),
                         "metrics": {k: stats(self.crc[k][:, e]) for k in ("ecr", "fnr", "pc", "dice")}})
            for a, alpha in enumerate(cfg.alphas):
                metrics = {k: stats(self.cls[k][:, e, a]) for k in ("ecr", "fnr", "pc", "dice")}
                if e == cfg.main_epsilon_index and a == cfg.main_alpha_index and cfg.hd95:
                    metrics["hd95"] = stats(self.cls["hd95"])
                    metrics["hd95_excluded_per_split"] = float(np.mean(self.cls["hd95_excluded"]))
                trivial = int(self.cls["trivial"][:, e, a].sum())
                status = "trivial" if trivial == cfg.splits else coverage_status(metrics["ecr"]["mean"], alpha, n_pop)
                rows.append({"method": "cls", "epsilon": eps, "alpha": alpha,
                             "cutoff": stats(_finite_or_nan(self.cls["cutoff"][:, e, a])),
                             "trivial_splits": trivial, "target": 1 - alpha,
                             "tolerance": binomial_tolerance(alpha, n_pop), "status": status, "metrics": metrics})
        for name, modes in self.sets.items():
            for mode, arrays in modes.items():
                for a, alpha in enumerate(cfg.alphas):
                    metrics = {k: stats(arrays[k][:, a]) for k in
                               ("inner_coverage", "outer_coverage", "joint_coverage", "inner_voxels",
                                "outer_voxels", "inner_ml", "outer_ml")}
                    trivial = int(arrays["trivial"][:, a].sum())
                    status = "trivial" if trivial == cfg.splits else _sets_status(metrics, mode, alpha, self.n_test)
                    rows.append({"method": "sets", "transform": name, "mode": mode, "epsilon": None, "alpha": alpha,
                                 "trivial_splits": trivial, "target": 1 - alpha,
                                 "tolerance": binomial_tolerance(alpha, self.n_test), "status": status,
                                 "metrics": metrics})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON content (lists, numbers, strings, ``None`` for NaN and infinities)."""
        cfg = self.config
        return jsonable({
            "config": {"epsilons": list(cfg.epsilons), "alphas": list(cfg.alphas), "main_alpha": cfg.main_alpha,
                       "main_epsilon": cfg.main_epsilon, "splits": cfg.splits, "cal_fraction": cfg.cal_fraction,
                       "seed": cfg.seed, "transforms": list(cfg.transforms), "set_modes": list(cfg.set_modes),
                       "hd95": cfg.hd95, "empty": cfg.empty, "baseline_cutoff": BASELINE_CUTOFF},
            "dataset": {"n_cases": self.n_cases, "n_empty_lesions": self.n_empty_lesions,
                        "n_cal": self.n_cal, "n_test": self.n_test, "case_ids": list(self.case_ids),
                        "lesion_sizes": self.lesion_sizes, "n_voxels": self.n_voxels, "voxel_ml": self.voxel_ml,
                        "population": self.population},
            "summary": self.summary_rows(),
            "per_split": {"cls": self.cls, "crc": self.crc, "baseline": self.baseline, "sets": self.sets},
            "per_case": self.per_case,
            "splits_test_mask": self.test_mask,
            "warnings": list(self.warnings),
            "notes": {"non_finite": "null stands for NaN (undefined, e.g. no test case) and for infinite "
                                    "cutoffs/thresholds (see the 'trivial' flags: -inf cutoff = whole image)"},
        })


def _sets_status(metrics: dict[str, dict[str, float]], mode: str, alpha: float, n_test: int) -> str:
    if mode == "marginal":
        states = [coverage_status(metrics[k]["mean"], alpha, n_test) for k in ("inner_coverage", "outer_coverage")]
        return "n/a" if "n/a" in states else ("PASS" if all(s == "PASS" for s in states) else "CHECK")
    return coverage_status(metrics["joint_coverage"]["mean"], alpha, n_test)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


# ----------------------------------------------------------------------------- progress


class TqdmProgress:
    """A ``progress(done, total, stage)`` callback drawing one tqdm bar per stage (for the CLI).

    Use as a context manager, or call :meth:`close` at the end.
    """

    LABELS = {"statistics": "pass 1/2: case statistics", "splits": "calibration splits",
              "sizes": "pass 2/2: mask sizes"}

    def __init__(self, **tqdm_kwargs: Any):
        self._kwargs = {"leave": True, "dynamic_ncols": True, **tqdm_kwargs}
        self._bar = None
        self._stage: str | None = None

    def __call__(self, done: int, total: int | None, stage: str) -> None:
        from tqdm.auto import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            unit = "split" if stage == "splits" else "case"
            self._bar = tqdm(total=total, desc=self.LABELS.get(stage, stage), unit=unit, **self._kwargs)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._stage = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- evaluation


def _check_grid(values: Sequence[float], name: str, check: Callable[[float], Fraction]) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(float(v) for v in values)
    if not values:
        raise ConformalSegError(f"no {name} given", fix=f"pass at least one value, e.g. --{name} 0.1")
    seen: set[Fraction] = set()
    for v in values:
        f = check(v)
        if f in seen:
            raise ConformalSegError(f"{name} {v} is listed twice", fix=f"list each {name[:-1]} value once")
        seen.add(f)
    return values


def _check_fraction(cal_fraction: float) -> Fraction:
    try:
        fraction = as_fraction(cal_fraction)
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(f"cal_fraction must be a number, got {cal_fraction!r}",
                                fix="pass e.g. --cal-fraction 0.5") from exc
    if not 0 < fraction < 1:
        raise ConformalSegError(f"cal_fraction must lie strictly between 0 and 1, got {cal_fraction}",
                                fix="pass e.g. --cal-fraction 0.5")
    return fraction


def _split_sizes(n: int, cal_fraction: float) -> tuple[int, int]:
    """``(n_cal, n_test)`` with ``n_cal = floor(cal_fraction * n)`` (exact); each side must be non-empty."""
    n_cal = math.floor(_check_fraction(cal_fraction) * n)
    n_test = n - n_cal
    if n_cal < 1 or n_test < 1:
        raise ConformalSegError(
            f"too few cases for a calibration/test split: {n} case(s) with cal_fraction {cal_fraction} gives "
            f"{n_cal} calibration and {n_test} test case(s); each side needs at least one",
            fix="add cases (at least 2, realistically 20 or more) or change --cal-fraction")
    return n_cal, n_test


def _report(progress: ProgressCallback | None, done: int, total: int | None, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)


def evaluate_dataset(dataset_or_cases: Iterable[Any], *, epsilons: Sequence[float], alphas: Sequence[float],
                     main_alpha: float | None = None, main_epsilon: float | None = None, splits: int = 100,
                     cal_fraction: float = 0.5, seed: int = 0,
                     transforms: Sequence[str | ScoreTransform] = ("identity",),
                     set_modes: Sequence[str] = DEFAULT_SET_MODES, hd95: bool = True, empty: str = "exclude",
                     progress: ProgressCallback | None = None) -> EvaluationResult:
    """Run the random-split protocol (module docstring) on a dataset, exactly, in two streaming passes.

    ``dataset_or_cases``: a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` or a re-iterable
    (e.g. a list) of objects with ``case_id``, ``probability`` and ``lesion`` arrays and ``geometry``.
    The *main setting* (HD95, the FNR distribution) is (``main_epsilon``, ``main_alpha``); each
    defaults to the first value of its grid and must be one of the grid's values. ``transforms``
    (names such as ``"distance"`` or :class:`ScoreTransform`) may be empty: no confidence sets.
    ``progress(done, total, stage)`` is called per case in each pass and per split, with ``stage``
    one of :data:`STAGES`.
    """
    # ---- parameters ---------------------------------------------------------------------------
    epsilons = _check_grid(epsilons, "epsilons", check_epsilon)
    alphas = _check_grid(alphas, "alphas", lambda a: check_alpha(a))
    main_alpha = alphas[0] if main_alpha is None else float(main_alpha)
    check_alpha(main_alpha, "main_alpha")
    if as_fraction(main_alpha) not in {as_fraction(a) for a in alphas}:
        raise ConformalSegError(f"main_alpha {main_alpha} is not one of the alphas {list(alphas)}",
                                fix="add it to --alphas or choose one of them")
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer, float)) or int(splits) != splits \
            or splits < 1:
        raise ConformalSegError(f"splits must be a positive integer, got {splits!r}", fix="pass e.g. --splits 100")
    splits = int(splits)
    if empty not in EMPTY_POLICIES:
        raise ConformalSegError(f"empty-lesion policy must be one of {EMPTY_POLICIES}, got {empty!r}")
    score_transforms: list[ScoreTransform] = []
    for t in transforms:
        st = t if isinstance(t, ScoreTransform) else parse_transform(t)
        if st.name not in {s.name for s in score_transforms}:
            score_transforms.append(st)
    set_modes = tuple(set_modes)
    for mode in set_modes:
        if mode not in MODES:
            raise ConformalSegError(f"unknown confidence-set mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    if score_transforms and not set_modes:
        raise ConformalSegError("confidence sets requested without any mode", fix=f"use one of {', '.join(MODES)}")
    _check_fraction(cal_fraction)  # before any case is read
    main_epsilon = epsilons[0] if main_epsilon is None else float(main_epsilon)
    check_epsilon(main_epsilon)
    if as_fraction(main_epsilon) not in {as_fraction(e) for e in epsilons}:
        raise ConformalSegError(f"main_epsilon {main_epsilon} is not one of the epsilons {list(epsilons)}",
                                fix="add it to --epsilons or choose one of them")
    config = EvaluationConfig(epsilons, alphas, main_epsilon, main_alpha, splits, float(cal_fraction), int(seed),
                              tuple(t.name for t in score_transforms), set_modes if score_transforms else (),
                              bool(hd95), empty)
    a_main = config.main_alpha_index
    if hd95:
        require_monai()  # fail before the first pass, not after it
    e_main = config.main_epsilon_index
    source = CaseSource(dataset_or_cases)

    # ---- pass 1 ---------------------------------------------------------------------------------
    builder = SummaryBuilder("float32")
    set_builders = {t.name: SetStatisticsBuilder(t, t) for t in score_transforms}
    ids: list[str] = []
    n_voxels: list[int] = []
    voxel_ml: list[float] = []
    base_pred: list[int] = []
    base_fp: list[int] = []
    base_hd: list[float] = []
    set_ids: set[str] = set()
    total = source.known_length
    for case in source:
        if case.case_id in set_ids:
            raise ConformalSegError(f"duplicate case id {case.case_id!r} in the evaluation data",
                                    fix="give every case a unique id")
        set_ids.add(case.case_id)
        prob, lesion = case.probability, case.lesion
        builder.add_case(case.case_id, prob, lesion)
        for t in score_transforms:
            set_builders[t.name].add_case(case.case_id, prob, lesion, case.geometry)
        ids.append(case.case_id)
        n_voxels.append(int(prob.size))
        voxel_ml.append(case.geometry.voxel_volume_mm3 / 1000.0)
        base_mask = apply_threshold(prob, BASELINE_CUTOFF)
        base_pred.append(int(np.count_nonzero(base_mask)))
        base_fp.append(int(np.count_nonzero(base_mask & ~lesion)))
        in_population = empty == "include" or bool(lesion.any())
        base_hd.append(hd95_metric(base_mask, lesion, case.geometry.spacing_zyx)
                       if hd95 and in_population else float("nan"))
        del base_mask, case, prob, lesion
        _report(progress, len(ids), total, "statistics")
    n = len(ids)
    n_cal, n_test = _split_sizes(n, cal_fraction)
    summaries = builder.build()
    del builder
    stats = {name: b.build() for name, b in set_builders.items()}
    del set_builders
    sizes = summaries.lesion_sizes
    population = sizes > 0 if empty == "exclude" else np.ones(n, dtype=bool)
    if empty == "exclude" and np.count_nonzero(population) < 2:
        raise ConformalSegError(f"only {int(np.count_nonzero(population))} of {n} case(s) have lesion voxels: "
                                "CLS and expected-FNR control need lesion cases on both sides of the split",
                                fix="check the lesion label value(s) (--lesion-label), add lesion cases, "
                                    "or use --empty include")
    n_voxels_a = np.asarray(n_voxels, dtype=np.int64)
    voxel_ml_a = np.asarray(voxel_ml, dtype=np.float64)
    S, E, A = splits, len(epsilons), len(alphas)

    # ---- splits: thresholds and coverage (no volumes) ---------------------------------------------------
    critical = np.stack([critical_cutoffs(summaries, eps) for eps in epsilons])  # (E, n)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros((S, n), dtype=bool)
    cls_cut = np.empty((S, E, A))
    crc_cut = np.empty((S, E))
    cls_ncal = np.zeros(S, dtype=np.int64)
    set_thr: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name, st in stats.items():
        set_thr[name] = {}
        for mode in set_modes:
            set_thr[name][mode] = {k: np.empty((S, A)) for k in ("inner_threshold", "outer_threshold")}
            set_thr[name][mode].update({k: np.full((S, A), np.nan) for k in
                                        ("inner_coverage", "outer_coverage", "joint_coverage")})
    for s in range(S):
        perm = rng.permutation(n)
        cal = np.sort(perm[:n_cal])
        test = perm[n_cal:]
        test_mask[s, test] = True
        cal_pop = cal[population[cal]]
        cls_ncal[s] = cal_pop.size
        for e, eps in enumerate(epsilons):
            crit_cal = critical[e, cal_pop]
            for a, alpha in enumerate(alphas):
                cls_cut[s, e, a] = conformal_lower_cutoff(crit_cal, alpha)
        cal_summaries = summaries.subset(cal_pop)
        for e, eps in enumerate(epsilons):
            crc_cut[s, e] = crc_cutoff(cal_summaries, eps)
        del cal_summaries
        for name, st in stats.items():
            cal_stats = st.subset(cal)
            tau_test, gamma_test = st.tau[test], st.gamma[test]
            for mode in set_modes:
                arrays = set_thr[name][mode]
                for a, alpha in enumerate(alphas):
                    calibration = calibrate_sets(cal_stats, alpha=alpha, mode=mode, warn=False)
                    arrays["inner_threshold"][s, a] = calibration.inner_threshold
                    arrays["outer_threshold"][s, a] = calibration.outer_threshold
                    inner_ok = tau_test <= calibration.inner_threshold
                    outer_ok = gamma_test <= -calibration.outer_threshold
                    arrays["inner_coverage"][s, a] = inner_ok.mean()
                    arrays["outer_coverage"][s, a] = outer_ok.mean()
                    arrays["joint_coverage"][s, a] = (inner_ok & outer_ok).mean()
        _report(progress, s + 1, S, "splits")

    test_pop = test_mask & population[None, :]
    n_test_pop = test_pop.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_pop = np.where(n_test_pop > 0, 1.0 / np.maximum(n_test_pop, 1), np.nan)

    # test FNRs from the summaries, exactly
    cls_fnr_sum = np.zeros((S, E, A))
    cls_ok_sum = np.zeros((S, E, A))
    crc_fnr_sum = np.zeros((S, E))
    crc_ok_sum = np.zeros((S, E))
    cls_main_fnr = np.full((S, n), np.nan)
    base_hits = np.zeros(n, dtype=np.int64)
    offsets = summaries.offsets
    for i in range(n):
        run = summaries.values[offsets[i]:offsets[i + 1]]
        m = int(sizes[i])
        base_hits[i] = int(lesion_hits(run, [BASELINE_CUTOFF])[0])
        s_idx = np.flatnonzero(test_pop[:, i])
        if s_idx.size == 0:
            continue
        miss_cls = m - lesion_hits(run, cls_cut[s_idx])  # (S_i, E, A)
        miss_crc = m - lesion_hits(run, crc_cut[s_idx])  # (S_i, E)
        fnr_cls = fnr(miss_cls, m)
        cls_fnr_sum[s_idx] += fnr_cls
        crc_fnr_sum[s_idx] += fnr(miss_crc, m)
        for e, eps in enumerate(epsilons):
            cls_ok_sum[s_idx, e, :] += fnr_within(miss_cls[:, e, :], m, eps)
            crc_ok_sum[s_idx, e] += fnr_within(miss_crc[:, e], m, eps)
        cls_main_fnr[s_idx, i] = fnr_cls[:, e_main, a_main]

    base_miss = sizes - base_hits
    base_fnr_case = fnr(base_miss, sizes)
    base_ok_case = np.stack([fnr_within(base_miss, sizes, eps) for eps in epsilons])  # (E, n)
    base_pred_a = np.asarray(base_pred, dtype=np.int64)
    base_pc_case = base_pred_a / n_voxels_a
    base_dice_case = dice(base_hits, base_pred_a, sizes)
    base_hd_case = np.asarray(base_hd, dtype=np.float64)
    base_inside_case = np.asarray(base_fp, dtype=np.int64) == 0
    base_contains_case = base_miss == 0

    # ---- pass 2: predicted-voxel counts (and HD95 at the main setting) ---------------------------------
    cls_pc_sum = np.zeros((S, E, A))
    cls_dice_sum = np.zeros((S, E, A))
    crc_pc_sum = np.zeros((S, E))
    crc_dice_sum = np.zeros((S, E))
    cls_main_hd = np.full((S, n), np.nan)
    size_sums = {name: {mode: {k: np.zeros((S, A)) for k in ("inner_voxels", "outer_voxels", "inner_ml", "outer_ml")}
                        for mode in set_modes} for name in stats}
    needs_pass2 = bool(stats) or bool(test_pop.any())
    if needs_pass2:
        seen = 0
        for i, case in enumerate(source):
            seen = i + 1
            if i >= n or case.case_id != ids[i] or case.probability.size != n_voxels_a[i]:
                raise ConformalSegError("the cases changed between the two passes over the data (case "
                                        f"{case.case_id!r} at position {i})",
                                        fix="pass a dataset that yields the same cases in the same order each time")
            prob = case.probability
            m = int(sizes[i])
            s_pop = np.flatnonzero(test_pop[:, i])
            if s_pop.size:
                cuts_cls, cuts_crc = cls_cut[s_pop], crc_cut[s_pop]
                counts = count_at_least(prob, np.concatenate([cuts_cls.ravel(), cuts_crc.ravel()]))
                pred_cls = counts[:cuts_cls.size].reshape(cuts_cls.shape)
                pred_crc = counts[cuts_cls.size:].reshape(cuts_crc.shape)
                run = summaries.values[offsets[i]:offsets[i + 1]]
                cls_pc_sum[s_pop] += pred_cls / n_voxels_a[i]
                crc_pc_sum[s_pop] += pred_crc / n_voxels_a[i]
                cls_dice_sum[s_pop] += dice(lesion_hits(run, cuts_cls), pred_cls, m)
                crc_dice_sum[s_pop] += dice(lesion_hits(run, cuts_crc), pred_crc, m)
                if hd95:
                    main_cuts = cuts_cls[:, e_main, a_main]
                    distinct, inverse = np.unique(main_cuts, return_inverse=True)
                    values = np.array([hd95_metric(apply_threshold(prob, c), case.lesion, case.geometry.spacing_zyx)
                                       for c in distinct])
                    cls_main_hd[s_pop, i] = values[inverse.reshape(-1)]
            s_all = np.flatnonzero(test_mask[:, i])
            if s_all.size and stats:
                for t in score_transforms:
                    scores = t(prob, case.geometry)
                    inner = np.stack([set_thr[t.name][mode]["inner_threshold"][s_all] for mode in set_modes])
                    outer = np.stack([set_thr[t.name][mode]["outer_threshold"][s_all] for mode in set_modes])
                    n_gt = count_greater(scores, inner)  # |T > lambda_in|   (M, S_i, A)
                    n_ge_outer = count_at_least(scores, outer)  # |T >= t_out|
                    del scores
                    # displayed inner set I & O: = I when lambda_in >= t_out, else = O
                    n_inner = np.where(inner >= outer, n_gt, n_ge_outer)
                    for k, mode in enumerate(set_modes):
                        sums = size_sums[t.name][mode]
                        sums["inner_voxels"][s_all] += n_inner[k]
                        sums["outer_voxels"][s_all] += n_ge_outer[k]
                        sums["inner_ml"][s_all] += n_inner[k] * voxel_ml_a[i]
                        sums["outer_ml"][s_all] += n_ge_outer[k] * voxel_ml_a[i]
            del case, prob
            _report(progress, i + 1, n, "sizes")
        if seen != n:
            raise ConformalSegError(f"the cases changed between the two passes over the data ({seen} case(s) the "
                                    f"second time, {n} the first)",
                                    fix="pass a dataset that yields the same cases in the same order each time")

    # ---- per-split means ------------------------------------------------------------------------------
    pop_f = test_pop.astype(np.float64)

    def split_mean(per_case: np.ndarray) -> np.ndarray:
        return (pop_f @ np.asarray(per_case, dtype=np.float64)) * inv_pop

    cls_trivial = np.isneginf(cls_cut)
    crc_trivial = np.isneginf(crc_cut)
    cls = {"cutoff": cls_cut, "trivial": cls_trivial, "n_cal": cls_ncal, "n_test": n_test_pop,
           "ecr": cls_ok_sum * inv_pop[:, None, None], "fnr": cls_fnr_sum * inv_pop[:, None, None],
           "pc": cls_pc_sum * inv_pop[:, None, None], "dice": cls_dice_sum * inv_pop[:, None, None]}
    crc = {"cutoff": crc_cut, "trivial": crc_trivial, "ecr": crc_ok_sum * inv_pop[:, None],
           "fnr": crc_fnr_sum * inv_pop[:, None], "pc": crc_pc_sum * inv_pop[:, None],
           "dice": crc_dice_sum * inv_pop[:, None]}
    baseline = {"ecr": np.stack([split_mean(base_ok_case[e]) for e in range(E)], axis=1),
                "fnr": split_mean(base_fnr_case), "pc": split_mean(base_pc_case), "dice": split_mean(base_dice_case),
                "inside": split_mean(base_inside_case), "contains": split_mean(base_contains_case)}
    if hd95:
        base_hd_split = np.where(test_pop, base_hd_case[None, :], np.nan)
        cls["hd95"], cls["hd95_excluded"] = _hd_split_means(cls_main_hd, test_pop)
        baseline["hd95"], baseline["hd95_excluded"] = _hd_split_means(base_hd_split, test_pop)
    else:
        for d in (cls, baseline):
            d["hd95"], d["hd95_excluded"] = np.full(S, np.nan), np.zeros(S, dtype=np.int64)

    sets: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name in stats:
        sets[name] = {}
        for mode in set_modes:
            arrays = dict(set_thr[name][mode])
            arrays["trivial"] = np.isposinf(arrays["inner_threshold"]) | np.isneginf(arrays["outer_threshold"])
            for k, v in size_sums[name][mode].items():
                arrays[k] = v / n_test
            sets[name][mode] = arrays

    per_case = {"baseline_fnr": np.where(population, base_fnr_case, np.nan),
                "baseline_pc": base_pc_case, "baseline_dice": base_dice_case, "baseline_hd95": base_hd_case,
                "cls_main_fnr": cls_main_fnr, "cls_main_hd95": cls_main_hd}

    result = EvaluationResult(config, tuple(ids), sizes.copy(), n_voxels_a, voxel_ml_a, population, test_mask,
                              n_cal, n_test, cls, crc, baseline, sets, per_case)
    result.warnings.extend(_trivial_warnings(result))
    for message in result.warnings:
        warnings.warn(message, CalibrationSetTooSmallWarning, stacklevel=2)
    return result


def _hd_split_means(values: np.ndarray, test_pop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per split: mean HD95 over finite values of the test population, and how many were left out."""
    finite = np.isfinite(values) & test_pop
    excluded = (test_pop & ~finite).sum(axis=1)
    counts = finite.sum(axis=1)
    totals = np.where(finite, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return means, excluded.astype(np.int64)


def _trivial_warnings(result: EvaluationResult) -> list[str]:
    cfg = result.config
    S = cfg.splits
    messages = []
    for a, alpha in enumerate(cfg.alphas):
        k = int(result.cls["trivial"][:, :, a].any(axis=1).sum())
        if k:
            messages.append(
                f"CLS at alpha={alpha}: the calibration side had too few cases in {k} of {S} split(s) "
                f"(at most {int(result.cls['n_cal'].max())} {'lesion ' if cfg.empty == 'exclude' else ''}case(s); "
                f"at least {min_calibration_size(alpha)} are needed). Those points are trivial (whole-image mask) "
                f"and reported as such. Fix: add cases or raise --cal-fraction / alpha.")
    for e, eps in enumerate(cfg.epsilons):
        k = int(result.crc["trivial"][:, e].sum())
        if k:
            if as_fraction(eps) == 0:
                reason = "expected-FNR control needs epsilon > 0"
            else:
                reason = (f"the calibration side had too few cases (at least "
                          f"{max(0, math.ceil(1 / as_fraction(eps) - 1))} are needed)")
            messages.append(f"Expected-FNR control at epsilon={eps}: {reason} in {k} of {S} split(s). Those points "
                            f"are trivial (whole-image mask) and reported as such.")
    for name, modes in result.sets.items():
        for mode, arrays in modes.items():
            for a, alpha in enumerate(cfg.alphas):
                k = int(arrays["trivial"][:, a].sum())
                if k:
                    level = alpha / 2 if mode == "joint-split" else alpha
                    messages.append(
                        f"Confidence sets ({name}, {mode}) at alpha={alpha}: {result.n_cal} calibration case(s) "
                        f"are too few in {k} of {S} split(s) (at least {min_calibration_size(level)} are needed). "
                        f"Those points are trivial (empty inner set / whole-image outer set).")
    return messages
