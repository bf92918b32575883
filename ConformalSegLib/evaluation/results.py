"""What an evaluation returns: its configuration, per-split arrays, summary rows and PASS/CHECK verdicts.

:class:`EvaluationResult` holds every number :func:`~ConformalSegLib.evaluation.protocol.evaluate_dataset`
computed (shapes in its docstring), :meth:`EvaluationResult.summary_rows` the mean and standard deviation
over splits of each metric, and :meth:`EvaluationResult.to_dict` the plain-JSON form of ``results.json``.
:func:`binomial_tolerance` and :func:`coverage_status` are the yardstick of the verdicts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.jsonable import jsonable
from ..conformal.exact import as_fraction, min_calibration_size
from .config import EvaluationConfig

__all__ = [
    "BASELINE_CUTOFF",
    "EvaluationResult",
    "binomial_tolerance",
    "coverage_status",
    "mean_std",
    "trivial_warnings",
]

#: The fixed threshold of the baseline segmentation.
BASELINE_CUTOFF = 0.5


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
    """Everything :func:`~ConformalSegLib.evaluation.protocol.evaluate_dataset` computed; per-split arrays are
    kept for plots.

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
    lesion: dict[str, np.ndarray] = field(default_factory=dict)  # lesion-level method (see .lesion_protocol)
    bands: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # slider-safe bands: "cls", "lesion"
    lesionwise: dict[str, Any] = field(default_factory=dict)  # method -> lesion-wise metrics

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
        rows: list[dict[str, Any]] = []
        for e, eps in enumerate(self.config.epsilons):
            rows += self._threshold_rows(e, eps)
            rows += self._lesion_rows(e, eps)
        rows += self._band_rows()
        for name, modes in self.sets.items():
            for mode, arrays in modes.items():
                rows += self._sets_rows(name, mode, arrays)
        return rows

    def _lesion_rows(self, e: int, eps: float) -> list[dict[str, Any]]:
        """Lesion-level rows (one per alpha) of epsilon ``eps``: the guarantee is on ``lesion_ecr``."""
        if not self.lesion:
            return []
        n_l = float(np.mean(self.lesion["n_test"]))
        rows = []
        for a, alpha in enumerate(self.config.alphas):
            keys = ("lesion_ecr", "missed_rate", "ecr", "fnr", "pc", "dice")
            metrics = {k: _stats(self.lesion[k][:, e, a]) for k in keys}
            trivial = int(self.lesion["trivial"][:, e, a].sum())
            status = (
                "trivial"
                if trivial == self.config.splits
                else coverage_status(metrics["lesion_ecr"]["mean"], alpha, n_l)
            )
            rows.append(
                {
                    "method": "lesion",
                    "epsilon": eps,
                    "alpha": alpha,
                    "voxel_epsilon": self.config.voxel_epsilon,
                    "detect_fraction": self.config.detect_fraction,
                    "cutoff": _stats(_finite_or_nan(self.lesion["cutoff"][:, e, a])),
                    "trivial_splits": trivial,
                    "target": 1 - alpha,
                    "tolerance": binomial_tolerance(alpha, n_l),
                    "status": status,
                    "metrics": metrics,
                }
            )
        return rows

    def _band_rows(self) -> list[dict[str, Any]]:
        """Slider-safe band rows (one per method and alpha): the guarantee is on ``simultaneous_ecr``."""
        rows = []
        for method, band in self.bands.items():
            n_t = float(np.mean(self.lesion["n_test"] if method == "lesion" else self.cls["n_test"]))
            for a, alpha in enumerate(self.config.alphas):
                metrics: dict[str, Any] = {k: _stats(band[k][:, a]) for k in ("simultaneous_ecr", "posthoc_ecr")}
                metrics["pc_by_epsilon"] = [_stats(band["pc"][:, e, a]) for e in range(len(self.config.epsilons))]
                trivial = int(band["trivial"][:, :, a].all(axis=1).sum())
                status = (
                    "trivial"
                    if trivial == self.config.splits
                    else coverage_status(metrics["simultaneous_ecr"]["mean"], alpha, n_t)
                )
                rows.append(
                    {
                        "method": f"{method}-slider-safe",
                        "epsilon": list(self.config.epsilons),
                        "alpha": alpha,
                        "level": _stats(band["level"][:, a].astype(np.float64)),
                        "trivial_splits": trivial,
                        "target": 1 - alpha,
                        "tolerance": binomial_tolerance(alpha, n_t),
                        "status": status,
                        "metrics": metrics,
                    }
                )
        return rows

    def lesionwise_rows(self) -> list[dict[str, Any]]:
        """Lesion-wise metrics of every method at the main setting (mean / std over splits)."""
        cfg = self.config
        e, a = cfg.main_epsilon_index, cfg.main_alpha_index
        rows = []
        for method, metrics in self.lesionwise.items():
            if method == "lesions_per_class":
                continue
            ecr, missed = metrics["lesion_ecr"], metrics["missed_rate"]
            at_main = (lambda x: x[:, e, a]) if ecr.ndim == 3 else (lambda x: x[:, e])
            rows.append(
                {
                    "method": method,
                    "epsilon": cfg.main_epsilon,
                    "alpha": cfg.main_alpha if ecr.ndim == 3 else None,
                    "lesion_ecr": _stats(at_main(ecr)),
                    "missed_rate": _stats(at_main(missed)),
                    "sensitivity": {name: _stats(v) for name, v in metrics["sensitivity"].items()},
                    "fp_components": _stats(metrics["fp_components"]),
                    "fp_ml": _stats(metrics["fp_ml"]),
                }
            )
        return rows

    def _threshold_rows(self, e: int, eps: float) -> list[dict[str, Any]]:
        """Baseline, CRC and CLS (one per alpha) rows of epsilon ``eps`` (index ``e``)."""
        cfg = self.config
        n_pop = self.mean_population_test
        rows: list[dict[str, Any]] = [
            {
                "method": "baseline",
                "epsilon": eps,
                "alpha": None,
                "cutoff": BASELINE_CUTOFF,
                "trivial_splits": 0,
                "metrics": {
                    "ecr": _stats(self.baseline["ecr"][:, e]),
                    "fnr": _stats(self.baseline["fnr"]),
                    "pc": _stats(self.baseline["pc"]),
                    "dice": _stats(self.baseline["dice"]),
                    "hd95": _stats(self.baseline["hd95"]),
                    "hd95_excluded_per_split": float(np.mean(self.baseline["hd95_excluded"])),
                },
            },
            {
                "method": "crc",
                "epsilon": eps,
                "alpha": None,
                "cutoff": _stats(_finite_or_nan(self.crc["cutoff"][:, e])),
                "trivial_splits": int(self.crc["trivial"][:, e].sum()),
                "metrics": {k: _stats(self.crc[k][:, e]) for k in ("ecr", "fnr", "pc", "dice")},
            },
        ]
        for a, alpha in enumerate(cfg.alphas):
            metrics: dict[str, Any] = {k: _stats(self.cls[k][:, e, a]) for k in ("ecr", "fnr", "pc", "dice")}
            if e == cfg.main_epsilon_index and a == cfg.main_alpha_index and cfg.hd95:
                metrics["hd95"] = _stats(self.cls["hd95"])
                metrics["hd95_excluded_per_split"] = float(np.mean(self.cls["hd95_excluded"]))
            trivial = int(self.cls["trivial"][:, e, a].sum())
            status = "trivial" if trivial == cfg.splits else coverage_status(metrics["ecr"]["mean"], alpha, n_pop)
            rows.append(
                {
                    "method": "cls",
                    "epsilon": eps,
                    "alpha": alpha,
                    "cutoff": _stats(_finite_or_nan(self.cls["cutoff"][:, e, a])),
                    "trivial_splits": trivial,
                    "target": 1 - alpha,
                    "tolerance": binomial_tolerance(alpha, n_pop),
                    "status": status,
                    "metrics": metrics,
                }
            )
        return rows

    def _sets_rows(self, name: str, mode: str, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Confidence-set rows (one per alpha) of transform ``name`` in ``mode``."""
        rows = []
        for a, alpha in enumerate(self.config.alphas):
            metrics = {
                k: _stats(arrays[k][:, a])
                for k in (
                    "inner_coverage",
                    "outer_coverage",
                    "joint_coverage",
                    "inner_voxels",
                    "outer_voxels",
                    "inner_ml",
                    "outer_ml",
                )
            }
            trivial = int(arrays["trivial"][:, a].sum())
            status = "trivial" if trivial == self.config.splits else _sets_status(metrics, mode, alpha, self.n_test)
            rows.append(
                {
                    "method": "sets",
                    "transform": name,
                    "mode": mode,
                    "epsilon": None,
                    "alpha": alpha,
                    "trivial_splits": trivial,
                    "target": 1 - alpha,
                    "tolerance": binomial_tolerance(alpha, self.n_test),
                    "status": status,
                    "metrics": metrics,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON content (lists, numbers, strings, ``None`` for NaN and infinities)."""
        cfg = self.config
        return jsonable(
            {
                "config": {
                    "epsilons": list(cfg.epsilons),
                    "alphas": list(cfg.alphas),
                    "main_alpha": cfg.main_alpha,
                    "main_epsilon": cfg.main_epsilon,
                    "splits": cfg.splits,
                    "cal_fraction": cfg.cal_fraction,
                    "seed": cfg.seed,
                    "transforms": list(cfg.transforms),
                    "set_modes": list(cfg.set_modes),
                    "hd95": cfg.hd95,
                    "empty": cfg.empty,
                    "baseline_cutoff": BASELINE_CUTOFF,
                    "detect_fraction": cfg.detect_fraction,
                    "voxel_epsilon": cfg.voxel_epsilon,
                    "score": cfg.score,
                },
                "dataset": {
                    "n_cases": self.n_cases,
                    "n_empty_lesions": self.n_empty_lesions,
                    "n_cal": self.n_cal,
                    "n_test": self.n_test,
                    "case_ids": list(self.case_ids),
                    "lesion_sizes": self.lesion_sizes,
                    "n_voxels": self.n_voxels,
                    "voxel_ml": self.voxel_ml,
                    "population": self.population,
                },
                "summary": self.summary_rows(),
                "lesionwise": self.lesionwise_rows(),
                "per_split": {
                    "cls": self.cls,
                    "crc": self.crc,
                    "baseline": self.baseline,
                    "sets": self.sets,
                    "lesion": self.lesion,
                    "bands": self.bands,
                    "lesionwise": self.lesionwise,
                },
                "per_case": self.per_case,
                "splits_test_mask": self.test_mask,
                "warnings": list(self.warnings),
                "notes": {
                    "non_finite": "null stands for NaN (undefined, e.g. no test case) and for infinite "
                    "cutoffs/thresholds (see the 'trivial' flags: -inf cutoff = whole image)"
                },
            }
        )


def _stats(array: np.ndarray) -> dict[str, float]:
    mean, std = mean_std(array)
    return {"mean": float(mean), "std": float(std)}


def _sets_status(metrics: dict[str, dict[str, float]], mode: str, alpha: float, n_test: int) -> str:
    if mode == "marginal":
        states = [coverage_status(metrics[k]["mean"], alpha, n_test) for k in ("inner_coverage", "outer_coverage")]
        return "n/a" if "n/a" in states else ("PASS" if all(s == "PASS" for s in states) else "CHECK")
    return coverage_status(metrics["joint_coverage"]["mean"], alpha, n_test)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def trivial_warnings(result: EvaluationResult) -> list[str]:
    """One message per method and setting whose calibration was trivial in some splits (too few cases)."""
    cfg = result.config
    S = cfg.splits
    messages = []
    ties = int(np.count_nonzero(np.isfinite(result.cls["cutoff"]) & (result.cls["cutoff"] <= 0)))
    if ties:
        messages.append(
            f"CLS: {ties} (split, epsilon, alpha) point(s) have the cutoff 0 because lesion voxels are tied at "
            "probability 0 (saturated or quantised maps): their mask is the whole image. Calibrate on unquantised "
            "maps or logits."
        )
    for a, alpha in enumerate(cfg.alphas):
        k = int(np.isneginf(result.cls["cutoff"][:, :, a]).any(axis=1).sum())
        if k:
            messages.append(
                f"CLS at alpha={alpha}: the calibration side had too few cases in {k} of {S} split(s) "
                f"(at most {int(result.cls['n_cal'].max())} {'lesion ' if cfg.empty == 'exclude' else ''}case(s); "
                f"at least {min_calibration_size(alpha)} are needed). Those points are trivial (whole-image mask) "
                f"and reported as such. Fix: add cases or raise --cal-fraction / alpha."
            )
    for e, eps in enumerate(cfg.epsilons):
        k = int(np.isneginf(result.crc["cutoff"][:, e]).sum())
        if k:
            if as_fraction(eps) == 0:
                reason = "expected-FNR control needs epsilon > 0"
            else:
                reason = (
                    f"the calibration side had too few cases (at least "
                    f"{max(0, math.ceil(1 / as_fraction(eps) - 1))} are needed)"
                )
            messages.append(
                f"Expected-FNR control at epsilon={eps}: {reason} in {k} of {S} split(s). Those points "
                f"are trivial (whole-image mask) and reported as such."
            )
    for a, alpha in enumerate(cfg.alphas):
        k = int(result.lesion["trivial"][:, :, a].any(axis=1).sum()) if result.lesion else 0
        if k:
            messages.append(
                f"Lesion-level control at alpha={alpha}: the calibration side had too few scans with a lesion in "
                f"{k} of {S} split(s) (at least {min_calibration_size(alpha)} are needed). Those points are trivial "
                "(whole-image mask) and reported as such."
            )
    for name, modes in result.sets.items():
        for mode, arrays in modes.items():
            for a, alpha in enumerate(cfg.alphas):
                k = int(arrays["trivial"][:, a].sum())
                if k:
                    level = alpha / 2 if mode == "joint-split" else alpha
                    messages.append(
                        f"Confidence sets ({name}, {mode}) at alpha={alpha}: {result.n_cal} calibration case(s) "
                        f"are too few in {k} of {S} split(s) (at least {min_calibration_size(level)} are needed). "
                        f"Those points are trivial (empty inner set / whole-image outer set)."
                    )
    return messages
