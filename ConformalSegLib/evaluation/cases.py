"""The cases an evaluation reads: any dataset or list of case-like objects, adapted to one shape.

:class:`CaseSource` wraps a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` or a re-iterable of
objects with ``case_id``, ``probability`` and ``lesion`` (arrays or
:class:`~ConformalSegLib.io.volumes.Volume` objects) and yields :class:`EvalCase` objects (float
probability map, bool lesion mask, geometry), checked on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..conformal.summaries import check_probabilities
from ..conformal.threshold_scores import DEFAULT_SCORE, parse_threshold_score, threshold_scores

__all__ = ["CaseSource", "EvalCase", "as_eval_case"]


@dataclass
class EvalCase:
    """One case as the evaluation sees it: float probability map, bool lesion mask, geometry."""

    case_id: str
    probability: np.ndarray
    lesion: np.ndarray
    geometry: Geometry


def _unwrap(value: Any) -> tuple[np.ndarray, Geometry | None]:
    """An array and its geometry from a :class:`~ConformalSegLib.io.volumes.Volume` or a bare array."""
    if hasattr(value, "array") and hasattr(value, "geometry"):
        return np.asarray(value.array), value.geometry
    return np.asarray(value), None


def as_eval_case(item: Any, score: str = DEFAULT_SCORE) -> EvalCase:
    """Adapt an :class:`~ConformalSegLib.io.dataset.Case` (Volumes) or any object with ``case_id``,
    ``probability`` and ``lesion`` arrays and an optional ``geometry`` (e.g. a
    :class:`~ConformalSegLib.phantoms.simulated_maps.SyntheticCase`); with a ``score`` other than the
    probability (:mod:`~ConformalSegLib.conformal.threshold_scores`), its map replaces the probability."""
    try:
        case_id = str(item.case_id)
        probability, prob_geometry = _unwrap(item.probability)
        lesion, lesion_geometry = _unwrap(item.lesion)
    except AttributeError as exc:
        raise ConformalSegError(
            f"cannot evaluate {type(item).__name__!r} objects: a case needs case_id, probability and lesion attributes",
            fix="pass a CalibrationDataset or objects like SyntheticCase",
        ) from exc
    geometry = prob_geometry or getattr(item, "geometry", None) or lesion_geometry
    if probability.ndim != 3:
        raise ConformalSegError(
            f"case {case_id!r}: the probability map is {probability.ndim}D, expected 3D",
            fix="give one 3D probability map per case",
        )
    if probability.dtype.kind != "f":
        raise ConformalSegError(
            f"case {case_id!r}: the probability map has {probability.dtype} voxels, "
            "expected floating point probabilities",
            fix="pass probabilities in [0, 1]",
        )
    if lesion.shape != probability.shape:
        raise ConformalSegError(
            f"case {case_id!r}: lesion mask shape {lesion.shape} != probability map shape {probability.shape}",
            fix="resample both onto the same voxel grid",
        )
    known_geometry = geometry is not None
    if geometry is None:
        geometry = Geometry(shape=probability.shape)
    elif tuple(geometry.shape) != probability.shape:
        raise ConformalSegError(
            f"case {case_id!r}: geometry shape {geometry.shape} != array shape {probability.shape}",
            fix="pass the geometry of the probability map",
        )
    if score != DEFAULT_SCORE:
        check_probabilities(probability, case_id)  # the score must be computed from a valid probability map
        # a bare array has no spacing: the score (in mm) is refused rather than computed on an assumed 1 mm grid
        probability = threshold_scores(probability, geometry if known_geometry else None, score)
    return EvalCase(case_id, probability, np.asarray(lesion, dtype=bool), geometry)


class CaseSource:
    """Re-iterable view of a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` or of any
    re-iterable of case-like objects (see :func:`as_eval_case`), yielding :class:`EvalCase`.

    One-shot iterators (generators, ``iter(list)``) are refused: the evaluation reads the cases twice.
    """

    data: Iterable[Any]
    score: str  #: the score that replaces each probability map (:func:`as_eval_case`)

    def __init__(self, data: Iterable[Any], score: str = DEFAULT_SCORE):
        if isinstance(data, CaseSource):
            score = data.score if score == DEFAULT_SCORE else score
            data = data.data
        self.score = parse_threshold_score(score).name
        if isinstance(data, Iterator):  # generators, iter(list), map objects, ...; no iter() call here
            raise ConformalSegError(
                f"the evaluation reads the cases twice, but got a one-shot iterator ({type(data).__name__})",
                fix="pass a CalibrationDataset or a list of cases (e.g. list(make_cases(...)))",
            )
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    @property
    def known_length(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None

    def __iter__(self) -> Iterator[EvalCase]:
        for item in self.data:
            yield as_eval_case(item, self.score)
