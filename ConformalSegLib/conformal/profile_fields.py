"""The fields of a lesion profile's JSON document: the float convention (``"inf"``/``"-inf"`` strings for
infinite thresholds), required and optional keys, and the stored calibration read back into its
dataclass (:func:`read_calibration`). Used by :mod:`ConformalSegLib.conformal.profile` (which checks
the calibration against the summaries afterwards) and by :mod:`ConformalSegLib.semcrc.profile` (the
same float convention)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration, SetStatistics
from .lesion_level import LesionLevelCalibration
from .ltt import read_ltt
from .rcps import read_rcps
from .ties import ties_from_json

RERUN_FIX = "re-create it with `conformalseg calibrate`"


def encode_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        raise ValueError("NaN in profile")
    return x


def decode_float(value: Any, key: str, path: Path) -> float:
    if value in ("inf", "+inf"):
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConformalSegError(
            f"profile key {key!r} must be a number or 'inf'/'-inf', got {value!r}", path=path, fix=RERUN_FIX
        )
    return float(value)


def require(doc: dict[str, Any], key: str, path: Path) -> Any:
    if key not in doc:
        raise ConformalSegError(f"profile has no {key!r} key", path=path, fix=RERUN_FIX)
    return doc[key]


def read_calibration(
    doc: dict[str, Any], path: Path, method: str, n: int, stats: SetStatistics | None
) -> ThresholdCalibration | SetsCalibration:
    """The stored thresholds and parameters of the calibration."""
    if method == "sets":
        assert stats is not None  # read with the summaries for sets profiles
        return SetsCalibration(
            str(require(doc, "mode", path)),
            float(require(doc, "alpha", path)),
            float(require(doc, "alpha_inner", path)),
            float(require(doc, "alpha_outer", path)),
            n,
            decode_float(require(doc, "inner_threshold", path), "inner_threshold", path),
            decode_float(require(doc, "outer_threshold", path), "outer_threshold", path),
            stats.inner_transform,
            stats.outer_transform,
            optional_float(doc, "pac_delta"),
        )
    epsilon = decode_float(require(doc, "epsilon", path), "epsilon", path)
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
            probability_threshold=decode_float(
                require(doc, "probability_threshold", path), "probability_threshold", path
            ),
            rank=doc.get("rank"),
            pac_delta=optional_float(doc, "pac_delta"),
            detect_fraction=float(require(doc, "detect_fraction", path)),
            voxel_epsilon=optional_float(doc, "voxel_epsilon"),
            min_lesion_voxels=int(require(doc, "min_lesion_voxels", path)),
            min_lesion_mm3=float(require(doc, "min_lesion_mm3", path)),
        )
    if method in ("rcps", "ltt"):
        threshold = decode_float(require(doc, "probability_threshold", path), "probability_threshold", path)
        try:
            return (read_ltt if method == "ltt" else read_rcps)(doc, n, threshold)
        except (KeyError, ValueError, TypeError, ConformalSegError) as exc:
            raise ConformalSegError(f"malformed {method} profile keys ({exc})", path=path, fix=RERUN_FIX) from exc
    return ThresholdCalibration(
        method,
        epsilon,
        None if alpha is None else float(alpha),
        n,
        int(doc.get("n_excluded_empty", 0)),
        decode_float(require(doc, "probability_threshold", path), "probability_threshold", path),
        doc.get("rank"),
        optional_float(doc, "pac_delta"),
        doc.get("n_with_lesion"),
        *ties_from_json(doc, path),
    )


def optional_float(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    return None if value is None else float(value)
