"""Deployment options of ``calibrate`` and ``apply``: group-conditional (Mondrian) and weighted profiles.

``calibrate``:

* ``--groups FILE`` (a ``case_id,group`` CSV) or ``--group-by lesion-size:E1,E2,...`` (bins of the total
  lesion volume in mL): one threshold per group (:mod:`ConformalSegLib.conformal.mondrian`);
* ``--target-scans DIR``: unlabelled probability maps of the target site (``DIR`` itself, or ``DIR/probs``
  with optional ``DIR/images``), for a weighted profile (:mod:`ConformalSegLib.conformal.weighted`); with
  ``--feature-images DIR`` (the calibration scans' images) and ``DIR/images``, the domain classifier also
  sees an intensity histogram.

While the calibration cases stream by, :class:`DeploymentRecorder` keeps what these need of each case
(true and predicted lesion volumes, label-free features): no volume is kept.

``apply``: ``--group G`` picks a group of a group-conditional profile (for lesion-size groups, without it,
the predicted lesion volume does); a weighted profile computes the new scan's weight from its features
(``--feature-image`` gives its image when the profile's features include intensities).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.mondrian import (
    calibrate_groups,
    choose_group,
    group_sentence,
    grouping_by_size,
    grouping_from_table,
    parse_group_by,
    scan_volumes_ml,
)
from ..conformal.profile import CalibrationProfile
from ..conformal.scan_features import feature_names, scan_features
from ..conformal.threshold_scores import DEFAULT_SCORE, score_sentence
from ..conformal.weighted import Weighting, check_effective_size, fit_domain_classifier, weighted_calibration
from ..io.case_table import read_groups
from ..io.dataset import scan_folder
from ..io.dicom_series import load_image_input, load_probability_input
from ..io.volumes import Volume, load_image
from .common import progress_bar


def add_calibrate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guarantees that survive deployment (cls, crc, lesion, sets)")
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--groups", type=Path, help="CSV case_id,group (scanner, site, ...): one threshold and guarantee per group"
    )
    which.add_argument(
        "--group-by",
        metavar="lesion-size:BINS",
        help="one threshold per bin of the total lesion volume in mL, e.g. lesion-size:5,20 (bins [0,5), [5,20), "
        "[20,inf)); at apply time the predicted volume picks the bin",
    )
    g.add_argument(
        "--target-scans",
        type=Path,
        help="weighted profile (cls, lesion, sets): unlabelled probability maps of the target site (DIR or DIR/probs, "
        "optional DIR/images); calibration scans are re-weighted by a domain classifier",
    )
    g.add_argument(
        "--feature-images",
        type=Path,
        help="with --target-scans: images of the calibration scans (by case id), for intensity features",
    )
    g.add_argument("--weight-c", type=float, default=1.0, help="L2 inverse strength of the domain classifier (1)")


def add_apply_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group",
        help="group-conditional profiles: the new scan's group (lesion-size profiles: a bin name or a volume in mL; "
        "without it the predicted lesion volume picks the bin)",
    )
    p.add_argument("--feature-image", type=Path, help="weighted profiles with intensity features: the scan's image")


def _target_folders(root: Path) -> tuple[Path, Path | None]:
    if (root / "probs").is_dir():
        return root / "probs", (root / "images") if (root / "images").is_dir() else None
    if not root.is_dir():
        raise ConformalSegError("target scans folder not found", path=root, fix="give a folder of probability maps")
    return root, None


class DeploymentRecorder:
    """Gathers what groups or weighting need of each calibration case (its lesion volumes and/or features,
    computed by :meth:`extras` where the case is loaded and handed back to :meth:`collect`), then
    :meth:`attach` es the groups or the weighting to the profile."""

    def __init__(self, args: argparse.Namespace, cases: Any):
        self.args, self.cases = args, cases
        self.edges = parse_group_by(args.group_by) if args.group_by else None
        self.groups = read_groups(args.groups) if args.groups else None
        if self.groups is not None and hasattr(cases, "case_ids"):  # every scan needs a group: check before streaming
            grouping_from_table(cases.case_ids, self.groups, str(args.groups))
        self.volumes: dict[str, tuple[float, float]] = {}
        self.features: dict[str, np.ndarray] = {}
        self.images: dict[str, Path] | None = None
        self.target: tuple[list[str], np.ndarray] | None = None
        if args.target_scans is not None:
            if args.method not in ("cls", "lesion", "sets"):
                raise ConformalSegError(
                    f"weighted calibration supports cls, lesion and sets, not {args.method}",
                    fix="use --method cls (expected-FNR control has no per-scan score to weight)",
                )
            if self.groups is not None or self.edges is not None:
                raise ConformalSegError("give groups or --target-scans, not both (weighted groups are not supported)")
            if getattr(args, "pac_delta", None) is not None:
                raise ConformalSegError(
                    "a weighted profile's guarantee is marginal at the target site, not PAC",
                    fix="leave out --pac-delta with --target-scans",
                )
            if args.feature_images is not None:
                self.images = scan_folder(args.feature_images, probability=False)
            self.target = self._target_features(args.target_scans)

    def _target_features(self, root: Path) -> tuple[list[str], np.ndarray]:
        probs, images = _target_folders(root)
        if self.images is None:
            images = None  # intensity features only with --feature-images
        elif images is None:
            raise ConformalSegError(
                "--feature-images needs the target scans' images too, in DIR/images (and their maps in DIR/probs)",
                path=root,
                fix="put the target images in DIR/images, or leave out --feature-images",
            )
        maps = scan_folder(probs, probability=True)
        image_files = scan_folder(images, probability=False) if images is not None else {}
        progress = progress_bar("target scans")
        ids, rows = sorted(maps), []
        for done, cid in enumerate(ids, start=1):
            volume = load_probability_input(maps[cid], channel=self.args.channel)
            image = _image(image_files, cid, images) if images is not None else None
            rows.append(scan_features(volume.array, volume.geometry, image))
            progress(done, len(ids), cid)
        return ids, np.vstack(rows)

    def extras(self) -> Callable[[Any], tuple[Any, Any]]:
        """What each calibration case contributes besides its summary, computed where the case is loaded (a
        worker of ``--executor``; picklable): its lesion volumes (``--group-by``) and features (weighting)."""
        images = (self.images, self.args.feature_images) if self.images is not None else None
        return functools.partial(case_extras, self.edges is not None, self.target is not None, images)

    def collect(self, case_id: str, extra: tuple[Any, Any]) -> None:
        volumes, features = extra
        if volumes is not None:
            self.volumes[case_id] = volumes
        if features is not None:
            self.features[case_id] = features

    def attach(self, profile: CalibrationProfile) -> CalibrationProfile:
        """The profile with its groups or weighting (as the options asked)."""
        ids = profile.summaries.case_ids
        grouping = None
        if self.groups is not None:
            grouping = grouping_from_table(ids, self.groups, str(self.args.groups))
        elif self.edges is not None:
            volumes = np.array([self.volumes[c] for c in ids]).reshape(-1, 2)
            grouping = grouping_by_size(self.edges, volumes[:, 0], volumes[:, 1])
        if grouping is not None:
            return dataclasses.replace(profile, groups=calibrate_groups(grouping, profile.calibration, profile))
        if self.target is None:
            return profile
        names = feature_names(self.images is not None)
        source = np.vstack([self.features[c] for c in ids])
        classifier, auc = fit_domain_classifier(source, self.target[1], names, C=self.args.weight_c)
        weighting = Weighting(
            classifier, source, self.target[1], tuple(self.target[0]), auc, str(self.args.target_scans)
        )
        check_effective_size(weighting, profile.calibration, profile)
        return dataclasses.replace(profile, weighting=weighting)


def case_extras(
    volumes: bool, features: bool, images: tuple[dict[str, Path], Path] | None, case: Any
) -> tuple[Any, Any]:
    """``(lesion volumes in mL or None, scan features or None)`` of one loaded calibration case (module level,
    so that executor workers import it by name)."""
    probability, lesion = case.probability, case.lesion
    sizes = scan_volumes_ml(probability.array, lesion.array, probability.geometry) if volumes else None
    row = None
    if features:
        image = _image(images[0], case.case_id, images[1]) if images is not None else None
        row = scan_features(probability.array, probability.geometry, image)
    return sizes, row


def _image(files: dict[str, Path] | None, case_id: str, folder: Path | None) -> np.ndarray:
    if files is None or case_id not in files:
        raise ConformalSegError(
            f"no image for case {case_id!r}", path=folder, fix="give every scan's image, with the same case id"
        )
    return load_image(files[case_id]).array


def recorder_for(args: argparse.Namespace, cases: Any) -> DeploymentRecorder | None:
    """A recorder when a deployment option is given (checked before any case is read), else None."""
    if not (args.groups or args.group_by or args.target_scans):
        if args.feature_images is not None:
            raise ConformalSegError("--feature-images needs --target-scans")
        return None
    return DeploymentRecorder(args, cases)


def report(profile: CalibrationProfile) -> list[str]:
    """Lines describing the groups or the weighting of a new profile (for the terminal)."""
    lines = []
    if profile.groups is not None:
        m = profile.groups
        for g in m.groups:
            lines.append(f"- {g.name} (n = {g.n}): {group_sentence(g, m.grouping)}")
        for g in m.predicted_groups:
            lines.append(f"- predicted {g.name} (n = {g.n}): {group_sentence(g, m.grouping, predicted=True)}")
    if profile.weighting is not None:
        w = profile.weighting
        auc = "n/a" if w.auc is None else f"{w.auc:.3f}"
        median = float(np.median(w.target_weights))
        result = weighted_calibration(profile.calibration, profile, w, median, warn=False)
        lines.append(f"domain classifier: cross-validated AUC {auc} (0.5: no detectable shift)")
        lines.append(f"at the target scans' median weight {median:.3g}: {result.sentence}")
    return lines


def deploy_for_scan(
    args: argparse.Namespace, profile: CalibrationProfile, volume: Volume
) -> tuple[CalibrationProfile, dict[str, Any]]:
    """The profile whose calibration applies to this scan, and what apply.json records about the choice."""
    if getattr(args, "slider_safe", False) and (profile.groups is not None or profile.weighting is not None):
        raise ConformalSegError(
            "slider-safe bands are not available for group-conditional or weighted profiles",
            path=args.profile,
            fix="leave out --slider-safe",
        )
    if profile.groups is not None:
        choice = choose_group(profile.groups, args.group, volume.array, volume.geometry)
        info: dict[str, Any] = {"group": choice.group.name, "group_by_prediction": choice.predicted}
        if choice.predicted_ml is not None:
            info["predicted_volume_ml"] = choice.predicted_ml
        info["guarantee"] = choice.sentence + _score_note(profile, choice.group.calibration)
        return dataclasses.replace(profile, calibration=choice.group.calibration, groups=None), info
    if args.group is not None:
        raise ConformalSegError("--group applies to group-conditional profiles only", path=args.profile)
    if profile.weighting is None:
        return profile, {"guarantee": profile.guarantee}
    weighting = profile.weighting
    with_intensity = len(weighting.classifier.names) > len(feature_names(False))
    image = None
    if with_intensity:
        source = args.feature_image or getattr(args, "image", None)
        if source is None:
            raise ConformalSegError(
                "this weighted profile's features include the image's intensities", fix="pass --feature-image IMAGE"
            )
        series = getattr(args, "series_uid", None) if Path(source).is_dir() else None
        image = load_image_input(source, series).array  # a file or a DICOM series folder
    weight = weighting.weight_of(scan_features(volume.array, volume.geometry, image))
    result = weighted_calibration(profile.calibration, profile, weighting, weight)
    sentence = result.sentence + _score_note(profile, result.calibration)
    info = {"weight": weight, "effective_sample_size": result.effective_n, "guarantee": sentence}
    return dataclasses.replace(profile, calibration=result.calibration, weighting=None), info


def _score_note(profile: CalibrationProfile, calibration: Any) -> str:
    """The score clause of a threshold profile's sentence (:func:`score_sentence`; "" for the probability)."""
    if profile.score == DEFAULT_SCORE:
        return ""
    return score_sentence(profile.score, calibration.probability_threshold)
