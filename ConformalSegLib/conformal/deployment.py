"""The deployment parts of a calibration profile: its groups (:mod:`.mondrian`) and its weighting
(:mod:`.weighted`), written into and read from the profile's JSON and ``.npz``.

:mod:`.profile` calls these few functions, so that it stays about one calibration:

* JSON: a ``groups`` section (the grouping, and per group its name, ``n``, the scans it needs, its
  thresholds and its sentence) and/or a ``weighting`` section (the features, the logistic domain
  classifier's numbers, the cross-validated AUC, the effective sample size and the thresholds and
  sentence at the target scans' median weight);
* ``.npz``: ``groups_index`` (and ``groups_true_ml``, ``groups_predicted_ml`` for lesion-size groups);
  ``weighting_features`` and ``weighting_target_features``.

On load the group thresholds are recalibrated from the stored summaries and the weighting's reference
thresholds recomputed from the stored classifier and features; a difference means the file was edited,
and the profile is refused (as :mod:`.profile` does for the marginal threshold).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..common.errors import ConformalSegError
from ..common.jsonable import jsonable
from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration
from .mondrian import MondrianCalibration, calibrate_groups, mondrian_arrays, mondrian_json, read_mondrian
from .scan_scores import ProfileData
from .weighted import (
    Weighting,
    read_weighting,
    reference_weight,
    weighted_calibration,
    weighting_arrays,
    weighting_json,
)

FIX = "re-create it with `conformalseg calibrate`"


class DeployableProfile(ProfileData, Protocol):
    @property
    def calibration(self) -> ThresholdCalibration | SetsCalibration: ...

    @property
    def groups(self) -> MondrianCalibration | None: ...

    @property
    def weighting(self) -> Weighting | None: ...


def deployment_json(profile: DeployableProfile) -> dict[str, Any]:
    """The ``groups`` and ``weighting`` sections of the profile's JSON (none for a plain profile)."""
    doc: dict[str, Any] = {}
    if profile.groups is not None:
        doc["groups"] = mondrian_json(profile.groups)
    if profile.weighting is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = weighted_calibration(
                profile.calibration, profile, profile.weighting, reference_weight(profile.weighting)
            )
        doc["weighting"] = weighting_json(profile.weighting, reference)
    converted: dict[str, Any] = jsonable(doc, non_finite="inf-string")
    return converted


def deployment_arrays(profile: DeployableProfile) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if profile.groups is not None:
        arrays.update(mondrian_arrays(profile.groups))
    if profile.weighting is not None:
        arrays.update(weighting_arrays(profile.weighting))
    return arrays


def recalibrated_groups(
    profile: DeployableProfile, new: ThresholdCalibration | SetsCalibration
) -> MondrianCalibration | None:
    """The profile's groups recalibrated at the parameters of ``new`` (None without groups). No warning here:
    a too-small group says so in its own sentence, and the marginal calibration, which is what a plain
    recalibration (e.g. the Slicer slider) shows, is not affected by it."""
    if profile.groups is None:
        return None
    return calibrate_groups(profile.groups.grouping, new, profile, warn=False)


def read_deployment(
    doc: dict[str, Any], path: Path, profile: DeployableProfile
) -> tuple[MondrianCalibration | None, Weighting | None]:
    """The groups and weighting stored in a profile, checked against the stored summaries."""
    if "groups" not in doc and "weighting" not in doc:
        return None, None
    npz_path = path.with_name(str(doc["summaries"]["file"]))  # present and checksummed by the loader
    groups = weighting = None
    try:
        with np.load(npz_path, allow_pickle=False) as loaded:
            arrays = dict(loaded)
        if "groups" in doc:
            groups = read_mondrian(doc["groups"], arrays, profile.calibration)
        if "weighting" in doc:
            weighting = read_weighting(doc["weighting"], arrays, profile.summaries.n)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ConformalSegError(f"the profile's groups or weighting are corrupt ({exc})", path=path, fix=FIX) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if groups is not None:
            again = calibrate_groups(groups.grouping, profile.calibration, profile, warn=False)
            if again.thresholds() != groups.thresholds():
                raise ConformalSegError(
                    "the stored group thresholds do not follow from the stored summaries (edited by hand?)",
                    path=path,
                    fix=FIX,
                )
        if weighting is not None:
            _check_reference(doc["weighting"], weighting, profile, path)
    return groups, weighting


def _check_reference(section: dict[str, Any], weighting: Weighting, profile: DeployableProfile, path: Path) -> None:
    reference = weighted_calibration(profile.calibration, profile, weighting, reference_weight(weighting), warn=False)
    stored = jsonable(section.get("reference", {}), non_finite="inf-string")
    again = jsonable(weighting_json(weighting, reference)["reference"], non_finite="inf-string")
    if {k: stored.get(k) for k in again if k != "guarantee"} != {k: v for k, v in again.items() if k != "guarantee"}:
        raise ConformalSegError(
            "the stored weighted thresholds do not follow from the stored classifier and summaries (edited by hand?)",
            path=path,
            fix=FIX,
        )
