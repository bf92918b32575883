"""The reviewed-case loop: a profile grown by one reviewed scan, exactly as if calibrated on the grown set.

After a radiologist corrects a segmentation, the scan (its probability map and the corrected lesion)
can join the calibration set. :func:`add_case` returns a **new** profile whose summaries are the old
ones with the case's summaries appended (computed by the same builders, with the profile's own
precision, score transforms or threshold score, detection fraction and lesion-size filter) and whose thresholds are
recalibrated at the profile's parameters. Because calibration depends on the cases only through these
per-case summaries, concatenated in case order, the result is bit for bit the profile that
:func:`ConformalSegLib.conformal.calibration.calibrate` gives on the grown case list from scratch
(tested for CLS, expected-FNR control, lesion-level and confidence sets).

The old profile is never modified. The new one carries a provenance chain: ``provenance
["reviewed_cases"]`` lists, for every added case, its id, the SHA-256 of the profile file it was
added to, and the UTC time.

Guarantee: unchanged in form, with ``n + 1`` calibration scans, **provided the reviewed cases are
exchangeable with the new scans**: adding only the scans a reader found hard (or only the easy ones)
breaks that assumption and with it the guarantee. Group-conditional (Mondrian) and weighted profiles
are refused (their groups or weights for the new case are not known here).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .confidence_sets import SetStatistics, SetStatisticsBuilder
from .lesion_level import LesionLevelBuilder, LesionLevelSummaries
from .profile import CalibrationProfile
from .score_transforms import parse_transform
from .summaries import LesionSummaries, SummaryBuilder, check_probabilities
from .threshold_scores import DEFAULT_SCORE, threshold_scores


def _append_offsets(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.concatenate([old, old[-1] + new[1:]]).astype(np.int64)


def _grown_summaries(
    old: LesionSummaries, case_id: str, probability: np.ndarray, lesion: np.ndarray
) -> LesionSummaries:
    builder = SummaryBuilder(old.precision)
    builder.add_case(case_id, probability, lesion)
    one = builder.build()
    values = np.concatenate([old.values, one.values]).astype(one.values.dtype, copy=False)
    return LesionSummaries(
        values, _append_offsets(old.offsets, one.offsets), old.case_ids + one.case_ids, old.precision
    )


def _grown_sets(
    old: SetStatistics, case_id: str, probability: np.ndarray, lesion: np.ndarray, geometry: Geometry
) -> SetStatistics:
    builder = SetStatisticsBuilder(parse_transform(old.inner_transform), parse_transform(old.outer_transform))
    builder.add_case(case_id, probability, lesion, geometry)
    one = builder.build()
    return SetStatistics(
        np.concatenate([old.tau, one.tau]),
        np.concatenate([old.gamma, one.gamma]),
        old.case_ids + one.case_ids,
        old.inner_transform,
        old.outer_transform,
        np.concatenate([old.lesion_sizes, one.lesion_sizes]).astype(np.int64),
    )


def _grown_lesion_level(
    old: LesionLevelSummaries, case_id: str, probability: np.ndarray, lesion: np.ndarray, geometry: Geometry | None
) -> LesionLevelSummaries:
    builder = LesionLevelBuilder(old.detect_fraction, old.min_lesion_voxels, old.min_lesion_mm3)
    if geometry is None and old.min_lesion_mm3:
        raise ConformalSegError(
            f"case {case_id!r} has no voxel spacing, so the profile's lesion size filter in mm^3 cannot be applied",
            fix="give a NIfTI/NRRD probability map",
        )
    builder.add_case(case_id, probability, lesion, 1.0 if geometry is None else float(geometry.voxel_volume_mm3))
    one = builder.build()
    return LesionLevelSummaries(
        np.concatenate([old.values, one.values]).astype(np.float32, copy=False),
        np.concatenate([old.sizes, one.sizes]).astype(np.int64),
        _append_offsets(old.offsets, one.offsets),
        old.case_ids + one.case_ids,
        old.detect_fraction,
        old.min_lesion_voxels,
        old.min_lesion_mm3,
    )


def add_case(
    profile: CalibrationProfile,
    case_id: str,
    probability: np.ndarray,
    lesion: np.ndarray,
    geometry: Geometry | None,
    *,
    previous_sha256: str,
    added: str | None = None,
) -> CalibrationProfile:
    """``profile`` with one reviewed case appended and recalibrated at its own parameters (see module
    docstring); ``previous_sha256`` is the SHA-256 of the profile file the case is added to, ``added``
    the UTC time (default: now). The input profile is not changed."""
    if profile.groups is not None or profile.weighting is not None:
        raise ConformalSegError(
            "cases cannot be added to a group-conditional or weighted profile (the new case's group or weight "
            "is not known)",
            fix="re-calibrate with the reviewed case in the dataset",
        )
    case_id = str(case_id)
    if case_id in profile.summaries.case_ids:
        raise ConformalSegError(
            f"case {case_id!r} is already in the profile's calibration set",
            fix="give the reviewed case another id (a scan may be calibrated on only once)",
        )
    probability, lesion = np.asarray(probability), np.asarray(lesion, dtype=bool)
    if probability.shape != lesion.shape:
        raise ConformalSegError(
            f"the probability map {probability.shape} and the lesion {lesion.shape} have different shapes",
            fix="give the corrected lesion on the probability map's grid",
        )
    if geometry is not None and geometry.shape != probability.shape:
        raise ValueError("probability shape does not match its geometry")
    if profile.set_statistics is not None and geometry is None:
        raise ConformalSegError("a confidence-set profile needs the scan's geometry (voxel spacing)")
    if profile.score != DEFAULT_SCORE:  # a threshold profile calibrated on a score: the new case's score
        check_probabilities(probability, case_id)
        scored = threshold_scores(probability, geometry, profile.score)
    else:
        scored = probability
    summaries = _grown_summaries(profile.summaries, case_id, scored, lesion)
    stats = (
        _grown_sets(profile.set_statistics, case_id, probability, lesion, geometry)  # type: ignore[arg-type]
        if profile.set_statistics is not None
        else None
    )
    lesion_level = (
        _grown_lesion_level(profile.lesion_level, case_id, scored, lesion, geometry)
        if profile.lesion_level is not None
        else None
    )
    chain: list[dict[str, Any]] = list(profile.provenance.get("reviewed_cases") or [])
    chain.append(
        {
            "case_id": case_id,
            "previous_profile_sha256": str(previous_sha256),
            "added": added or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    grown = dataclasses.replace(
        profile,
        summaries=summaries,
        set_statistics=stats,
        lesion_level=lesion_level,
        provenance={**profile.provenance, "reviewed_cases": chain},
    )
    return grown.recalibrate()
