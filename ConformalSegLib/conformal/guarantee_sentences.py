"""The guarantee of a calibration, as one plain sentence (shown by the CLI, reports and Slicer)."""

from __future__ import annotations

import math

from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration
from .crc import min_crc_calibration_size
from .exact import as_fraction, min_calibration_size, needed_calibration_size
from .lesion_level import LesionLevelCalibration
from .ltt import LttCalibration, ltt_sentence
from .rcps import RcpsCalibration, min_rcps_calibration_size
from .simultaneous import SimultaneousBand


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
    if isinstance(calibration, LttCalibration):
        return ltt_sentence(calibration)
    if isinstance(calibration, RcpsCalibration):
        return _rcps_sentence(calibration)
    c = calibration
    if c.method == "cls":
        assert c.alpha is not None  # CLS always has one
        sentence = (
            f"{_chance(c.alpha, c.pac_delta)}, at most {percent(c.epsilon)} of the lesion voxels of a new scan are "
            f"missed; {_population(c)}."
        )
        if c.whole_image_from_ties:
            sentence += TIES_WARNING
        elif c.is_trivial:
            sentence += _too_few(c.n, c.alpha, c.pac_delta, "the mask is the whole image")
        return sentence + _ties_note(c)
    sentence = (
        f"On average over new scans, at most {percent(c.epsilon)} of the lesion voxels are missed (expected FNR "
        f"control); {_population(c)}."
    )
    if c.whole_image_from_ties:
        sentence += TIES_WARNING
    elif c.is_trivial:
        if as_fraction(c.epsilon) == 0:
            sentence += " Warning: expected-FNR control needs epsilon > 0, so the mask is the whole image."
        else:
            sentence += (
                f" Warning: {c.n} scans are too few for epsilon = {c.epsilon:g} (at least "
                f"{min_crc_calibration_size(c.epsilon)} are needed), so the mask is the whole image."
            )
    return sentence + _ties_note(c)


def _ties_note(c: ThresholdCalibration) -> str:
    if c.tie_seed is None:
        return ""
    return (
        f" Ties between equal probabilities are broken at random (seed {c.tie_seed}), so the level is met "
        "closely rather than exceeded by the ties."
    )


#: Appended when a finite cutoff at 0 selects the whole image (see cls.warn_if_whole_image_from_ties).
TIES_WARNING = (
    " Warning: lesion voxels tied at probability 0 put the cutoff at 0, so the mask is the whole image "
    "(calibrate on unquantised maps or logits, or break ties at random)."
)


def _rcps_sentence(c: RcpsCalibration) -> str:
    bound = {"hb": "Hoeffding-Bentkus", "wsr": "Waudby-Smith-Ramdas"}[c.bound]
    sentence = (
        f"With confidence at least {percent(1 - c.delta)} over the draw of the calibration scans, on average over "
        f"new scans at most {percent(c.epsilon)} of the lesion voxels are missed (RCPS, {bound} bound); "
        f"{_population(c)}."
    )
    if c.whole_image_from_ties:
        sentence += TIES_WARNING
    elif c.is_trivial:
        if as_fraction(c.epsilon) == 0:
            sentence += " Warning: RCPS needs epsilon > 0, so the mask is the whole image."
        else:
            sentence += (
                f" Warning: {c.n} scans are too few for epsilon = {c.epsilon:g} and delta = {c.delta:g} (at least "
                f"{min_rcps_calibration_size(c.epsilon, c.delta, c.bound)} are needed), so the mask is the whole image."
            )
    return sentence


def _population(c: ThresholdCalibration) -> str:
    """Who the guarantee is for: scans with a lesion, or (``include`` policy) all scans, said exactly."""
    if c.n_with_lesion is None:
        return f"{_cases(c.n, 'scan')} with a lesion"
    return (
        f"{_cases(c.n, 'scan')} ({c.n_with_lesion} with a lesion); the guarantee averages over scans with and "
        "without a lesion in that proportion"
    )


def _chance(alpha: float, pac_delta: float | None) -> str:
    """ "With probability at least 1 - alpha" or, calibration-conditional, the PAC statement's opening."""
    if pac_delta is None:
        return f"With probability at least {percent(1 - alpha)}"
    return (
        f"With confidence at least {percent(1 - pac_delta)} over the draw of the calibration scans (PAC), for at "
        f"least {percent(1 - alpha)} of new scans"
    )


def _too_few(n: int, alpha: float, pac_delta: float | None, consequence: str) -> str:
    needed = needed_calibration_size(alpha, pac_delta)
    levels = f"alpha = {alpha:g}" if pac_delta is None else f"alpha = {alpha:g} with PAC delta = {pac_delta:g}"
    return f" Warning: {n} scans are too few for {levels} (at least {needed} are needed), so {consequence}."


def _sets_sentence(c: SetsCalibration) -> str:
    if c.pac_delta is not None:
        return _pac_sets_sentence(c)
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
    sentence = f"{_chance(c.alpha, c.pac_delta)}, {missed} ({_detection_rule(c)}); {_cases(c.n, 'scan')} with a lesion."
    if c.whole_image_from_ties:
        sentence += TIES_WARNING
    elif c.is_trivial:
        sentence += _too_few(c.n, c.alpha, c.pac_delta, "the mask is the whole image")
    return sentence


def _pac_sets_sentence(c: SetsCalibration) -> str:
    """The calibration-conditional (PAC) statement of confidence sets."""
    assert c.pac_delta is not None
    if c.mode == "marginal":
        body = (
            f"the inner set lies inside the true lesion for at least {percent(1 - c.alpha_inner)} of new scans, "
            f"and (separately) the outer set contains it for at least {percent(1 - c.alpha_outer)}"
        )
    else:
        body = (
            f"for at least {percent(1 - c.alpha)} of new scans the inner set lies inside the true lesion and the "
            "outer set contains it, both at once"
        )
    sentence = (
        f"With confidence at least {percent(1 - c.pac_delta)} over the draw of the calibration scans (PAC), "
        f"{body}; {_cases(c.n, 'scan')}."
    )
    if (math.isinf(c.inner_threshold) and c.inner_threshold > 0) or (
        math.isinf(c.outer_threshold) and c.outer_threshold < 0
    ):
        sentence += _too_few(
            c.n,
            min(c.alpha_inner, c.alpha_outer),
            c.pac_delta,
            "the inner set is empty and/or the outer set is the whole image",
        )
    return sentence


def band_sentence(band: SimultaneousBand, method: str, epsilon: float | None = None) -> str:
    """The slider-safe statement: one event for every epsilon of the grid (``method``: ``cls`` or ``lesion``)."""
    grid = band.grid
    step = f"in steps of {percent(grid[1] - grid[0])}" if len(grid) > 1 else "(one value)"
    what = "of the lesions" if method == "lesion" else "of the lesion voxels"
    sentence = (
        f"Slider-safe: with probability at least {percent(1 - band.alpha)}, for EVERY epsilon on the slider "
        f"({percent(grid[0])} to {percent(grid[-1])} {step}) at once, the mask at that epsilon misses at most "
        f"epsilon {what} of a new scan, so epsilon may be chosen after looking; calibrated on {band.n} scans."
    )
    if epsilon is not None:
        sentence += f" Now at epsilon = {percent(epsilon)}."
    if band.is_trivial:
        sentence += (
            f" Warning: {band.n} scans are too few for a finite band at alpha = {band.alpha:g} "
            f"(a fixed epsilon needs {min_calibration_size(band.alpha)}), so the mask is the whole image."
        )
    return sentence
