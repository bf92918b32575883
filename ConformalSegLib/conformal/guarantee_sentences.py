"""The guarantee of a calibration, as one plain sentence (shown by the CLI, reports and Slicer)."""

from __future__ import annotations

import math

from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration
from .exact import min_calibration_size
from .lesion_level import LesionLevelCalibration


def percent(x: float) -> str:
    """``0.1 -> '10%'``, ``0.025 -> '2.5%'`` (no float noise)."""
    return f"{round(100 * x, 6):g}%"


def _cases(n: int, what: str) -> str:
    return f"calibrated on {n} {what}{'' if n == 1 else 's'}"


def guarantee_sentence(calibration: ThresholdCalibration | SetsCalibration) -> str:
    """One sentence stating what the calibrated output guarantees, and a warning when trivial."""
    if isinstance(calibration, SetsCalibration):
        return _sets_sentence(calibration)
    if isinstance(calibration, LesionLevelCalibration):
        return _lesion_level_sentence(calibration)
    if calibration.method == "cls":
        assert calibration.alpha is not None  # CLS always has one
        sentence = (
            f"With probability at least {percent(1 - calibration.alpha)}, at most "
            f"{percent(calibration.epsilon)} of the lesion voxels of a new scan are missed; "
            f"{_cases(calibration.n, 'scan')} with a lesion."
        )
        if calibration.is_trivial:
            sentence += (
                f" Warning: {calibration.n} scans are too few for alpha = {calibration.alpha:g} "
                f"(at least {min_calibration_size(calibration.alpha)} are needed), so the mask is the whole "
                "image."
            )
        return sentence
    sentence = (
        f"On average over new scans, at most {percent(calibration.epsilon)} of the lesion voxels are "
        f"missed (expected FNR control); {_cases(calibration.n, 'scan')} with a lesion."
    )
    if calibration.is_trivial:
        needed = max(0, math.ceil(1 / calibration.epsilon - 1)) if calibration.epsilon > 0 else "more"
        sentence += (
            f" Warning: {calibration.n} scans are too few for epsilon = {calibration.epsilon:g} "
            f"(at least {needed} are needed), so the mask is the whole image."
        )
    return sentence


def _sets_sentence(c: SetsCalibration) -> str:
    if c.mode == "marginal":
        sentence = (
            f"With probability at least {percent(1 - c.alpha_inner)}, the inner set lies inside the true "
            f"lesion; with probability at least {percent(1 - c.alpha_outer)}, the outer set contains the "
            f"whole lesion; {_cases(c.n, 'scan')}."
        )
    else:
        how = (
            "max-based, Theorem 2.4"
            if c.mode == "joint-max"
            else (f"alpha split {c.alpha_inner:g} + {c.alpha_outer:g}, Corollary 2.3")
        )
        sentence = (
            f"With probability at least {percent(1 - c.alpha)}, the inner set lies inside the true lesion "
            f"and the outer set contains it, both at once ({how}); {_cases(c.n, 'scan')}."
        )
    if (
        math.isinf(c.inner_threshold)
        and c.inner_threshold > 0
        or (math.isinf(c.outer_threshold) and c.outer_threshold < 0)
    ):
        level = min(c.alpha_inner, c.alpha_outer)
        sentence += (
            f" Warning: {c.n} scans are too few for alpha = {level:g} (at least "
            f"{min_calibration_size(level)} are needed): the inner set is empty and/or the outer set is the "
            "whole image."
        )
    return sentence


def _detection_rule(c: LesionLevelCalibration) -> str:
    """How a lesion counts as found, and which lesions count (the size filter)."""
    share = percent(c.detect_fraction)
    rule = f"a lesion counts as found when at least {share} of its voxels, and one at least, are in the mask"
    sizes = []
    if c.min_lesion_voxels:
        sizes.append(f"{c.min_lesion_voxels} voxels")
    if c.min_lesion_mm3:
        sizes.append(f"{c.min_lesion_mm3:g} mm^3")
    if sizes:
        rule += f"; lesions smaller than {' or '.join(sizes)} are not counted"
    return rule


def _lesion_level_sentence(c: LesionLevelCalibration) -> str:
    assert c.alpha is not None  # lesion-level calibrations always have one
    missed = f"at most {percent(c.epsilon)} of the lesions of a new scan are missed"
    if c.voxel_epsilon is not None:
        missed += f" and, at the same time, at most {percent(c.voxel_epsilon)} of its lesion voxels"
    sentence = (
        f"With probability at least {percent(1 - c.alpha)}, {missed} ({_detection_rule(c)}); "
        f"{_cases(c.n, 'scan')} with a lesion."
    )
    if c.is_trivial:
        sentence += (
            f" Warning: {c.n} scans are too few for alpha = {c.alpha:g} (at least "
            f"{min_calibration_size(c.alpha)} are needed), so the mask is the whole image."
        )
    return sentence
