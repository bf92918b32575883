"""Calibrate a profile from a stream of cases (a dataset folder, or cases produced in memory).

Cases are consumed one at a time: only the compact summaries (sorted lesion probabilities and,
for confidence sets, two numbers per case) are kept, so peak memory stays near one case's volumes
whatever the number of cases.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, cast

import numpy as np

from ..common.errors import ConformalSegError
from ..common.executors import ExecutorSpec, MapReport, ProgressCallback, map_ordered
from ..common.geometry import Geometry
from .case_summaries import MergedSummaries, merge_case_summaries, summarize_case, summarize_dataset_case
from .cls import ThresholdCalibration, calibrate_cls
from .confidence_sets import SetsCalibration, SetStatistics, calibrate_sets
from .crc import calibrate_crc
from .exact import check_alpha, check_detect_fraction, check_epsilon
from .fp_summaries import DEFAULT_FP_ML_CAP, FalsePositiveSummaries
from .lesion_level import (
    DEFAULT_DETECT_FRACTION,
    LesionLevelSummaries,
    calibrate_lesion,
    check_min_size,
)
from .ltt import RiskData, calibrate_ltt, parse_risks
from .profile import METHODS, CalibrationProfile
from .rcps import BOUNDS, calibrate_rcps
from .score_transforms import parse_transform
from .summaries import LesionSummaries
from .threshold_scores import DEFAULT_SCORE, parse_threshold_score
from .ties import TIE_BREAKING, calibrate_cls_ties, calibrate_crc_ties


@dataclass(frozen=True)
class CalibrationRequest:
    """Method and parameters of one calibration (CLI flags map one to one onto these fields)."""

    method: str
    epsilon: float | None = None
    alpha: float | None = None
    alpha_inner: float | None = None
    alpha_outer: float | None = None
    joint: str | None = None  # None (marginal), "split" or "max"
    inner_transform: str = "identity"
    outer_transform: str = "identity"
    empty: str | None = None  # default: exclude for cls/crc/lesion, include for sets
    precision: str = "float32"
    provenance: dict[str, Any] = field(default_factory=dict)
    detect_fraction: float = DEFAULT_DETECT_FRACTION  # lesion: share of a lesion's voxels that finds it
    voxel_epsilon: float | None = None  # lesion: joint with the voxel FNR at this tolerance
    min_lesion_voxels: int = 0  # lesion: smaller lesions are not counted
    min_lesion_mm3: float = 0.0
    pac_delta: float | None = None  # cls, lesion, sets: calibration-conditional (PAC) at confidence 1 - pac_delta
    delta: float | None = None  # rcps: confidence 1 - delta over the calibration draw
    bound: str = "hb"  # rcps: hb (Hoeffding-Bentkus) or wsr (Waudby-Smith-Ramdas)
    risks: tuple[str, ...] = ()  # ltt: NAME=TARGET, NAME in fnr, lesion-miss, fp-ml, fp-components
    fp_ml_cap: float = DEFAULT_FP_ML_CAP  # ltt fp-ml: each scan's false-positive volume counted up to this (mL)
    tie_breaking: str = "none"  # cls, crc: "random" breaks probability ties with seeded keys (:mod:`.ties`)
    tie_seed: int = 0
    score: str = DEFAULT_SCORE  # threshold methods: the score thresholded (:mod:`.threshold_scores`)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConformalSegError(f"unknown method {self.method!r}", fix=f"use one of {', '.join(METHODS)}")
        if self.method == "ltt":
            if self.delta is None:
                raise ConformalSegError("--method ltt needs --delta (e.g. 0.1) and --risk NAME=TARGET (repeatable)")
            check_alpha(self.delta, "delta")
            parse_risks(self.risks)
            if self.empty is not None:
                raise ConformalSegError("--method ltt sets each risk's scans itself", fix="leave out --empty")
        if self.method == "rcps":
            if self.epsilon is None or self.delta is None:
                raise ConformalSegError("--method rcps needs --epsilon (the FNR tolerance) and --delta (e.g. 0.1)")
            check_alpha(self.delta, "delta")
            if self.bound not in BOUNDS:
                raise ConformalSegError(f"unknown bound {self.bound!r}", fix=f"use one of {', '.join(BOUNDS)}")
        if self.method in ("cls", "crc", "lesion") and self.epsilon is None:
            what = "missed-lesion" if self.method == "lesion" else "FNR"
            raise ConformalSegError(f"--method {self.method} needs --epsilon (the {what} tolerance, e.g. 0.1)")
        if self.method in ("cls", "lesion") and self.alpha is None:
            raise ConformalSegError(f"--method {self.method} needs --alpha (the risk level, e.g. 0.1)")
        if self.method == "lesion":
            check_detect_fraction(self.detect_fraction)
            check_min_size(self.min_lesion_voxels, self.min_lesion_mm3)
            if self.voxel_epsilon is not None:
                check_epsilon(self.voxel_epsilon)
            if self.empty == "include":
                raise ConformalSegError(
                    "--method lesion calibrates on scans with a lesion only", fix="leave out --empty include"
                )
        if self.pac_delta is not None:
            if self.method in ("crc", "rcps"):
                raise ConformalSegError(
                    "--pac-delta does not apply to --method crc (an expected-risk guarantee)",
                    fix="use --method cls for a per-scan guarantee with PAC confidence",
                )
            check_alpha(self.pac_delta, "pac_delta")
        check_tie_request(self.method, self.tie_breaking, self.precision)
        if self.joint not in (None, "split", "max"):
            raise ConformalSegError(f"unknown joint method {self.joint!r}", fix="use split or max")
        parse_transform(self.inner_transform)
        parse_transform(self.outer_transform)
        if parse_threshold_score(self.score).name != self.score:
            raise ConformalSegError(
                f"score {self.score!r} is not in its canonical form",
                fix=f"use {parse_threshold_score(self.score).name}",
            )
        if self.method == "sets" and self.score != DEFAULT_SCORE:
            raise ConformalSegError(
                "--score is for the threshold methods; confidence sets choose their score with --transform",
                fix=f"use --transform {self.score}",
            )

    @property
    def empty_policy(self) -> str:
        return self.empty or ("include" if self.method == "sets" else "exclude")

    @property
    def sets_mode(self) -> str:
        return {None: "marginal", "split": "joint-split", "max": "joint-max"}[self.joint]


def _parts(case: Any) -> tuple[str, np.ndarray, np.ndarray, Geometry]:
    """Accept io.Case (Volume members) or any object with arrays and a geometry."""
    probability, lesion = case.probability, case.lesion
    geometry = cast(Geometry, getattr(case, "geometry", None))  # None is fine for CLS / CRC
    if hasattr(probability, "array"):
        geometry = probability.geometry
        probability, lesion = probability.array, lesion.array
    return case.case_id, probability, lesion, geometry


def calibrate(cases: Iterable[Any], request: CalibrationRequest) -> CalibrationProfile:
    """Stream ``cases`` once, build summaries, and calibrate the requested method."""
    parts = [summarize_case(*_parts(case), request) for case in cases]
    return calibrate_summaries(merge_case_summaries(parts, request), request)


def calibrate_dataset(
    dataset: Any,
    request: CalibrationRequest,
    spec: ExecutorSpec | None = None,
    *,
    progress: ProgressCallback | None = None,
    keep_going: bool = False,
    extras: Callable[[Any], Any] | None = None,
    collect: Callable[[str, Any], None] | None = None,
) -> CalibrationProfile:
    """Calibrate on a dataset's cases, each read and summarized on a worker of ``spec`` (serial by default).

    ``dataset`` has ``case_ids`` and ``load(case_id)`` (an ``io.dataset.CalibrationDataset``); it is sent to
    each worker once. The summaries are merged in case order and the thresholds computed here, exactly as
    :func:`calibrate` does: the profile is bit-identical whatever the executor. The provenance records the
    executor and its number of workers. ``extras(case)`` (picklable) runs on the worker on each loaded case;
    ``collect(case_id, extra)`` receives its results here, in case order (deployment features, volumes).
    """
    spec = spec or ExecutorSpec()
    shipped = copy.copy(dataset)
    shipped.progress = None  # a terminal callback stays on the driver
    report = MapReport(spec.name, 1, [])
    parts = map_ordered(
        summarize_dataset_case,
        (shipped, request, extras),
        list(dataset.case_ids),
        spec,
        progress=progress,
        keep_going=keep_going,
        report=report,
    )
    if hasattr(dataset, "labels_seen"):
        dataset.labels_seen.update({p.case_id: p.labels_seen for p in parts if p.labels_seen is not None})
        dataset.check_lesion_labels_seen()
    if hasattr(dataset, "without_geometry"):  # recorded on the workers' copies: bring it back to the driver
        dataset.without_geometry.update(p.case_id for p in parts if p.without_geometry)
    if collect is not None:
        for part in parts:
            collect(part.case_id, part.extra)
    request = replace(request, provenance={**request.provenance, **report.provenance()})
    return calibrate_summaries(merge_case_summaries(parts, request), request)


def calibrate_summaries(merged: MergedSummaries, request: CalibrationRequest) -> CalibrationProfile:
    """The exact thresholds of ``request.method`` from the merged per-scan summaries."""
    lesion_summaries, sets, lesions = merged.lesion, merged.sets, merged.lesion_level
    fp_summaries = merged.fp
    if lesion_summaries.n == 0:
        raise ConformalSegError("no calibration cases found", fix="check the --probs and --labels folders")
    empty = request.empty_policy
    calibration: ThresholdCalibration | SetsCalibration
    stats: SetStatistics | None = None
    lesion_level = None
    if request.method in ("cls", "crc", "rcps", "ltt"):
        calibration, lesion_level = _voxel_calibration(request, lesion_summaries, lesions, fp_summaries)
    elif request.method == "lesion":
        assert lesions is not None and request.epsilon is not None and request.alpha is not None
        lesion_level = lesions
        calibration = calibrate_lesion(
            lesion_level,
            request.epsilon,
            request.alpha,
            voxel_epsilon=request.voxel_epsilon,
            voxel_summaries=lesion_summaries,
            pac_delta=request.pac_delta,
        )
    else:
        assert sets is not None
        stats = sets
        calibration = calibrate_sets_request(stats, request)
    provenance = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **request.provenance}
    return CalibrationProfile(
        calibration,
        lesion_summaries,
        stats,
        empty,
        provenance,
        lesion_level,
        false_positives=fp_summaries,
        score=request.score,
    )


def calibrate_sets_request(stats: SetStatistics, request: CalibrationRequest) -> SetsCalibration:
    """The confidence sets ``request`` asks for, from the per-scan set statistics (lesion-free scans left out
    unless ``empty_policy`` is ``include``); shared with :mod:`ConformalSegLib.conformal.mask_sets`."""
    used = stats if request.empty_policy == "include" else stats.without_empty()
    return calibrate_sets(
        used,
        alpha=request.alpha,
        alpha_inner=request.alpha_inner,
        alpha_outer=request.alpha_outer,
        mode=request.sets_mode,
        pac_delta=request.pac_delta,
    )


def _voxel_calibration(
    request: CalibrationRequest,
    lesion_summaries: LesionSummaries,
    lesions: LesionLevelSummaries | None,
    fp_summaries: FalsePositiveSummaries | None,
) -> tuple[ThresholdCalibration, LesionLevelSummaries | None]:
    """The threshold of cls, crc (randomised tie-breaking or not), rcps and ltt, and the lesion-level
    summaries LTT's lesion-miss risk built (None otherwise)."""
    calibration: ThresholdCalibration
    lesion_level = None
    if request.tie_breaking == "random":
        assert request.epsilon is not None  # checked in __post_init__
        calibration = (
            calibrate_crc_ties(lesion_summaries, request.epsilon, seed=request.tie_seed, empty=request.empty_policy)
            if request.method == "crc"
            else calibrate_cls_ties(
                lesion_summaries,
                request.epsilon,
                cast(float, request.alpha),
                seed=request.tie_seed,
                empty=request.empty_policy,
                pac_delta=request.pac_delta,
            )
        )
    elif request.method == "cls":
        assert request.epsilon is not None and request.alpha is not None  # checked in __post_init__
        calibration = calibrate_cls(
            lesion_summaries, request.epsilon, request.alpha, empty=request.empty_policy, pac_delta=request.pac_delta
        )
    elif request.method == "crc":
        assert request.epsilon is not None  # checked in __post_init__
        calibration = calibrate_crc(lesion_summaries, request.epsilon, empty=request.empty_policy)
    elif request.method == "ltt":
        assert request.delta is not None  # checked in __post_init__
        lesion_level = lesions
        data = RiskData(lesion_summaries, lesion_level, fp_summaries)
        calibration = calibrate_ltt(data, parse_risks(request.risks), request.delta)
    else:
        assert request.method == "rcps" and request.epsilon is not None and request.delta is not None
        calibration = calibrate_rcps(
            lesion_summaries, request.epsilon, request.delta, bound=request.bound, empty=request.empty_policy
        )
    return calibration, lesion_level


def check_tie_request(method: str, tie_breaking: str, precision: str) -> None:
    """Randomised tie-breaking is for cls and crc on float32 summaries (:mod:`.ties`); refused elsewhere."""
    if tie_breaking not in TIE_BREAKING:
        raise ConformalSegError(f"unknown tie-breaking {tie_breaking!r}", fix=f"use one of {', '.join(TIE_BREAKING)}")
    if tie_breaking == "none":
        return
    if method not in ("cls", "crc"):
        raise ConformalSegError(
            f"--tie-breaking random is implemented for --method cls and crc, not {method}",
            fix="leave out --tie-breaking, or calibrate on unquantised maps or logits",
        )
    if precision != "float32":
        raise ConformalSegError(
            "--tie-breaking random needs float32 summaries (uint16 rounding creates ties the maps do not have)",
            fix="leave out --precision uint16",
        )
