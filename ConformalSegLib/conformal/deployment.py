"""The deployment parts of a calibration profile: its groups (:mod:`.mondrian`) and its weighting
(:mod:`.weighted`), written into and read from the profile's JSON and ``.npz``.

:mod:`.profile` calls these few functions, so that it stays about one calibration; the group sections are
written and read here too (:func:`mondrian_json`, :func:`read_mondrian`), beside the weighting's:

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..common.errors import ConformalSegError
from ..common.jsonable import jsonable
from ..io.guards import LazyNpz
from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration
from .mondrian import (
    BY_FILE,
    BY_LESION_SIZE,
    GROUPINGS,
    PREDICTED_RULE,
    GroupCalibration,
    Grouping,
    MondrianCalibration,
    calibrate_groups,
    group_sentence,
    grouping_by_size,
)
from .scan_scores import ProfileData, rebuild
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


# ------------------------------------------------------------------------------------------ the groups


def _group_json(g: GroupCalibration, grouping: Grouping, predicted: bool) -> dict[str, Any]:
    c = g.calibration
    doc: dict[str, Any] = {"name": g.name, "n": g.n, "needed": g.needed, "more_needed": g.more_needed}
    if isinstance(c, SetsCalibration):
        doc.update(inner_threshold=c.inner_threshold, outer_threshold=c.outer_threshold)
    else:
        doc.update(n_excluded_empty=c.n_excluded_empty, probability_threshold=c.probability_threshold, rank=c.rank)
        if c.n_with_lesion is not None:
            doc["n_with_lesion"] = c.n_with_lesion
    doc["guarantee"] = group_sentence(g, grouping, predicted=predicted)
    return doc


def mondrian_json(m: MondrianCalibration) -> dict[str, Any]:
    """The ``groups`` section of a profile's JSON (infinite thresholds left as floats for the writer)."""
    g = m.grouping
    doc: dict[str, Any] = {"by": g.by, "names": list(g.names), "source": g.source}
    if g.by == BY_LESION_SIZE:
        doc.update(edges_ml=list(g.edges_ml), predicted_rule=PREDICTED_RULE)
    doc["groups"] = [_group_json(x, g, False) for x in m.groups]
    if m.predicted_groups:
        doc["predicted_groups"] = [_group_json(x, g, True) for x in m.predicted_groups]
    return doc


def mondrian_arrays(m: MondrianCalibration) -> dict[str, np.ndarray]:
    """The per-scan arrays of the grouping, for the profile's ``.npz``."""
    g = m.grouping
    arrays = {"groups_index": np.asarray(g.index, np.int64)}
    if g.true_ml is not None and g.predicted_ml is not None:
        arrays.update(groups_true_ml=g.true_ml, groups_predicted_ml=g.predicted_ml)
    return arrays


def _number(value: Any) -> float:
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def read_mondrian(
    doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray], like: ThresholdCalibration | SetsCalibration
) -> MondrianCalibration:
    """The groups of a loaded profile, with the thresholds as stored (the loader checks them against a
    recalibration). Raises ``KeyError``/``ValueError``/``TypeError`` on a malformed section."""
    by, names = str(doc["by"]), tuple(str(n) for n in doc["names"])
    if by not in GROUPINGS or not names:
        raise ValueError(f"unknown grouping {by!r}")
    index = np.asarray(arrays["groups_index"], np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(names)):
        raise ValueError("group index out of range")
    if by == BY_LESION_SIZE:
        edges = tuple(_number(e) for e in doc["edges_ml"])
        grouping = grouping_by_size(edges, arrays["groups_true_ml"], arrays["groups_predicted_ml"])
        if not np.array_equal(grouping.index, index) or grouping.names != names:
            raise ValueError("the lesion-size groups do not follow from the stored volumes")
    else:
        grouping = Grouping(BY_FILE, names, index, source=doc.get("source"))
    sections = [doc["groups"], doc.get("predicted_groups", [])]
    return MondrianCalibration(grouping, *[tuple(_read_group(s, like) for s in section) for section in sections])


def _read_group(doc: Mapping[str, Any], like: ThresholdCalibration | SetsCalibration) -> GroupCalibration:
    n = int(doc["n"])
    if isinstance(like, SetsCalibration):
        quantiles = {"inner": _number(doc["inner_threshold"]), "outer": -_number(doc["outer_threshold"])}
        if like.mode == "joint-max":
            quantiles = {"joint": quantiles["inner"]}
        return GroupCalibration(str(doc["name"]), rebuild(like, quantiles, n=n), int(doc["needed"]))
    rank, with_lesion = doc.get("rank"), doc.get("n_with_lesion")
    calibration = rebuild(
        like,
        {"cutoff": -_number(doc["probability_threshold"])},
        n=n,
        n_excluded=int(doc["n_excluded_empty"]),
        rank=None if rank is None else int(rank),
        n_with_lesion=None if with_lesion is None else int(with_lesion),
    )
    return GroupCalibration(str(doc["name"]), calibration, int(doc["needed"]))


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
    npz_path = path.with_name(doc["summaries"]["file"])  # a plain sibling name, present and checksummed (loader)
    groups = weighting = None
    try:
        with LazyNpz(npz_path, "summaries file") as arrays:  # only the arrays looked up are read
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
