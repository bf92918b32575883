"""The parameters of an evaluation: checked once, before any case is read, into an :class:`EvaluationConfig`.

epsilon, alpha and the calibration fraction are read exactly as typed (:mod:`ConformalSegLib.conformal.exact`);
the main setting must be one of the grid's values; each calibration/test side needs at least one case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.cls import EMPTY_POLICIES
from ..conformal.confidence_sets import MODES
from ..conformal.exact import as_fraction, check_alpha, check_detect_fraction, check_epsilon
from ..conformal.score_transforms import ScoreTransform, parse_transform
from ..conformal.threshold_scores import DEFAULT_SCORE, parse_threshold_score

__all__ = ["DEFAULT_SET_MODES", "EvaluationConfig", "check_fraction", "check_grid", "make_config", "split_sizes"]

DEFAULT_SET_MODES = ("marginal", "joint-split")


@dataclass(frozen=True)
class EvaluationConfig:
    """Parameters of one evaluation (floats as given; read exactly via
    :func:`~ConformalSegLib.conformal.exact.as_fraction`)."""

    epsilons: tuple[float, ...]
    alphas: tuple[float, ...]
    main_epsilon: float
    main_alpha: float
    splits: int
    cal_fraction: float
    seed: int
    transforms: tuple[str, ...]
    set_modes: tuple[str, ...]
    hd95: bool
    empty: str
    detect_fraction: float = 0.5  #: lesion-level method and lesion-wise metrics: share of a lesion that finds it
    voxel_epsilon: float | None = None  #: lesion-level method: joint with the voxel FNR at this tolerance
    lesionwise: bool = True  #: false-positive components and mL at the main setting (pass 2 labelling)
    score: str = DEFAULT_SCORE  #: what every method thresholds: the probability, or a score of it (``--score``)

    @property
    def main_epsilon_index(self) -> int:
        return _index_of(self.epsilons, self.main_epsilon)

    @property
    def main_alpha_index(self) -> int:
        return _index_of(self.alphas, self.main_alpha)


def _index_of(values: Sequence[float], value: float) -> int:
    target = as_fraction(value)
    for i, v in enumerate(values):
        if as_fraction(v) == target:
            return i
    raise ValueError(f"{value} not in {values}")


def make_config(
    epsilons: Sequence[float],
    alphas: Sequence[float],
    main_alpha: float | None,
    main_epsilon: float | None,
    splits: int,
    cal_fraction: float,
    seed: int,
    transforms: Sequence[str | ScoreTransform],
    set_modes: Sequence[str],
    hd95: bool,
    empty: str,
    detect_fraction: float = 0.5,
    voxel_epsilon: float | None = None,
    lesionwise: bool = True,
    score: str = DEFAULT_SCORE,
) -> tuple[EvaluationConfig, list[ScoreTransform]]:
    """Check every parameter of :func:`~ConformalSegLib.evaluation.protocol.evaluate_dataset` before any
    case is read; return the configuration and the score transforms."""
    epsilons = check_grid(epsilons, "epsilons", check_epsilon)
    alphas = check_grid(alphas, "alphas", lambda a: check_alpha(a))
    main_alpha = alphas[0] if main_alpha is None else float(main_alpha)
    check_alpha(main_alpha, "main_alpha")
    if as_fraction(main_alpha) not in {as_fraction(a) for a in alphas}:
        raise ConformalSegError(
            f"main_alpha {main_alpha} is not one of the alphas {list(alphas)}",
            fix="add it to --alphas or choose one of them",
        )
    if (
        isinstance(splits, bool)
        or not isinstance(splits, (int, np.integer, float))
        or int(splits) != splits
        or splits < 1
    ):
        raise ConformalSegError(f"splits must be a positive integer, got {splits!r}", fix="pass e.g. --splits 100")
    if empty not in EMPTY_POLICIES:
        raise ConformalSegError(f"empty-lesion policy must be one of {EMPTY_POLICIES}, got {empty!r}")
    score_transforms: list[ScoreTransform] = []
    for t in transforms:
        st = t if isinstance(t, ScoreTransform) else parse_transform(t)
        if st.name not in {s.name for s in score_transforms}:
            score_transforms.append(st)
    set_modes = tuple(set_modes)
    for mode in set_modes:
        if mode not in MODES:
            raise ConformalSegError(f"unknown confidence-set mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    if score_transforms and not set_modes:
        raise ConformalSegError("confidence sets requested without any mode", fix=f"use one of {', '.join(MODES)}")
    check_fraction(cal_fraction)  # before any case is read
    main_epsilon = epsilons[0] if main_epsilon is None else float(main_epsilon)
    check_epsilon(main_epsilon)
    if as_fraction(main_epsilon) not in {as_fraction(e) for e in epsilons}:
        raise ConformalSegError(
            f"main_epsilon {main_epsilon} is not one of the epsilons {list(epsilons)}",
            fix="add it to --epsilons or choose one of them",
        )
    config = EvaluationConfig(
        epsilons,
        alphas,
        main_epsilon,
        main_alpha,
        int(splits),
        float(cal_fraction),
        int(seed),
        tuple(t.name for t in score_transforms),
        set_modes if score_transforms else (),
        bool(hd95),
        empty,
        float(detect_fraction),
        None if voxel_epsilon is None else float(voxel_epsilon),
        bool(lesionwise),
        parse_threshold_score(score).name,
    )
    check_detect_fraction(detect_fraction)
    if voxel_epsilon is not None:
        check_epsilon(voxel_epsilon)
    return config, score_transforms


def check_grid(values: Sequence[float], name: str, check: Callable[[float], Fraction]) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(float(v) for v in values)
    if not values:
        raise ConformalSegError(f"no {name} given", fix=f"pass at least one value, e.g. --{name} 0.1")
    seen: set[Fraction] = set()
    for v in values:
        f = check(v)
        if f in seen:
            raise ConformalSegError(f"{name} {v} is listed twice", fix=f"list each {name[:-1]} value once")
        seen.add(f)
    return values


def check_fraction(cal_fraction: float) -> Fraction:
    try:
        fraction = as_fraction(cal_fraction)
    except (TypeError, ValueError) as exc:
        raise ConformalSegError(
            f"cal_fraction must be a number, got {cal_fraction!r}", fix="pass e.g. --cal-fraction 0.5"
        ) from exc
    if not 0 < fraction < 1:
        raise ConformalSegError(
            f"cal_fraction must lie strictly between 0 and 1, got {cal_fraction}", fix="pass e.g. --cal-fraction 0.5"
        )
    return fraction


def split_sizes(n: int, cal_fraction: float) -> tuple[int, int]:
    """``(n_cal, n_test)`` with ``n_cal = floor(cal_fraction * n)`` (exact); each side must be non-empty."""
    n_cal = math.floor(check_fraction(cal_fraction) * n)
    n_test = n - n_cal
    if n_cal < 1 or n_test < 1:
        raise ConformalSegError(
            f"too few cases for a calibration/test split: {n} case(s) with cal_fraction {cal_fraction} gives "
            f"{n_cal} calibration and {n_test} test case(s); each side needs at least one",
            fix="add cases (at least 2, realistically 20 or more) or change --cal-fraction",
        )
    return n_cal, n_test
