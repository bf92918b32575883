"""Organ-dependent uncertainty (sem-CRC) in the panel: segments -> organ label map -> the library's
:func:`ConformalSegLib.semcrc.apply_interval` -> table rows and the status text. No Slicer here.

An interval profile (``conformalseg calibrate --method sem-crc|sem-crc-organ|crc-interval|k-crc``)
names its organs (``lambda``: organ name -> value). In Slicer the organs come from any segmentation
node, whose segments are matched to the profile's organs:

* by segment **name**, case-insensitively and ignoring surrounding spaces (``"Liver "`` is
  ``liver``); several segments may match one organ (their union is the organ);
* a voxel in a matched segment belongs to that organ (where segments of two organs overlap, the
  organ listed first in the profile wins; the overlap is reported);
* every other voxel is ``"body"``, except for a profile calibrated with ``body: nonzero``
  (background excluded) when the segmentation also has a segment named ``body``: then only voxels in
  the body segment or an organ segment count, the rest is background, outside every guarantee (as
  at calibration);
* profile organs that no segment matches are reported (their voxels, if any, count as body), and
  so are segments that match nothing.

The label map handed to the library uses the profile's own label values (the smallest value of
each organ name) and, for body voxels, a positive value no organ uses, so the library computes the
memberships exactly as for a label-map file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.semcrc import BODY, IntervalApplication, IntervalProfile, apply_interval, load_interval_profile
from ConformalSegLib.semcrc.errors import IntervalInputError

#: Columns of the panel's sem-CRC table.
TABLE_COLUMNS: tuple[str, ...] = ("Organ", "Lambda", "Status", "Mean length", "Risk")
#: Methods whose groups are organs (the scan's organ segmentation is needed to apply them).
ORGAN_METHODS: tuple[str, ...] = ("sem-crc", "sem-crc-organ")


def normalize_name(name: str) -> str:
    """The matching key of a segment or organ name (case-insensitive, surrounding spaces ignored)."""
    return " ".join(str(name).split()).casefold()


def profile_organs(profile: IntervalProfile) -> tuple[str, ...]:
    """The organ names of a profile, in its group order, without ``"body"``."""
    return tuple(name for name in profile.organs.groups if name != BODY)


def organ_label_values(profile: IntervalProfile) -> dict[str, int]:
    """Organ name -> the (smallest) label value the profile maps to it."""
    values: dict[str, int] = {}
    for value in sorted(profile.organs.labels):
        values.setdefault(str(profile.organs.labels[value]), int(value))
    return values


def body_label_value(profile: IntervalProfile) -> int:
    """A positive label value that no organ of the profile uses (body voxels)."""
    return max((int(v) for v in profile.organs.labels), default=0) + 1


@dataclass(frozen=True)
class SegmentMatch:
    """Which segments (ids) make up each profile organ, and what matched nothing."""

    organs: dict[str, list[str]]  # profile organ -> segment ids, in profile order (matched organs only)
    unmatched_organs: list[str]  # profile organs no segment matched
    unused_segments: list[str]  # names of segments that match no organ (nor "body")
    body_segments: list[str] = field(default_factory=list)  # ids of segments named "body"

    @property
    def segment_ids(self) -> list[str]:
        """Every segment whose mask is needed (organ segments, then body segments)."""
        return [sid for ids in self.organs.values() for sid in ids] + list(self.body_segments)


def match_segments(segment_names: Mapping[str, str], organs: tuple[str, ...] | list[str]) -> SegmentMatch:
    """Match ``{segment id: segment name}`` to the profile's organ names (module docstring)."""
    keys = {normalize_name(organ): organ for organ in organs}
    matched: dict[str, list[str]] = {organ: [] for organ in organs}
    unused, body = [], []
    for segment_id, name in segment_names.items():
        key = normalize_name(name)
        if key in keys:
            matched[keys[key]].append(segment_id)
        elif key == BODY:
            body.append(segment_id)
        else:
            unused.append(str(name))
    return SegmentMatch(
        {o: ids for o, ids in matched.items() if ids}, [o for o, ids in matched.items() if not ids], unused, body
    )


