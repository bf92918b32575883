"""Randomised tie-breaking (smoothed conformal ranks) for CLS and expected-FNR control (opt-in).

Why
---
Saturated or quantised probability maps (nnU-Net's probabilities pile at 0.0001 / 0.9999; uint8
exports; a cascade's zero outside its ROIs) put many lesion voxels at the same value. A mask
``prob >= c`` must then keep or drop a whole tie at once, so each scan's FNR curve jumps, many
calibration scans share the same critical cutoff, and the conformal cutoff is conservative: the
coverage is ``>= 1 - alpha`` but can be far above it (masks too large), and ties at probability 0
force the whole image (:func:`~ConformalSegLib.conformal.cls.warn_if_whole_image_from_ties`).

Construction
------------
Every voxel gets an independent key ``u ~ Uniform(0, 1)`` (seeded), and voxels are ordered by the pair
``(prob, u)`` lexicographically. A threshold is a pair ``T = (c, u_hat)`` and the mask is

    (prob, u) >= (c, u_hat)   i.e.   prob > c,  or  prob == c and u >= u_hat.

Probabilities are compared as stored in the summaries (float32, rounded down from float64 maps:
:func:`~ConformalSegLib.conformal.summaries.round_down_float32`), so calibration and application see the
same ties. With pairs instead of probabilities everything in :mod:`.cls` and :mod:`.crc` carries over
verbatim: ``FNR_i(T)`` is non-increasing in the mask, the critical pair ``C_i`` of scan ``i`` is the
``k_i``-th largest lesion pair, and ``FNR_i(T) <= eps  <=>  T <= C_i``.

* **CLS**: ``T_hat`` = the ``k``-th largest of ``C_1..C_n`` (``k = ceil((1 - alpha)(n + 1))``, or the PAC rank).
* **CRC**: ``T_hat`` = the largest pair with ``sum_i FNR_i(T) <= (n + 1) eps - 1``, found on the global
  ``(prob, u)``-descending order of the lesion voxels (each step adds one voxel's weight ``1/m_i``), with the
  same float search plus exact-fraction check as :func:`~ConformalSegLib.conformal.crc.crc_cutoff`.

Why the coverage is then close to ``1 - alpha``, not only ``>= 1 - alpha`` (proof sketch)
------------------------------------------------------------------------------------------
The keys are independent of the data and continuous, so the finite critical pairs ``C_i`` are almost surely
distinct (two scans' pairs can only tie on the key). With exchangeable scans, ``C_1..C_n, C_test`` are
exchangeable and distinct, so the rank of ``C_test`` among them is uniform on ``1..n+1`` and

    P(FNR_test <= eps) = P(T_hat <= C_test) = k / (n + 1)  in  [1 - alpha, 1 - alpha + 1/(n + 1)).

Without the keys ties between ``c_i`` and ``c_test`` only add coverage, by up to the probability mass of a
tie; that is the gap the keys remove. The only ties left are at ``+inf`` (scans without a lesion under
``--empty include``, or ``eps = 1``), which are always covered: coverage can only be larger there. For CRC the
loss now jumps by one voxel weight ``1/m_i`` at a time at distinct thresholds, which is the condition of
the CRC lower bound ``E[FNR] >= eps - 2/(n + 1)`` (Angelopoulos et al. 2022, Thm 2) up to those jumps.

Reproducibility
---------------
Calibration keys come from ``SeedSequence([seed, 0])``, one per stored lesion value (in summary order;
keys within a tie are then sorted descending, which is a relabelling of exchangeable voxels). A test scan's
keys come from ``SeedSequence([seed, 1, h])`` with ``h`` a BLAKE2 hash of the scan's (rounded) probability
map, one key per voxel tied at ``c`` in C order: the same map and seed give bit-identical masks in
``apply``, recalibration and the Slicer slider, and different scans get unrelated keys. The seed is stored
in the profile (``tie_breaking``, ``tie_seed``, ``tie_threshold``).

Not supported (refused): lesion-level and confidence-set profiles, uint16 summaries (rounding would create
ties the map does not have), group-conditional or weighted profiles and the slider-safe band.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import (
    ThresholdCalibration,
    checked_cls_cases,
    critical_cutoffs,
    too_small_message,
    used_cases,
    warn_if_whole_image_from_ties,
)
from .crc import crc_budget, min_crc_calibration_size
from .exact import allowed_misses_array, calibration_rank, needed_calibration_size
from .summaries import LesionSummaries, round_down_float32

TIE_BREAKING = ("none", "random")
_CALIBRATION, _TEST = 0, 1


def check_tie_support(summaries: LesionSummaries) -> None:
    """Refuse summaries whose ties do not come from the maps themselves (uint16 precision)."""
    if summaries.precision != "float32":
        raise ConformalSegError(
            "--tie-breaking random needs float32 summaries (uint16 rounding creates ties the maps do not have)",
            fix="calibrate with --precision float32",
        )


def calibration_keys(summaries: LesionSummaries, seed: int) -> np.ndarray:
    """One key per stored lesion value, so that ``(values, keys)`` is lexicographically descending per scan."""
    n_values = summaries.values.size
    keys = np.random.default_rng(np.random.SeedSequence([int(seed), _CALIBRATION])).random(n_values)
    case = np.repeat(np.arange(summaries.n), summaries.lesion_sizes)
    values = summaries.probabilities_view()
    order = np.lexsort((-keys, -values, case))  # keeps each scan's run and its descending values
    sorted_keys: np.ndarray = keys[order]
    return sorted_keys


def critical_pairs(summaries: LesionSummaries, epsilon: float, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per scan, the critical pair ``(c_i, u_i)``: the ``k_i``-th largest lesion pair (``(+inf, +inf)`` if none)."""
    sizes = summaries.lesion_sizes
    k = sizes - allowed_misses_array(sizes, epsilon)
    cutoffs = critical_cutoffs(summaries, epsilon)
    out = np.full(summaries.n, np.inf)
    has = k > 0
    out[has] = keys[summaries.offsets[:-1][has] + k[has] - 1]
    return cutoffs, out


