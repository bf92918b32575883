"""Calibration profiles: a versioned JSON file plus an ``.npz`` of summaries beside it.

A profile holds everything needed to (a) apply the calibrated thresholds to a new probability map
and (b) recalibrate for any other epsilon/alpha without touching a volume:

``PROFILE.json`` (format ``conformalseg-profile``, ``format_version`` 1), top-level keys:

* ``method``: ``cls`` | ``crc`` | ``sets`` | ``lesion``; ``epsilon`` (null for sets), ``alpha`` (null for
  crc), ``n``;
* cls/crc/lesion: ``probability_threshold`` (mask = ``prob >= probability_threshold``) and ``rank``;
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
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..io.atomic import atomic_write_bytes, atomic_write_text, check_can_write
from ..io.checksums import sha256_file
from ..io.segmentation import INNER_SET, LESION_FNR, LESION_LEVEL, OUTER_SET
from .cls import ThresholdCalibration, calibrate_cls, critical_cutoffs, used_cases
from .confidence_sets import SetsCalibration, SetStatistics, apply_sets, calibrate_sets
from .crc import calibrate_crc
from .deployment import deployment_arrays, deployment_json, read_deployment, recalibrated_groups
from .guarantee_sentences import guarantee_sentence
from .lesion_level import LesionLevelCalibration, LesionLevelSummaries, calibrate_lesion, scan_scores
from .mondrian import MondrianCalibration
from .simultaneous import DEFAULT_GRID, SimultaneousBand, simultaneous_band
from .summaries import LesionSummaries
from .ties import apply_calibration, recalibrate_ties, refuse_ties, ties_from_json, ties_json
from .weighted import Weighting

FORMAT = "conformalseg-profile"
FORMAT_VERSION = 1
METHODS = ("cls", "crc", "sets", "lesion")
LESION_CRC = "Lesion (expected-FNR-controlled)"


class Unchanged:
    """The type of :data:`UNCHANGED`: "keep the calibrated value" in :meth:`CalibrationProfile.recalibrate`."""


UNCHANGED = Unchanged()
RERUN_FIX = "re-create it with `conformalseg calibrate`"


def _encode_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        raise ValueError("NaN in profile")
    return x


def _decode_float(value: Any, key: str, path: Path) -> float:
    if value in ("inf", "+inf"):
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConformalSegError(
            f"profile key {key!r} must be a number or 'inf'/'-inf', got {value!r}", path=path, fix=RERUN_FIX
        )
    return float(value)


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

    @property
    def method(self) -> str:
        return "sets" if isinstance(self.calibration, SetsCalibration) else self.calibration.method

    @property
    def guarantee(self) -> str:
        return guarantee_sentence(self.calibration)

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
        return {self.mask_name: apply_calibration(probability, c)}

    @property
    def mask_name(self) -> str:
        """The segment name of a threshold profile's mask (cls, crc, lesion)."""
        return {"cls": LESION_FNR, "lesion": LESION_LEVEL}.get(self.method, LESION_CRC)

    # ------------------------------------------------------------------------------ serialisation
    def to_json_dict(self, summaries_file: str, summaries_sha256: str) -> dict[str, Any]:
        c = self.calibration
        doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method}
        if isinstance(c, SetsCalibration):
            doc.update(
                epsilon=None,
                alpha=c.alpha,
                n=c.n,
                inner_threshold=_encode_float(c.inner_threshold),
                outer_threshold=_encode_float(c.outer_threshold),
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
                probability_threshold=_encode_float(c.probability_threshold),
                rank=c.rank,
                pac_delta=c.pac_delta,
                n_with_lesion=c.n_with_lesion,
            )
            doc.update(ties_json(c))
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
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self.summary_arrays())  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        data = buffer.getvalue()
        atomic_write_bytes(npz_path, data, force=force)
        doc = self.to_json_dict(npz_path.name, hashlib.sha256(data).hexdigest())
        atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n", force=force)
        return path, npz_path


def _require(doc: dict[str, Any], key: str, path: Path) -> Any:
    if key not in doc:
        raise ConformalSegError(f"profile has no {key!r} key", path=path, fix=RERUN_FIX)
    return doc[key]


def load_profile(path: str | PathLike[str]) -> CalibrationProfile:
    """Load and validate a profile and its summaries (see module docstring)."""
    path = Path(path)
    doc, method, n = _read_document(path)
    summaries, stats, lesion_level, provenance = _read_summaries(doc, path, method)
    calibration = _read_calibration(doc, path, method, n, stats)
    profile = CalibrationProfile(
        calibration, summaries, stats, doc.get("empty_policy", "exclude"), provenance, lesion_level
    )
    groups, weighting = read_deployment(doc, path, profile)
    profile = dataclasses.replace(profile, groups=groups, weighting=weighting)
    _check_consistent(profile, path)
    return profile