def excludes_background(profile: IntervalProfile, match: SegmentMatch | None) -> bool:
    """True when voxels in no segment are background (``body: nonzero`` profile and a body segment)."""
    return profile.body == "nonzero" and match is not None and bool(match.body_segments)


def assemble_label_map(
    profile: IntervalProfile, match: SegmentMatch, masks: Mapping[str, np.ndarray], shape: tuple[int, ...]
) -> tuple[np.ndarray, int]:
    """The organ label map (int32, ``shape``) from per-segment masks ``{segment id: array}`` (nonzero =
    inside), and the number of voxels claimed by two organs (module docstring)."""
    values = organ_label_values(profile)
    body_value = body_label_value(profile)
    shape = tuple(int(s) for s in shape)

    def mask_of(segment_id: str) -> np.ndarray:
        if segment_id not in masks:
            raise IntervalInputError(f"no mask for segment {segment_id!r}", fix="pass every matched segment's mask")
        mask = np.asarray(masks[segment_id])
        if mask.shape != shape:
            raise IntervalInputError(
                f"segment {segment_id!r} has shape {mask.shape}, the quantile maps {shape}",
                fix="export the segments on the lower quantile volume's grid",
            )
        return mask != 0

    organ_masks = {}
    for organ, ids in match.organs.items():
        union = np.zeros(shape, dtype=bool)
        for segment_id in ids:
            union |= mask_of(segment_id)
        organ_masks[organ] = union
    if excludes_background(profile, match):
        labels = np.zeros(shape, dtype=np.int32)
        for segment_id in match.body_segments:
            labels[mask_of(segment_id)] = body_value
    else:
        labels = np.full(shape, body_value, dtype=np.int32)
    claimed = np.zeros(shape, dtype=bool)
    overlap = 0
    for organ in profile_organs(profile):  # profile order: an earlier organ wins an overlap
        if organ not in organ_masks:
            continue
        mask = organ_masks[organ]
        overlap += int(np.count_nonzero(mask & claimed))
        labels[mask & ~claimed] = values[organ]
        claimed |= mask
    return labels, overlap


# ----------------------------------------------------------------------------- apply and report


def format_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def table_rows(table: list[dict[str, Any]], with_risk: bool) -> list[tuple[str, ...]]:
    """The library's per-group table as the panel's rows (:data:`TABLE_COLUMNS`). A group without
    voxels in this scan shows ``n/a`` as mean length (and risk)."""
    rows = []
    for row in table:
        risk = format_number(row.get("risk"), 3) if with_risk else ""
        rows.append(
            (
                str(row["group"]),
                format_number(row["lambda"]),
                str(row["status"]),
                format_number(row.get("mean_length")),
                risk,
            )
        )
    return rows


@dataclass(frozen=True)
class IntervalOutcome:
    """Everything the panel shows after applying an interval profile to one scan."""

    profile: IntervalProfile
    application: IntervalApplication
    match: SegmentMatch | None
    labels: np.ndarray | None
    overlap_voxels: int
    rows: list[tuple[str, ...]]
    text: str
    has_warning: bool


def needs_organs(profile: IntervalProfile) -> bool:
    return profile.calibration.method in ORGAN_METHODS or profile.body == "nonzero"