def kth_largest_pair(cutoffs: np.ndarray, keys: np.ndarray, rank: int) -> tuple[float, float]:
    """The ``rank``-th largest pair in lexicographic order; ``(-inf, 0)`` when ``rank > n``."""
    n = cutoffs.size
    if rank > n:
        return float("-inf"), 0.0
    order = np.lexsort((keys, cutoffs))
    i = order[n - rank]
    return float(cutoffs[i]), float(keys[i])


def calibrate_cls_ties(
    summaries: LesionSummaries,
    epsilon: float,
    alpha: float,
    *,
    seed: int,
    empty: str = "exclude",
    pac_delta: float | None = None,
) -> ThresholdCalibration:
    """CLS with randomised tie-breaking (module docstring): exact, seeded, from the summaries only."""
    check_tie_support(summaries)
    used = checked_cls_cases(summaries, alpha, empty, pac_delta)
    n = int(np.count_nonzero(used))
    cutoffs, keys = critical_pairs(summaries, epsilon, calibration_keys(summaries, seed))
    rank = calibration_rank(n, alpha, pac_delta)
    cutoff, key = kth_largest_pair(cutoffs[used], keys[used], rank)
    _warn(cutoff, key, "CLS")
    if cutoff == float("-inf"):
        level = f"alpha={alpha}" if pac_delta is None else f"alpha={alpha} with PAC delta={pac_delta}"
        warnings.warn(
            too_small_message("CLS", n, needed_calibration_size(alpha, pac_delta), level),
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    with_lesion = int(np.count_nonzero(summaries.lesion_sizes > 0)) if empty == "include" else None
    return ThresholdCalibration(
        "cls", float(epsilon), float(alpha), n, summaries.n - n, cutoff, rank,
        None if pac_delta is None else float(pac_delta), with_lesion, int(seed), key,
    )  # fmt: skip


def _warn(cutoff: float, key: float, method: str) -> None:
    """The whole-image warning when even the keys cannot split the tie at 0 (key 0: every voxel)."""
    if cutoff <= 0 and key <= 0:
        warn_if_whole_image_from_ties(method, cutoff)


def _pair_sum_ok(case_of: np.ndarray, upto: int, sizes: np.ndarray, budget: Fraction) -> bool:
    """Exact ``sum_i FNR_i <= budget`` when the first ``upto + 1`` voxels of the global order are kept."""
    kept = np.bincount(case_of[: upto + 1], minlength=sizes.size)
    lesion = sizes > 0
    misses, m = (sizes - kept)[lesion], sizes[lesion]
    total = math.fsum((misses / m).tolist())
    tol = 2 * sizes.size * np.finfo(np.float64).eps * max(1.0, total) + 1e-300
    if abs(total - float(budget)) > tol:
        return total < float(budget)
    return sum((Fraction(int(d), int(s)) for d, s in zip(misses, m)), Fraction(0)) <= budget


def crc_pair(summaries: LesionSummaries, epsilon: float, seed: int, *, n: int) -> tuple[float, float]:
    """Exact CRC threshold pair (module docstring); ``(-inf, 0)`` / ``(+inf, +inf)`` as in :func:`.crc.crc_cutoff`."""
    budget = crc_budget(n, epsilon)
    sizes = summaries.lesion_sizes
    n_lesion = int(np.count_nonzero(sizes))
    if budget < 0:
        return float("-inf"), 0.0
    if n_lesion <= budget:
        return float("inf"), float("inf")
    values, keys = summaries.probabilities_view(), calibration_keys(summaries, seed)
    case_of = np.repeat(np.arange(summaries.n), sizes)
    order = np.lexsort((-keys, -values))  # global (prob, key)-descending order
    case_of = case_of[order]
    cumulative = np.cumsum(1.0 / sizes[case_of])
    j = min(int(np.searchsorted(cumulative, float(n_lesion - budget), side="left")), order.size - 1)
    if _pair_sum_ok(case_of, j, sizes, budget):
        while j > 0 and _pair_sum_ok(case_of, j - 1, sizes, budget):
            j -= 1
    else:
        while not _pair_sum_ok(case_of, j, sizes, budget):
            j += 1  # terminates: keeping every voxel gives a zero FNR sum
    return float(values[order[j]]), float(keys[order[j]])


def calibrate_crc_ties(
    summaries: LesionSummaries, epsilon: float, *, seed: int, empty: str = "exclude"
) -> ThresholdCalibration:
    """Expected-FNR control with randomised tie-breaking (module docstring)."""
    check_tie_support(summaries)
    n = int(np.count_nonzero(used_cases(summaries, empty)))
    if n == 0:
        raise ConformalSegError(
            "no calibration case with a lesion: expected-FNR control needs lesion cases",
            fix="check the lesion label value(s) (--lesion-label) or use --empty include",
        )
    cutoff, key = crc_pair(summaries, epsilon, seed, n=n)
    _warn(cutoff, key, "Expected-FNR control")
    if cutoff == float("-inf"):
        warnings.warn(
            too_small_message("Expected-FNR control", n, min_crc_calibration_size(epsilon), f"epsilon={epsilon}")
            if epsilon > 0
            else "Expected-FNR control needs epsilon > 0: at epsilon = 0 the result is the whole image.",
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    with_lesion = int(np.count_nonzero(summaries.lesion_sizes > 0)) if empty == "include" else None
    return ThresholdCalibration(
        "crc", float(epsilon), None, n, summaries.n - n, cutoff, None, None, with_lesion, int(seed), key
    )


def test_keys(rounded: np.ndarray, tied: np.ndarray, seed: int) -> np.ndarray:
    """Keys of a test scan's tied voxels (C order), seeded by ``seed`` and a hash of the rounded map."""
    digest = hashlib.blake2b(np.ascontiguousarray(rounded).tobytes(), digest_size=8).digest()
    sequence = np.random.SeedSequence([int(seed), _TEST, int.from_bytes(digest, "little")])
    keys: np.ndarray = np.random.default_rng(sequence).random(int(np.count_nonzero(tied)))
    return keys


def apply_tie_broken(
    probability: np.ndarray, calibration: ThresholdCalibration, out: np.ndarray | None = None
) -> np.ndarray:
    """The mask ``(prob, u) >= (c, u_hat)`` of a tie-broken calibration (module docstring)."""
    assert calibration.tie_seed is not None and calibration.tie_threshold is not None
    probability = np.asarray(probability)
    if out is None:
        out = np.empty(probability.shape, dtype=bool)
    c = calibration.probability_threshold
    if math.isinf(c):
        out.fill(c < 0)
        return out
    rounded = probability if probability.dtype == np.float32 else round_down_float32(probability.astype(np.float64))
    np.greater(rounded, np.float32(c), out=out)
    tied = rounded == np.float32(c)
    out[tied] = test_keys(rounded, tied, calibration.tie_seed) >= calibration.tie_threshold
    return out


def apply_calibration(
    probability: np.ndarray, calibration: ThresholdCalibration, out: np.ndarray | None = None
) -> np.ndarray:
    """The mask of a cls / crc / lesion calibration, tie-broken when it was calibrated so (one entry point
    for ``apply``, :meth:`CalibrationProfile.masks` and the Slicer slider)."""
    from .cls import apply_threshold

    if calibration.tie_seed is not None:
        return apply_tie_broken(probability, calibration, out)
    return apply_threshold(probability, calibration.probability_threshold, out)


def ties_json(calibration: ThresholdCalibration) -> dict[str, Any]:
    """The profile keys of a tie-broken calibration (none without tie-breaking, so old profiles are unchanged)."""
    if calibration.tie_seed is None:
        return {}
    u = calibration.tie_threshold
    return {"tie_breaking": "random", "tie_seed": calibration.tie_seed, "tie_threshold": "inf" if u == math.inf else u}


def ties_from_json(doc: dict[str, Any], path: Path) -> tuple[int | None, float | None]:
    """``(tie_seed, tie_threshold)`` read back from a profile (``(None, None)`` without tie-breaking)."""
    if doc.get("tie_breaking", "none") == "none":
        return None, None
    seed, u = doc.get("tie_seed"), doc.get("tie_threshold")
    u = math.inf if u == "inf" else u
    if (
        doc.get("tie_breaking") != "random"
        or isinstance(seed, bool)
        or not isinstance(seed, int)
        or isinstance(u, bool)
        or not isinstance(u, (int, float))
        or not 0 <= u <= 1
        and u != math.inf
    ):
        raise ConformalSegError(
            "the profile's tie_breaking / tie_seed / tie_threshold are invalid",
            path=path,
            fix="re-create it with `conformalseg calibrate`",
        )
    return int(seed), float(u)


def recalibrate_ties(
    summaries: LesionSummaries,
    c: ThresholdCalibration,
    epsilon: float | None,
    alpha: float | None,
    empty: str,
    pac_delta: float | None,
) -> ThresholdCalibration:
    """A tie-broken cls / crc calibration at new parameters (``None``: as calibrated), same seed."""
    assert c.tie_seed is not None
    eps = c.epsilon if epsilon is None else epsilon
    level = c.alpha if alpha is None else alpha
    if level is None:
        return calibrate_crc_ties(summaries, eps, seed=c.tie_seed, empty=empty)
    return calibrate_cls_ties(summaries, eps, level, seed=c.tie_seed, empty=empty, pac_delta=pac_delta)


def refuse_ties(calibration: object, what: str) -> None:
    """A clear error where tie-breaking is not implemented (e.g. slider-safe bands)."""
    if getattr(calibration, "tie_seed", None) is not None:
        raise ConformalSegError(
            f"{what} are not implemented for profiles with --tie-breaking random",
            fix="use the fixed-(epsilon, alpha) mode, or calibrate without --tie-breaking",
        )
