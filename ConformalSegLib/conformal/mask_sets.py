"""Confidence sets from predicted masks alone: margins around a mask-only tool's structures.

Many segmentation tools (TotalSegmentator, nnU-Net without ``--save_probabilities``, MONAI Auto3DSeg in
Slicer) output integer label maps, no probabilities. For each structure (a label value ``v``, or a set of
values) this module calibrates the confidence sets of :mod:`ConformalSegLib.conformal.confidence_sets` on
the 0/1 map ``s = 1[pred == v]`` of the predicted structure ``M`` against the true structure
``Y = {truth == v}``.

Guarantee (per structure). With the score ``T`` = signed distance in mm to the boundary of ``M``
(positive inside, ``--transform distance``; :mod:`ConformalSegLib.conformal.score_transforms`), the inner
set ``I = {T > lambda_in}`` (the mask shrunk by ``lambda_in`` mm) and the outer set ``O = {T >= t_out}``
(the mask grown by ``-t_out`` mm) satisfy ``P(I subset Y) >= 1 - alpha_in`` and
``P(Y subset O) >= 1 - alpha_out`` (jointly ``>= 1 - alpha`` with ``--joint``), over exchangeable
calibration and test scans. *Proof.* ``T`` is computed from the test scan's own prediction, the same way
for every scan, so the per-scan statistics ``tau`` and ``gamma`` are exchangeable and the rank argument of
:mod:`ConformalSegLib.conformal.confidence_sets` applies unchanged to the 0/1 map. Nothing else of ``s``
is used. ``gaussian:SIGMA`` (a smoothed mask) is valid for the same reason.

The statement holds for each structure separately; for all ``K`` structures of a scan at once, calibrate
each at ``alpha / K`` (union bound). Ties: distances take few values, which only makes the sets more
conservative (the rank is still the conformal one).

Refused: methods that threshold a probability (``cls``, ``crc``, ``lesion``): on a 0/1 map their
cutoff can only be 0 (the whole image) or 1 (the mask itself), so they need real probabilities; and the
``identity`` transform (inner = the mask or nothing, outer = the mask or everything), as well as ``auto``,
whose candidates include it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .calibration import CalibrationRequest, calibrate_sets_request
from .case_summaries import CaseSummary, merge_case_summaries, summarize_case
from .profile import CalibrationProfile
from .score_transforms import parse_transform

PROBABILITY_METHODS_FIX = (
    "calibrate a mask-only tool with --method sets --transform distance (a margin in mm around the mask), "
    "or give real probability maps (nnU-Net: predict with --save_probabilities)"
)


def check_mask_request(method: str, transforms: Sequence[str]) -> None:
    """Refuse what needs probabilities or makes no sense on a 0/1 map (see the module docstring)."""
    if method != "sets":
        raise ConformalSegError(
            f"--method {method} thresholds probabilities, and a mask has only 0 and 1 (its cutoff could only be "
            "the whole image or the mask itself)",
            fix=PROBABILITY_METHODS_FIX,
        )
    for name in transforms:
        if str(name).strip().lower() in ("identity", "auto"):
            raise ConformalSegError(
                f"--transform {name} on a mask gives all-or-nothing sets (inner = the mask or nothing, outer = the "
                "mask or everything)",
                fix="use --transform distance (signed distance to the mask's boundary, in mm) or gaussian:SIGMA_MM",
            )
        parse_transform(name)


def structure_map(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """The 0/1 float32 map of a structure: 1 where the label value is one of ``values``."""
    return np.isin(labels, np.asarray(list(values), dtype=np.int64)).astype(np.float32)


def summarize_structures(
    case_id: str,
    predicted: np.ndarray,
    truth: np.ndarray,
    geometry: Geometry,
    structures: Mapping[str, Sequence[int]],
    request: CalibrationRequest,
) -> dict[str, CaseSummary]:
    """The per-scan summary of every structure of one scan (the "map" step, on any worker): what
    :func:`~ConformalSegLib.conformal.case_summaries.summarize_case` gives the 0/1 map of the structure."""
    if predicted.shape != truth.shape or predicted.shape != geometry.shape:
        raise ValueError(f"case {case_id}: predicted {predicted.shape} and true {truth.shape} labels differ")
    return {
        name: summarize_case(
            case_id, structure_map(predicted, values), np.isin(truth, np.asarray(list(values), np.int64)), geometry,
            request,
        )
        for name, values in structures.items()
    }  # fmt: skip


def structure_profiles(
    parts: Sequence[Mapping[str, CaseSummary]], structures: Mapping[str, Sequence[int]], request: CalibrationRequest
) -> dict[str, CalibrationProfile]:
    """One profile per structure from the scans' summaries, merged in scan order (the "reduce" step):
    identical whichever executor made the parts."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    profiles = {}
    for name, values in structures.items():
        merged = merge_case_summaries([part[name] for part in parts], request)
        stats = merged.sets
        if stats is None or stats.n == 0:
            raise ConformalSegError("no calibration cases found", fix="check the --masks and --labels folders")
        calibration = calibrate_sets_request(stats, request)
        provenance = {
            "created": created,
            **request.provenance,
            "mask_input": {"structure": name, "label_values": [int(v) for v in values]},
        }
        profiles[name] = CalibrationProfile(calibration, merged.lesion, stats, request.empty_policy, provenance)
    return profiles


def calibrate_structures(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, Geometry]],
    structures: Mapping[str, Sequence[int]],
    request: CalibrationRequest,
) -> dict[str, CalibrationProfile]:
    """One confidence-set profile per structure from ``(case_id, predicted labels, true labels, geometry)``
    streamed once (every structure's statistics gathered in the same pass; only the compact summaries kept)."""
    check_structures_request(structures, request)
    parts = [summarize_structures(*case, structures, request) for case in cases]
    return structure_profiles(parts, structures, request)


def check_structures_request(structures: Mapping[str, Sequence[int]], request: CalibrationRequest) -> None:
    check_mask_request(request.method, (request.inner_transform, request.outer_transform))
    if not structures:
        raise ConformalSegError("no structures given", fix="pass --structures VALUE=NAME[,VALUE=NAME...]")
