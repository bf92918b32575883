"""``calibrate --score auto``: choose a threshold method's score on learning scans kept apart from calibration.

Which score gives a threshold method its smallest mask is an empirical question (the margin wins where the
network ranks a target's outer layers with the background, the probability where whole lesions are missed far
from any predicted blob; ``benchmarks/RESULTS.md``). :func:`select_score` answers it on *learning* scans, the
way :func:`~.confidence_sets.select_transforms` chooses the confidence sets' transforms: for each candidate
score, the learning scans are split in half ``repeats`` times (seeded), the requested method is calibrated on
one half (the same per-scan summaries and thresholds as ``calibrate``) and its mask measured on the other: the
mean share of a scan's voxels at or above the cutoff (prediction compactness). The candidate with the smallest
mean wins; ties go to the earlier candidate (the probability first).

Guarantee: unchanged, **provided the learning scans are not calibration or test scans**. The choice is then a
fixed function of data independent of the calibration and the new scan, so the calibration scans and the new
scan stay exchangeable under the chosen score. (Choosing on the calibration scans themselves would break
this: the CLI refuses learning maps identical to calibration maps.)

Memory: one sorted float32 copy of each score map per learning scan and candidate (as ``select_transforms``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .calibration import CalibrationRequest, calibrate_summaries
from .case_summaries import CaseSummary, merge_case_summaries, summarize_case
from .threshold_scores import parse_threshold_score, threshold_scores

#: Candidates of ``--score auto``: the probability first (it wins ties), the margin, a light smoothing.
DEFAULT_SCORE_CANDIDATES: tuple[str, ...] = ("identity", "margin:0.5", "gaussian:2.0")
#: Fewest learning scans accepted (two halves of at least two).
MIN_LEARNING_SCANS = 4


@dataclass(frozen=True)
class ScoreSelection:
    """Outcome of :func:`select_score`: the chosen score and each candidate's mean mask share on held-out halves."""

    score: str
    mean_fraction: dict[str, float]
    n_learning: int


def select_score(
    learning_cases: Iterable[tuple[str, np.ndarray, np.ndarray, Geometry]],
    request: CalibrationRequest,
    candidates: Sequence[str] = DEFAULT_SCORE_CANDIDATES,
    *,
    repeats: int = 20,
    seed: int = 0,
) -> ScoreSelection:
    """The candidate score whose ``request`` masks are smallest on held-out learning halves (module docstring).

    ``learning_cases`` yields ``(case_id, probability, lesion, geometry)``; ``request`` is the calibration to be
    made (its method, epsilon, alpha...; its own ``score`` is ignored). Tie-breaking at random and confidence
    sets are refused (their masks are not a cutoff on one score)."""
    names = [parse_threshold_score(c).name for c in candidates]
    if not names or len(set(names)) != len(names):
        raise ConformalSegError("the candidate scores must be distinct and at least one", fix="list each score once")
    if request.method == "sets" or request.tie_breaking != "none":
        raise ConformalSegError(
            "--score auto chooses the score of cls, crc, rcps, ltt and lesion without tie-breaking",
            fix="name a score (e.g. --score margin), or leave out --tie-breaking",
        )
    requests = {name: dataclasses.replace(request, score=name) for name in names}
    parts: dict[str, list[CaseSummary]] = {name: [] for name in names}
    sorted_scores: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for case_id, probability, lesion, geometry in learning_cases:
        for name in names:
            parts[name].append(summarize_case(case_id, probability, lesion, geometry, requests[name]))
            sorted_scores[name].append(np.sort(threshold_scores(probability, geometry, name), axis=None))
    n = len(parts[names[0]])
    if n < MIN_LEARNING_SCANS:
        raise ConformalSegError(
            f"--score auto needs at least {MIN_LEARNING_SCANS} learning scans, got {n}",
            fix="add learning scans (kept apart from calibration), or name a score",
        )
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n) for _ in range(repeats)]
    mean_fraction = {
        name: float(_mean_fraction(parts[name], sorted_scores[name], requests[name], splits)) for name in names
    }
    best = min(names, key=lambda name: (mean_fraction[name], names.index(name)))
    return ScoreSelection(best, mean_fraction, n)


def _mean_fraction(
    parts: list[CaseSummary], sorted_scores: list[np.ndarray], request: CalibrationRequest, splits: list[np.ndarray]
) -> float:
    """The mean share of a held-out scan's voxels at or above the cutoff calibrated on the other half."""
    total, count = 0.0, 0
    half = len(parts) // 2
    for perm in splits:
        calibration, held = perm[:half], perm[half:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small halves: a trivial cutoff is measured as the whole scan
            try:
                merged = merge_case_summaries([parts[i] for i in sorted(calibration)], request)
                cutoff = calibrate_summaries(merged, request).calibration.probability_threshold  # type: ignore[union-attr]
            except ConformalSegError:  # e.g. no lesion in this half: the whole scan
                cutoff = 0.0
        for j in held:
            scores = sorted_scores[j]
            total += (scores.size - np.searchsorted(scores, cutoff, side="left")) / max(scores.size, 1)
            count += 1
    return total / count