def _read_document(path: Path) -> tuple[dict[str, Any], str, int]:
    """The profile's JSON, checked for format, version, method and ``n``."""
    if not path.is_file():
        raise ConformalSegError(
            "calibration profile not found",
            path=path,
            fix="check the path, or create one with `conformalseg calibrate`",
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConformalSegError(f"not a valid JSON profile ({exc})", path=path, fix=RERUN_FIX) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConformalSegError(
            "not a ConformalSeg calibration profile (no 'format': 'conformalseg-profile')", path=path, fix=RERUN_FIX
        )
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ConformalSegError(
            f"profile format version {version!r} is not supported (this is {FORMAT_VERSION})",
            path=path,
            fix="re-calibrate with this version of ConformalSeg",
        )
    method = _require(doc, "method", path)
    if method not in METHODS:
        raise ConformalSegError(f"unknown method {method!r}", path=path, fix=RERUN_FIX)
    n = _require(doc, "n", path)
    if not isinstance(n, int) or n < 1:
        raise ConformalSegError(f"'n' must be a positive integer, got {n!r}", path=path, fix=RERUN_FIX)
    return doc, method, n


def _read_summaries(
    doc: dict[str, Any], path: Path, method: str
) -> tuple[LesionSummaries, SetStatistics | None, LesionLevelSummaries | None, dict[str, Any]]:
    """The ``.npz`` beside the profile (checksum verified), its summaries, set statistics and the provenance."""
    summaries_doc = _require(doc, "summaries", path)
    npz_path = path.with_name(str(summaries_doc.get("file", "")))
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
        with np.load(npz_path, allow_pickle=False) as arrays:
            arrays = dict(arrays)
        summaries = LesionSummaries.from_arrays(arrays, case_ids, summaries_doc.get("precision", "float32"))
        stats = lesion_level = None
        if method == "sets":
            transform = _require(doc, "transform", path)
            stats = SetStatistics.from_arrays(arrays, case_ids, transform["inner"], transform["outer"])
        if method == "lesion":
            lesion_level = LesionLevelSummaries.from_arrays(
                arrays,
                case_ids,
                detect_fraction=float(_require(doc, "detect_fraction", path)),
                min_lesion_voxels=int(_require(doc, "min_lesion_voxels", path)),
                min_lesion_mm3=float(_require(doc, "min_lesion_mm3", path)),
            )
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ConformalSegError(
            f"summaries file is corrupt or incomplete ({exc})", path=npz_path, fix=RERUN_FIX
        ) from exc
    return summaries, stats, lesion_level, provenance


def _read_calibration(
    doc: dict[str, Any], path: Path, method: str, n: int, stats: SetStatistics | None
) -> ThresholdCalibration | SetsCalibration:
    """The stored thresholds and parameters of the calibration."""
    if method == "sets":
        assert stats is not None  # read with the summaries for sets profiles
        return SetsCalibration(
            str(_require(doc, "mode", path)),
            float(_require(doc, "alpha", path)),
            float(_require(doc, "alpha_inner", path)),
            float(_require(doc, "alpha_outer", path)),
            n,
            _decode_float(_require(doc, "inner_threshold", path), "inner_threshold", path),
            _decode_float(_require(doc, "outer_threshold", path), "outer_threshold", path),
            stats.inner_transform,
            stats.outer_transform,
            _optional_float(doc, "pac_delta"),
        )
    epsilon = _decode_float(_require(doc, "epsilon", path), "epsilon", path)
    alpha = doc.get("alpha")
    if method in ("cls", "lesion") and alpha is None:
        raise ConformalSegError(f"a {method} profile needs 'alpha'", path=path, fix=RERUN_FIX)
    if method == "lesion":
        assert alpha is not None  # checked above
        return LesionLevelCalibration(
            method=method,
            epsilon=epsilon,
            alpha=float(alpha),
            n=n,
            n_excluded_empty=int(doc.get("n_excluded_empty", 0)),
            probability_threshold=_decode_float(
                _require(doc, "probability_threshold", path), "probability_threshold", path
            ),
            rank=doc.get("rank"),
            pac_delta=_optional_float(doc, "pac_delta"),
            detect_fraction=float(_require(doc, "detect_fraction", path)),
            voxel_epsilon=_optional_float(doc, "voxel_epsilon"),
            min_lesion_voxels=int(_require(doc, "min_lesion_voxels", path)),
            min_lesion_mm3=float(_require(doc, "min_lesion_mm3", path)),
        )
    return ThresholdCalibration(
        method,
        epsilon,
        None if alpha is None else float(alpha),
        n,
        int(doc.get("n_excluded_empty", 0)),
        _decode_float(_require(doc, "probability_threshold", path), "probability_threshold", path),
        doc.get("rank"),
        _optional_float(doc, "pac_delta"),
        doc.get("n_with_lesion"),
        *ties_from_json(doc, path),
    )


def _optional_float(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    return None if value is None else float(value)


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
