"""Calibration profiles: a versioned JSON file plus an ``.npz`` of summaries beside it.

A profile holds everything needed to (a) apply the calibrated thresholds to a new probability map
and (b) recalibrate for any other epsilon/alpha without touching a volume:

``PROFILE.json`` (format ``conformalseg-profile``, ``format_version`` 1; 2 when a threshold method thresholds a
score other than the probability, named by the extra key ``score``, :mod:`.threshold_scores`), top-level keys:

* ``method``: ``cls`` | ``crc`` | ``sets`` | ``lesion`` | ``rcps``; ``epsilon`` (null for sets), ``alpha`` (null
  for crc; delta for rcps), ``n``;
* rcps: ``delta`` and ``bound`` (``hb`` | ``wsr``, :mod:`ConformalSegLib.conformal.rcps`); ltt: ``delta``,
  ``risks``, ``fp_ml_cap``, ``valid_thresholds`` (:mod:`ConformalSegLib.conformal.ltt`; ``.npz``: ``fp_*``);
* cls/crc/lesion/rcps: ``probability_threshold`` (mask = ``prob >= probability_threshold``) and ``rank``;
  cls/crc with ``--tie-breaking random``: ``tie_breaking``, ``tie_seed``, ``tie_threshold`` (:mod:`.ties`);
* lesion: ``detect_fraction``, ``voxel_epsilon`` (null unless joint), ``min_lesion_voxels``,
  ``min_lesion_mm3`` (:mod:`ConformalSegLib.conformal.lesion_level`); the ``.npz`` also holds each
  scan's detection thresholds and lesion sizes;
* sets: ``inner_threshold``, ``outer_threshold`` (inner = ``T > inner_threshold``, outer =
  ``T >= outer_threshold``, ``T`` the score transform; probabilities for ``identity``), ``transform``
  (inner and outer transform names), ``mode``, ``alpha_inner``, ``alpha_outer``;
* ``groups`` / ``weighting`` (group-conditional and weighted profiles, :mod:`.deployment`);
* ``guarantee`` (one plain sentence), ``empty_policy``, ``n_excluded_empty``, ``summaries`` (file name,
  SHA-256, precision), ``provenance`` (case ids, label values, channel, model file SHA-256, package
  version, UTC time, input folders).

Infinite thresholds (too small a calibration set) are written as the strings ``"inf"``/``"-inf"``
(JSON has no infinity). Both files are written atomically (the ``.npz`` first; the JSON carries its
SHA-256) and an existing profile is never overwritten without ``force``. Loading validates the
format, the keys, the value ranges and the checksum, with errors that name the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import __version__
from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..io.atomic import NpzWriter, atomic_write_files, check_can_write
from ..io.checksums import sha256_file
from ..io.guards import LazyNpz
from ..io.json_file import read_bounded_json, sibling_file, verify_content_checksum, with_content_checksum
from ..io.segmentation import INNER_SET, LESION_FNR, LESION_LEVEL, OUTER_SET
from .cls import ThresholdCalibration, calibrate_cls, critical_cutoffs, used_cases
from .confidence_sets import SetsCalibration, SetStatistics, apply_sets, calibrate_sets
from .crc import calibrate_crc
from .deployment import deployment_arrays, deployment_json, read_deployment, recalibrated_groups
from .fp_summaries import FalsePositiveSummaries
from .guarantee_sentences import guarantee_sentence
from .lesion_level import LesionLevelCalibration, LesionLevelSummaries, calibrate_lesion, scan_scores
from .ltt import LttCalibration, RiskData, calibrate_ltt, ltt_json
from .mondrian import MondrianCalibration
from .profile_fields import RERUN_FIX, encode_float, read_calibration, require
from .rcps import RcpsCalibration, calibrate_rcps, rcps_json
from .simultaneous import DEFAULT_GRID, SimultaneousBand, simultaneous_band
from .summaries import LesionSummaries
from .threshold_scores import DEFAULT_SCORE, parse_threshold_score, score_sentence, threshold_scores
from .ties import apply_calibration, recalibrate_ties, refuse_ties, ties_json
from .weighted import Weighting

FORMAT = "conformalseg-profile"
FORMAT_VERSION = 1
#: The version of a profile whose threshold method thresholds a score other than the probability (``score``
#: key, :mod:`.threshold_scores`): older readers refuse it instead of thresholding the probability map.
SCORE_FORMAT_VERSION = 2
METHODS = ("cls", "crc", "sets", "lesion", "rcps", "ltt")
LESION_CRC = "Lesion (expected-FNR-controlled)"
LESION_RCPS = "Lesion (RCPS)"
LESION_LTT = "Lesion (Learn-Then-Test)"


class Unchanged:
    """The type of :data:`UNCHANGED`: "keep the calibrated value" in :meth:`CalibrationProfile.recalibrate`."""


UNCHANGED = Unchanged()


@dataclass(frozen=True)
class CalibrationProfile:
    """A calibration result plus the summaries it can be recalibrated from."""

    calibration: ThresholdCalibration | SetsCalibration
    summaries: LesionSummaries
    set_statistics: SetStatistics | None = None
    empty_policy: str = "exclude"
    provenance: dict[str, Any] = field(default_factory=dict)
    lesion_level: LesionLevelSummaries | None = None  #: lesion-level profiles only
    groups: MondrianCalibration | None = None  #: group-conditional (Mondrian) profiles, :mod:`.mondrian`
    weighting: Weighting | None = None  #: weighted (covariate-shift) profiles, :mod:`.weighted`
    false_positives: FalsePositiveSummaries | None = None  #: Learn-Then-Test profiles with false-positive risks
    score: str = DEFAULT_SCORE  #: threshold methods: the score thresholded (:mod:`.threshold_scores`)

    @property
    def method(self) -> str:
        return "sets" if isinstance(self.calibration, SetsCalibration) else self.calibration.method

    @property
    def guarantee(self) -> str:
        c = self.calibration
        if isinstance(c, SetsCalibration):
            return guarantee_sentence(c)
        return guarantee_sentence(c) + score_sentence(self.score, c.probability_threshold)

    def score_map(self, probability: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The map a threshold profile's cutoff applies to: ``probability`` itself, or its score
        (:mod:`.threshold_scores`); confidence sets compute their own transforms."""
        if isinstance(self.calibration, SetsCalibration):
            return probability
        return threshold_scores(probability, geometry, self.score)

    # ----------------------------------------------------------------- recalibration and application
    def recalibrate(
        self,
        *,
        epsilon: float | None = None,
        alpha: float | None = None,
        alpha_inner: float | None = None,
        alpha_outer: float | None = None,
        mode: str | None = None,
        voxel_epsilon: float | None | Unchanged = UNCHANGED,
        pac_delta: float | None | Unchanged = UNCHANGED,
    ) -> CalibrationProfile:
        """A profile for new parameters, computed from the stored summaries only (no volume).

        ``voxel_epsilon`` (lesion-level profiles): a number makes the guarantee joint with the voxel FNR,
        ``None`` removes the voxel part; ``pac_delta`` (cls, lesion-level, sets): a number makes the
        guarantee calibration-conditional (PAC), ``None`` marginal. Left out, each stays as calibrated.
        """
        c = self.calibration
        new: ThresholdCalibration | SetsCalibration
        delta = c.pac_delta if isinstance(pac_delta, Unchanged) else pac_delta
        if isinstance(c, LesionLevelCalibration):
            assert self.lesion_level is not None and c.alpha is not None  # read together with the calibration
            new = calibrate_lesion(
                self.lesion_level,
                c.epsilon if epsilon is None else epsilon,
                c.alpha if alpha is None else alpha,
                voxel_epsilon=c.voxel_epsilon if isinstance(voxel_epsilon, Unchanged) else voxel_epsilon,
                voxel_summaries=self.summaries,
                pac_delta=delta,
            )
        elif isinstance(c, SetsCalibration):
            assert self.set_statistics is not None
            mode = mode or c.mode
            if alpha is None and alpha_inner is None and alpha_outer is None:
                alpha, alpha_inner, alpha_outer = c.alpha, c.alpha_inner, c.alpha_outer
            stats = self.set_statistics if self.empty_policy == "include" else self.set_statistics.without_empty()
            new = calibrate_sets(
                stats, alpha=alpha, alpha_inner=alpha_inner, alpha_outer=alpha_outer, mode=mode, pac_delta=delta
            )
        elif isinstance(c, LttCalibration):
            data = RiskData(self.summaries, self.lesion_level, self.false_positives)
            new = calibrate_ltt(data, c.risks, c.delta if alpha is None else alpha)
        elif isinstance(c, RcpsCalibration):
            new = calibrate_rcps(
                self.summaries,
                c.epsilon if epsilon is None else epsilon,
                c.delta if alpha is None else alpha,
                bound=c.bound,
                empty=self.empty_policy,
            )
        elif c.tie_seed is not None:
            new = recalibrate_ties(self.summaries, c, epsilon, alpha, self.empty_policy, delta)
        elif c.method == "cls":
            level = c.alpha if alpha is None else alpha
            assert level is not None  # CLS profiles have an alpha
            new = calibrate_cls(
                self.summaries,
                c.epsilon if epsilon is None else epsilon,
                level,
                empty=self.empty_policy,
                pac_delta=delta,
            )
        else:
            new = calibrate_crc(self.summaries, c.epsilon if epsilon is None else epsilon, empty=self.empty_policy)
        return dataclasses.replace(self, calibration=new, groups=recalibrated_groups(self, new))

    def slider_band(self, alpha: float | None = None, grid: Sequence[float] = DEFAULT_GRID) -> SimultaneousBand:
        """The slider-safe band of a CLS or lesion-level profile (:mod:`ConformalSegLib.conformal.simultaneous`):
        one ``1 - alpha`` event on which the promise holds at every epsilon of ``grid`` at once (for a
        joint lesion-level profile the voxel tolerance stays as calibrated)."""
        c = self.calibration
        level = c.alpha if alpha is None else alpha
        refuse_ties(c, "slider-safe bands")
        if isinstance(c, SetsCalibration) or c.method not in ("cls", "lesion") or level is None:
            raise ConformalSegError(
                f"slider-safe bands are for CLS and lesion-level profiles, not {self.method}",
                fix="calibrate with --method cls or --method lesion",
            )
        if isinstance(c, LesionLevelCalibration):
            lesion_level = self.lesion_level
            assert lesion_level is not None  # read together with the calibration

            def curve(eps: float) -> np.ndarray:
                return scan_scores(lesion_level, eps, voxel_epsilon=c.voxel_epsilon, voxel_summaries=self.summaries)

            return simultaneous_band(curve, lesion_level.lesion_counts > 0, level, grid)
        used = used_cases(self.summaries, self.empty_policy)
        return simultaneous_band(lambda eps: critical_cutoffs(self.summaries, eps), used, level, grid)

    def masks(self, probability: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
        """The calibrated masks for one probability map, keyed by segment name."""
        if probability.shape != geometry.shape:
            raise ValueError("probability shape does not match its geometry")
        c = self.calibration
        if isinstance(c, SetsCalibration):
            inner, outer = apply_sets(probability, geometry, c)
            return {INNER_SET: inner, OUTER_SET: outer}
        return {self.mask_name: apply_calibration(self.score_map(probability, geometry), c)}

    @property
    def mask_name(self) -> str:
        """The segment name of a threshold profile's mask (cls, crc, lesion, rcps, ltt): one name per method, so
        that profiles of different methods can be shown side by side."""
        names = {"cls": LESION_FNR, "lesion": LESION_LEVEL, "rcps": LESION_RCPS, "ltt": LESION_LTT}
        return names.get(self.method, LESION_CRC)

    # ------------------------------------------------------------------------------ serialisation
    def to_json_dict(self, summaries_file: str, summaries_sha256: str) -> dict[str, Any]:
        c = self.calibration
        doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method}
        if self.score != DEFAULT_SCORE:
            doc.update(format_version=SCORE_FORMAT_VERSION, score=self.score)
        if isinstance(c, SetsCalibration):
            doc.update(
                epsilon=None,
                alpha=c.alpha,
                n=c.n,
                inner_threshold=encode_float(c.inner_threshold),
                outer_threshold=encode_float(c.outer_threshold),
                transform={"inner": c.inner_transform, "outer": c.outer_transform},
                mode=c.mode,
                alpha_inner=c.alpha_inner,
                alpha_outer=c.alpha_outer,
                pac_delta=c.pac_delta,
            )
        else:
            doc.update(
                epsilon=c.epsilon,
                alpha=c.alpha,
                n=c.n,
                probability_threshold=encode_float(c.probability_threshold),
                rank=c.rank,
                pac_delta=c.pac_delta,
                n_with_lesion=c.n_with_lesion,
            )
            doc.update(ties_json(c))
        if isinstance(c, (RcpsCalibration, LttCalibration)):
            doc.update(ltt_json(c, self.lesion_level) if isinstance(c, LttCalibration) else rcps_json(c))
        if isinstance(c, LesionLevelCalibration):
            doc.update(
                detect_fraction=c.detect_fraction,
                voxel_epsilon=c.voxel_epsilon,
                min_lesion_voxels=c.min_lesion_voxels,
                min_lesion_mm3=c.min_lesion_mm3,
            )
        doc.update(
            guarantee=self.guarantee,
            empty_policy=self.empty_policy,
            n_excluded_empty=getattr(c, "n_excluded_empty", 0)
            if not isinstance(c, SetsCalibration)
            else (
                0
                if self.empty_policy == "include" or self.set_statistics is None
                else int(np.count_nonzero(self.set_statistics.lesion_sizes == 0))
            ),
            summaries={
                "file": summaries_file,
                "sha256": summaries_sha256,
                "precision": self.summaries.precision,
                "n_cases": self.summaries.n,
            },
            provenance={
                "package": "ConformalSegLib",
                "package_version": __version__,
                **self.provenance,
                "case_ids": list(self.summaries.case_ids),
            },
        )
        doc.update(deployment_json(self))
        return doc

    def summary_arrays(self) -> dict[str, np.ndarray]:
        arrays = self.summaries.to_arrays()
        if self.set_statistics is not None:
            arrays.update(self.set_statistics.to_arrays())
        if self.lesion_level is not None:
            arrays.update(self.lesion_level.to_arrays())
        if self.false_positives is not None:
            arrays.update(self.false_positives.to_arrays())
        arrays.update(deployment_arrays(self))
        return arrays

    def save(self, path: str | PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
        """Write ``PATH.json`` and ``PATH.npz`` atomically; refuse to overwrite unless ``force``."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise ConformalSegError("a profile file name must end in .json", path=path, fix="e.g. --out profile.json")
        npz_path = path.with_suffix(".npz")
        check_can_write(path, force=force)
        check_can_write(npz_path, force=force)
        npz = NpzWriter(self.summary_arrays())  # compressed straight into the temporary file

        def write_json(handle: IO[bytes]) -> None:
            assert npz.sha256 is not None  # the .npz is written first
            doc = with_content_checksum(self.to_json_dict(npz_path.name, npz.sha256))
            handle.write((json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8"))

        atomic_write_files([(npz_path, npz), (path, write_json)], force=force)  # one unit, the .npz first
        return path, npz_path


def load_profile(path: str | PathLike[str]) -> CalibrationProfile:
    """Load and validate a profile and its summaries (see module docstring).

    The specific checks (format, keys, ranges, the ``.npz`` checksum, thresholds recomputed from the
    summaries) run first so that their messages say what is wrong; the content checksum over every
    field then refuses any other hand edit (``n``, epsilon, alpha...). A malformed field that slips
    past the specific checks is reported as such, never as a traceback.
    """
    path = Path(path)
    doc, method, n = _read_document(path)
    score = _read_score(doc, path)
    try:
        summaries, stats, lesion_level, provenance, fp = _read_summaries(doc, path, method)
        calibration = read_calibration(doc, path, method, n, stats)
        profile = CalibrationProfile(
            calibration,
            summaries,
            stats,
            str(doc.get("empty_policy", "exclude")),
            provenance,
            lesion_level,
            false_positives=fp,
            score=score,
        )
        groups, weighting = read_deployment(doc, path, profile)
        profile = dataclasses.replace(profile, groups=groups, weighting=weighting)
        _check_consistent(profile, path)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise ConformalSegError(
            f"the profile has a malformed field ({type(exc).__name__}: {str(exc)[:120]}; edited by hand?)",
            path=path,
            fix=RERUN_FIX,
        ) from exc
    verify_content_checksum(doc, path, RERUN_FIX)
    if n != calibration.n or summaries.n != len(summaries.case_ids):
        raise ConformalSegError("'n' does not match the summaries (edited by hand?)", path=path, fix=RERUN_FIX)
    return profile


def _read_document(path: Path) -> tuple[dict[str, Any], str, int]:
    """The profile's JSON, checked for format, version, method and ``n``."""
    if not path.is_file():
        raise ConformalSegError(
            "calibration profile not found",
            path=path,
            fix="check the path, or create one with `conformalseg calibrate`",
        )
    doc = read_bounded_json(path, "calibration profile", RERUN_FIX)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConformalSegError(
            "not a ConformalSeg calibration profile (no 'format': 'conformalseg-profile')", path=path, fix=RERUN_FIX
        )
    version = doc.get("format_version")
    if version not in (FORMAT_VERSION, SCORE_FORMAT_VERSION) or isinstance(version, bool):
        raise ConformalSegError(
            f"profile format version {version!r} is not supported (this reads {FORMAT_VERSION} and "
            f"{SCORE_FORMAT_VERSION})",
            path=path,
            fix="re-calibrate with this version of ConformalSeg",
        )
    method = require(doc, "method", path)
    if method not in METHODS:
        raise ConformalSegError(f"unknown method {method!r}", path=path, fix=RERUN_FIX)
    n = require(doc, "n", path)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConformalSegError(f"'n' must be a positive integer, got {n!r}", path=path, fix=RERUN_FIX)
    return doc, method, n


def _read_score(doc: dict[str, Any], path: Path) -> str:
    """The score a threshold profile thresholds: ``score`` in a version-2 profile, the probability in version 1."""
    version, method = doc.get("format_version"), doc.get("method")
    if version == FORMAT_VERSION:
        if "score" in doc:
            raise ConformalSegError("a version-1 profile has no 'score' (edited by hand?)", path=path, fix=RERUN_FIX)
        return DEFAULT_SCORE
    score = require(doc, "score", path)
    if not isinstance(score, str) or method == "sets":
        raise ConformalSegError(f"'score' {score!r} is malformed (edited by hand?)", path=path, fix=RERUN_FIX)
    try:
        parsed = parse_threshold_score(score)
    except ConformalSegError as exc:
        raise ConformalSegError(
            f"'score' {score!r} is not a threshold score (edited by hand?)", path=path, fix=RERUN_FIX
        ) from exc
    if parsed.name != score or score == DEFAULT_SCORE:
        raise ConformalSegError(f"'score' {score!r} is malformed (edited by hand?)", path=path, fix=RERUN_FIX)
    return score


def _read_summaries(
    doc: dict[str, Any], path: Path, method: str
) -> tuple[
    LesionSummaries, SetStatistics | None, LesionLevelSummaries | None, dict[str, Any], FalsePositiveSummaries | None
]:
    """The ``.npz`` beside the profile (checksum verified), its summaries, set statistics and the provenance."""
    summaries_doc = require(doc, "summaries", path)
    if not isinstance(summaries_doc, dict) or not isinstance(doc.get("provenance") or {}, dict):
        raise ConformalSegError("'summaries' and 'provenance' must be JSON objects", path=path, fix=RERUN_FIX)
    npz_path = sibling_file(path, summaries_doc.get("file"), "summaries file", RERUN_FIX)
    if not npz_path.is_file():
        raise ConformalSegError(
            f"the summaries file {npz_path.name} is missing beside the profile",
            path=path,
            fix="keep the .npz next to the .json (copy both), or re-calibrate",
        )
    if sha256_file(npz_path) != summaries_doc.get("sha256"):
        raise ConformalSegError(
            "summaries file does not match the profile's checksum (modified or from another calibration)",
            path=npz_path,
            fix="restore the matching .npz or re-calibrate",
        )
    provenance = dict(doc.get("provenance") or {})
    case_ids = provenance.pop("case_ids", None)
    if not isinstance(case_ids, list) or len(case_ids) != summaries_doc.get("n_cases"):
        raise ConformalSegError(
            "provenance.case_ids missing or inconsistent with the summaries", path=path, fix=RERUN_FIX
        )
    try:
        with LazyNpz(npz_path, "summaries file") as arrays:  # only the arrays looked up are read, sizes checked
            summaries = LesionSummaries.from_arrays(arrays, case_ids, summaries_doc.get("precision", "float32"))
            stats = lesion_level = fp = None
            if method == "sets":
                transform = require(doc, "transform", path)
                stats = SetStatistics.from_arrays(arrays, case_ids, transform["inner"], transform["outer"])
            if method == "ltt" and "fp_values" in arrays:
                fp = FalsePositiveSummaries.from_arrays(arrays, case_ids, float(require(doc, "fp_ml_cap", path)))
            if method == "lesion" or (method == "ltt" and "lesionlevel_values" in arrays):
                lesion_level = LesionLevelSummaries.from_arrays(
                    arrays,
                    case_ids,
                    detect_fraction=float(require(doc, "detect_fraction", path)),
                    min_lesion_voxels=int(require(doc, "min_lesion_voxels", path)),
                    min_lesion_mm3=float(require(doc, "min_lesion_mm3", path)),
                )
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ConformalSegError(
            f"summaries file is corrupt or incomplete ({exc})", path=npz_path, fix=RERUN_FIX
        ) from exc
    return summaries, stats, lesion_level, provenance, fp


def _check_consistent(profile: CalibrationProfile, path: Path) -> None:
    """The stored threshold must be what the stored summaries give (catches hand-edited profiles)."""
    c = profile.calibration
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = profile.recalibrate().calibration
    if isinstance(c, SetsCalibration) and isinstance(again, SetsCalibration):
        same = again.inner_threshold == c.inner_threshold and again.outer_threshold == c.outer_threshold
    else:
        assert isinstance(c, ThresholdCalibration) and isinstance(again, ThresholdCalibration)
        same = (again.probability_threshold, again.tie_threshold) == (c.probability_threshold, c.tie_threshold)
    if not same:
        raise ConformalSegError(
            "the stored threshold does not follow from the stored summaries (edited by hand?)", path=path, fix=RERUN_FIX
        )