def describe(
    profile: IntervalProfile, application: IntervalApplication, match: SegmentMatch | None, overlap: int
) -> tuple[str, bool]:
    """The status text (guarantee, what matched, what is not controlled) and whether it warns."""
    c = profile.calibration
    lines = [f"{c.method}, epsilon = {c.epsilon:g}: {c.guarantee}."]
    warn = False
    if match is not None:
        if match.organs:
            lines.append("Organs found in the segmentation: " + ", ".join(match.organs) + ".")
        if match.unmatched_organs:
            warn = True
            lines.append(
                "Profile organs with no segment of that name (their voxels count as body): "
                + ", ".join(match.unmatched_organs)
                + "."
            )
        if match.unused_segments:
            lines.append("Segments that match no organ (not used as organs): " + ", ".join(match.unused_segments) + ".")
        if excludes_background(profile, match):
            lines.append(
                "Voxels outside the body and organ segments are background (no guarantee), as at "
                "calibration (body: nonzero)."
            )
        elif profile.body == "nonzero":
            warn = True
            lines.append(
                "The profile excluded background at calibration (body: nonzero) but the segmentation "
                "has no 'body' segment: every voxel outside the organs counts as body."
            )
    if overlap:
        warn = True
        lines.append(
            f"{overlap} voxels lie in segments of two organs (the organ listed first in the profile was used)."
        )
    absent = [row["group"] for row in application.table if row["status"] != "controlled" and row["voxels"]]
    if absent:
        warn = True
        lines.append("Not controlled here (infinite intervals): " + ", ".join(absent) + ".")
    return " ".join(lines), warn


def apply_profile(
    profile: IntervalProfile,
    lower: np.ndarray,
    upper: np.ndarray,
    match: SegmentMatch | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    truth: np.ndarray | None = None,
) -> IntervalOutcome:
    """Assemble the organ label map (when ``match`` is given), call the library's ``apply_interval``
    and build the rows and text. ``masks``: ``{segment id: (z, y, x) array}`` of ``match.segment_ids``
    on the quantile maps' grid."""
    lower = np.asarray(lower)
    if np.asarray(upper).shape != lower.shape:
        raise IntervalInputError(
            f"lower and upper quantile maps differ in shape: {lower.shape} vs {np.asarray(upper).shape}",
            fix="choose the two quantile volumes of one scan",
        )
    if truth is not None and np.asarray(truth).shape != lower.shape:
        raise IntervalInputError(
            f"the ground truth has shape {np.asarray(truth).shape}, the quantile maps {lower.shape}",
            fix="choose the ground truth of the same scan, on the same grid",
        )
    if match is None and needs_organs(profile):
        raise IntervalInputError(
            f"a {profile.calibration.method} profile (body: {profile.body}) needs the scan's organ segmentation",
            fix="choose a segmentation whose segments are named like "
            "the profile's organs: " + ", ".join(profile_organs(profile)),
        )
    labels, overlap = (None, 0) if match is None else assemble_label_map(profile, match, masks or {}, lower.shape)
    application = apply_interval(profile, lower, upper, labels, truth=truth)
    text, warn = describe(profile, application, match, overlap)
    return IntervalOutcome(
        profile, application, match, labels, overlap, table_rows(application.table, truth is not None), text, warn
    )


@dataclass(frozen=True)
class AppliedIntervals:
    """What ``ConformalSegLogic.applyIntervalProfile`` returns: the outcome and the scene's output
    volumes (conformalised lower and upper bounds, interval length)."""

    outcome: IntervalOutcome
    lowerNode: Any
    upperNode: Any
    lengthNode: Any


def check_grids(lower: Geometry, others: Mapping[str, Geometry | None]) -> None:
    """Every given volume (``{what: geometry}``, None = not given) lies on the lower quantile map's grid."""
    for what, geometry in others.items():
        if geometry is None:
            continue
        mismatch = lower.mismatch(geometry)
        if mismatch:
            raise IntervalInputError(
                f"the {what} is not on the lower quantile volume's grid ({mismatch})",
                fix="resample it onto the lower quantile volume (module Resample Scalar Volume, "
                "or Crop Volume) or choose the volumes of one scan",
            )


def load_profile(path: str | PathLike[str]) -> IntervalProfile:
    """The interval profile at ``path`` (the library's loader and its errors)."""
    return load_interval_profile(path)
