"""One calibration scan's compact summary (the "map" step) and the exact merge of many (the "reduce" step).

:func:`summarize_case` turns one scan (probability map, lesion mask, grid) into a :class:`CaseSummary`:
its sorted lesion-voxel probabilities (:class:`~.summaries.LesionSummaries` of one case), and, as the
method needs, its confidence-set statistics (``tau``, ``gamma``), its lesion detection thresholds and (LTT's
false-positive risks) its largest background probabilities and false-positive component counts.
:func:`merge_case_summaries` concatenates summaries **in case order**. Every calibration goes through
these two functions (``calibrate`` in this process, ``calibrate_dataset`` on any executor of
:mod:`ConformalSegLib.common.executors`), so a profile calibrated on workers is bit-identical to a serial
one: each scan's summary is computed by the same code from the same volumes, and the concatenation is
exactly what the streaming builders produce (the builders' ``build`` is a concatenation of their
per-case parts). No probability map leaves the worker; a summary is ``m_i`` float32 (or uint16) values
plus a few numbers per scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .confidence_sets import SetStatistics, SetStatisticsBuilder
from .fp_summaries import COMPONENT_THRESHOLDS, FalsePositiveBuilder, FalsePositiveSummaries
from .lesion_level import LesionLevelBuilder, LesionLevelSummaries
from .ltt import parse_risks
from .score_transforms import parse_transform
from .summaries import LesionSummaries, SummaryBuilder, check_probabilities
from .threshold_scores import DEFAULT_SCORE, threshold_scores

if TYPE_CHECKING:
    from .calibration import CalibrationRequest


@dataclass(frozen=True)
class CaseSummary:
    """The compact summary of one scan (what a worker sends back), and the label values its file holds."""

    lesion: LesionSummaries  # one case
    sets: SetStatistics | None = None
    lesion_level: LesionLevelSummaries | None = None
    labels_seen: frozenset[int] | None = None
    fp: FalsePositiveSummaries | None = None  # ltt's false-positive risks
    without_geometry: bool = False  # read from bare arrays (1 mm assumed; the driver decides if that matters)
    extra: Any = None  # what the caller's ``extras(case)`` computed on the worker (e.g. deployment features)

    @property
    def case_id(self) -> str:
        return self.lesion.case_ids[0]


@dataclass(frozen=True)
class MergedSummaries:
    """The summaries of all scans, in case order."""

    lesion: LesionSummaries
    sets: SetStatistics | None
    lesion_level: LesionLevelSummaries | None
    fp: FalsePositiveSummaries | None = None


def summarize_case(
    case_id: str, probability: np.ndarray, lesion: np.ndarray, geometry: Geometry | None, request: CalibrationRequest
) -> CaseSummary:
    """The summary of one scan for ``request.method`` (NaN, infinities, values outside [0, 1] refused), computed
    on ``request.score`` (the probability itself by default, :mod:`.threshold_scores`)."""
    if request.score != DEFAULT_SCORE:
        check_probabilities(np.asarray(probability), case_id)  # the transform must see a valid probability map
        probability = threshold_scores(probability, geometry, request.score)
    summaries = SummaryBuilder(request.precision)
    summaries.add_case(case_id, probability, lesion)
    sets = None
    if request.method == "sets":
        builder = SetStatisticsBuilder(
            parse_transform(request.inner_transform), parse_transform(request.outer_transform)
        )
        builder.add_case(case_id, probability, lesion, geometry)  # type: ignore[arg-type]  # None: identity only
        sets = builder.build()
    lesion_level = fp = None
    risks = _risks(request)
    if request.method == "lesion" or "lesion-miss" in risks:
        lesions = LesionLevelBuilder(request.detect_fraction, request.min_lesion_voxels, request.min_lesion_mm3)
        lesions.add_case(case_id, probability, lesion, voxel_mm3(geometry, request, case_id))
        lesion_level = lesions.build()
    if risks & {"fp-ml", "fp-components"}:
        builder_fp = FalsePositiveBuilder(request.fp_ml_cap, "fp-components" in risks)
        builder_fp.add_case(case_id, probability, lesion, voxel_mm3(geometry, request, case_id, "fp-ml" in risks))
        fp = builder_fp.build()
    return CaseSummary(summaries.build(), sets, lesion_level, fp=fp)


def _risks(request: CalibrationRequest) -> set[str]:
    """The names of the risks of a Learn-Then-Test request (empty for other methods)."""
    return {r.name for r in parse_risks(request.risks)} if request.method == "ltt" else set()


def summarize_dataset_case(shared: tuple[Any, ...], case_id: str) -> CaseSummary:
    """Load one case of a dataset (``shared = (dataset, request[, extras])``; the readers' checks) and
    summarize it; ``extras(case)`` (a picklable callable), when given, is computed from the loaded case too.

    The task function of ``calibrate_dataset``: module level, so that workers import it by name.
    """
    dataset, request, *rest = shared
    case = dataset.load(case_id)
    summary = summarize_case(
        case.case_id, case.probability.array, case.lesion.array, case.probability.geometry, request
    )
    seen = getattr(dataset, "labels_seen", {}).get(case_id)
    bare = case_id in getattr(dataset, "without_geometry", ())
    extra = rest[0](case) if rest and rest[0] is not None else None
    return CaseSummary(summary.lesion, summary.sets, summary.lesion_level, seen, summary.fp, bare, extra)


def merge_case_summaries(parts: Sequence[CaseSummary], request: CalibrationRequest) -> MergedSummaries:
    """Concatenate per-scan summaries in the given order (exactly what the streaming builders build)."""
    lesion = _concat_lesion(parts, request.precision)
    sets = None
    if request.method == "sets":
        stats = [p.sets for p in parts if p.sets is not None]
        sets = SetStatistics(
            np.concatenate([s.tau for s in stats]) if stats else np.zeros(0, np.float64),
            np.concatenate([s.gamma for s in stats]) if stats else np.zeros(0, np.float64),
            tuple(i for s in stats for i in s.case_ids),
            parse_transform(request.inner_transform).name,
            parse_transform(request.outer_transform).name,
            np.concatenate([s.lesion_sizes for s in stats]) if stats else np.zeros(0, np.int64),
        )
    lesion_level = None
    risks = _risks(request)
    if request.method == "lesion" or "lesion-miss" in risks:
        levels = [p.lesion_level for p in parts if p.lesion_level is not None]
        empty = LesionLevelBuilder(request.detect_fraction, request.min_lesion_voxels, request.min_lesion_mm3).build()
        lesion_level = LesionLevelSummaries(
            np.concatenate([s.values for s in levels]) if levels else np.zeros(0, np.float32),
            np.concatenate([s.sizes for s in levels]) if levels else np.zeros(0, np.int64),
            _offsets([s.values.size for s in levels]),
            tuple(i for s in levels for i in s.case_ids),
            empty.detect_fraction,
            empty.min_lesion_voxels,
            empty.min_lesion_mm3,
        )
    fp = None
    if risks & {"fp-ml", "fp-components"}:
        fps = [p.fp for p in parts if p.fp is not None]
        fp = FalsePositiveSummaries(
            np.concatenate([f.values for f in fps]) if fps else np.zeros(0, np.float32),
            _offsets([f.values.size for f in fps]),
            np.concatenate([f.voxel_ml for f in fps]) if fps else np.zeros(0, np.float64),
            np.concatenate([f.components for f in fps]) if fps else np.zeros((0, len(COMPONENT_THRESHOLDS)), np.int64),
            tuple(i for f in fps for i in f.case_ids),
            request.fp_ml_cap,
        )
    return MergedSummaries(lesion, sets, lesion_level, fp)


def _concat_lesion(parts: Sequence[CaseSummary], precision: str) -> LesionSummaries:
    if not parts:
        return SummaryBuilder(precision).build()
    values = np.concatenate([p.lesion.values for p in parts])
    ids = tuple(i for p in parts for i in p.lesion.case_ids)
    return LesionSummaries(values, _offsets([p.lesion.values.size for p in parts]), ids, precision)


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def voxel_mm3(geometry: Geometry | None, request: CalibrationRequest, case_id: str, need: bool = False) -> float:
    """The voxel volume in mm^3 for the lesion size filter and the false-positive volume (1 without a geometry,
    refused with a mm^3 filter or when ``need``: the ``fp-ml`` risk)."""
    if geometry is None:
        if need:
            raise ConformalSegError(
                f"case {case_id!r} has no voxel spacing, so its false-positive volume in mL is unknown",
                fix="give NIfTI/NRRD probability maps, or use --risk fp-components instead of fp-ml",
            )
        if request.min_lesion_mm3:
            raise ConformalSegError(
                f"case {case_id!r} has no voxel spacing, so --min-lesion-mm3 cannot be applied",
                fix="give NIfTI/NRRD probability maps, or filter by --min-lesion-voxels",
            )
        return 1.0
    return float(geometry.voxel_volume_mm3)
