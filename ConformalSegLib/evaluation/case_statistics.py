"""Pass 1 of the evaluation protocol: one case's statistics (the map step) and their merge in case order.

:func:`case_record` reads nothing: it turns one :class:`~.cases.EvalCase` into a :class:`CaseRecord` -- its
sorted lesion probabilities, lesion detection thresholds, confidence-set statistics per transform, and the
baseline's counts and HD95. It runs serially or as a task on a worker (:mod:`.case_tasks`); only the record
travels back. :func:`merge_records` concatenates the records **in case order** into
:class:`CaseStatistics`, exactly what the streaming builders (``SummaryBuilder``, ``LesionLevelBuilder``,
``SetStatisticsBuilder``) build when fed the same cases one by one: their ``build`` is a concatenation of
their per-case parts (as in :func:`ConformalSegLib.conformal.case_summaries.merge_case_summaries`). So the
statistics, and every number computed from them, are bit-identical whatever the executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.cls import apply_threshold
from ..conformal.confidence_sets import SetStatistics, SetStatisticsBuilder
from ..conformal.lesion_level import LesionLevelSummaries
from ..conformal.score_transforms import ScoreTransform
from ..conformal.summaries import LesionSummaries, SummaryBuilder
from .cases import EvalCase
from .config import EvaluationConfig
from .lesion_protocol import LesionStatistics, LesionStatisticsBuilder
from .metrics import hd95 as hd95_metric
from .results import BASELINE_CUTOFF

__all__ = ["CaseRecord", "CaseStatistics", "case_record", "merge_records"]


@dataclass
class CaseStatistics:
    """What pass 1 keeps of the cases: summaries, set statistics and the baseline's counts (n,)."""

    ids: list[str]
    summaries: LesionSummaries
    set_stats: dict[str, SetStatistics]
    n_voxels: np.ndarray  # int64
    voxel_ml: np.ndarray  # float64
    base_pred: np.ndarray  # int64: voxels of the 0.5 mask
    base_fp: np.ndarray  # int64: voxels of the 0.5 mask outside the lesion
    base_hd: np.ndarray  # float64: HD95 of the 0.5 mask (NaN when not computed)
    population: np.ndarray  # bool: cases used by CLS / CRC / baseline
    lesions: LesionStatistics  # detection thresholds and lesion sizes (lesion-level method, lesion-wise metrics)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def sizes(self) -> np.ndarray:
        return self.summaries.lesion_sizes

    def check_population(self, empty: str) -> None:
        if empty == "exclude" and np.count_nonzero(self.population) < 2:
            raise ConformalSegError(
                f"only {int(np.count_nonzero(self.population))} of {self.n} case(s) have lesion voxels: "
                "CLS and expected-FNR control need lesion cases on both sides of the split",
                fix="check the lesion label value(s) (--lesion-label), add lesion cases, or use --empty include",
            )


@dataclass(frozen=True)
class CaseRecord:
    """One case's pass-1 statistics (what a worker sends back: no volume)."""

    case_id: str
    summary: LesionSummaries  # one case
    lesions: LesionStatistics  # one case
    sets: dict[str, SetStatistics]  # one case per transform
    n_voxels: int
    voxel_ml: float
    base_pred: int
    base_fp: int
    base_hd: float


def case_record(shared: tuple[EvaluationConfig, list[ScoreTransform]], index: int, case: EvalCase) -> CaseRecord:
    """Pass 1 on one case (``shared = (config, transforms)``); the task function of the first map."""
    config, score_transforms = shared
    prob, lesion = case.probability, case.lesion
    builder = SummaryBuilder("float32")
    builder.add_case(case.case_id, prob, lesion)
    lesion_builder = LesionStatisticsBuilder(config.detect_fraction)
    lesion_builder.add_case(case.case_id, prob, lesion, case.geometry.voxel_volume_mm3)
    sets = {}
    for t in score_transforms:
        set_builder = SetStatisticsBuilder(t, t)
        set_builder.add_case(case.case_id, prob, lesion, case.geometry)
        sets[t.name] = set_builder.build()
    base_mask = apply_threshold(prob, BASELINE_CUTOFF)
    in_population = config.empty == "include" or bool(lesion.any())
    return CaseRecord(
        case.case_id,
        builder.build(),
        lesion_builder.build(),
        sets,
        int(prob.size),
        case.geometry.voxel_volume_mm3 / 1000.0,
        int(np.count_nonzero(base_mask)),
        int(np.count_nonzero(base_mask & ~lesion)),
        hd95_metric(base_mask, lesion, case.geometry.spacing_zyx) if config.hd95 and in_population else float("nan"),
    )


def merge_records(records: Sequence[CaseRecord], config: EvaluationConfig, set_names: Sequence[str]) -> CaseStatistics:
    """Concatenate the records in the given order (duplicate case ids refused); ``set_names``: the transforms."""
    seen: set[str] = set()
    for r in records:
        if r.case_id in seen:
            raise ConformalSegError(
                f"duplicate case id {r.case_id!r} in the evaluation data", fix="give every case a unique id"
            )
        seen.add(r.case_id)
    ids = [r.case_id for r in records]
    summaries = _concat_lesion([r.summary for r in records])
    set_stats = {name: _concat_sets([r.sets[name] for r in records], name) for name in set_names}
    lesion_parts = [r.lesions for r in records]
    empty_lesions = LesionStatisticsBuilder(config.detect_fraction).build()
    levels = [p.summaries for p in lesion_parts]
    lesion_level = LesionLevelSummaries(
        np.concatenate([s.values for s in levels]) if levels else empty_lesions.summaries.values,
        np.concatenate([s.sizes for s in levels]) if levels else empty_lesions.summaries.sizes,
        _offsets([s.values.size for s in levels]),
        tuple(i for s in levels for i in s.case_ids),
        empty_lesions.summaries.detect_fraction,
        empty_lesions.summaries.min_lesion_voxels,
        empty_lesions.summaries.min_lesion_mm3,
    )
    voxel_mm3 = np.asarray([float(v) for p in lesion_parts for v in p.voxel_mm3], dtype=np.float64)
    n = len(ids)
    population = summaries.lesion_sizes > 0 if config.empty == "exclude" else np.ones(n, dtype=bool)
    return CaseStatistics(
        ids,
        summaries,
        set_stats,
        np.asarray([r.n_voxels for r in records], dtype=np.int64),
        np.asarray([r.voxel_ml for r in records], dtype=np.float64),
        np.asarray([r.base_pred for r in records], dtype=np.int64),
        np.asarray([r.base_fp for r in records], dtype=np.int64),
        np.asarray([r.base_hd for r in records], dtype=np.float64),
        population,
        LesionStatistics(lesion_level, voxel_mm3),
    )


def _concat_lesion(parts: Sequence[LesionSummaries]) -> LesionSummaries:
    if not parts:
        return SummaryBuilder("float32").build()
    values = np.concatenate([p.values for p in parts])
    ids = tuple(i for p in parts for i in p.case_ids)
    return LesionSummaries(values, _offsets([p.values.size for p in parts]), ids, "float32")


def _concat_sets(parts: Sequence[SetStatistics], name: str) -> SetStatistics:
    if not parts:
        return SetStatistics(np.zeros(0, np.float64), np.zeros(0, np.float64), (), name, name, np.zeros(0, np.int64))
    return SetStatistics(
        np.concatenate([s.tau for s in parts]),
        np.concatenate([s.gamma for s in parts]),
        tuple(i for s in parts for i in s.case_ids),
        parts[0].inner_transform,
        parts[0].outer_transform,
        np.concatenate([s.lesion_sizes for s in parts]),
    )


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets
