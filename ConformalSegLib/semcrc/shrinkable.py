"""Shrinkable intervals for CRC (``calibrate --method crc-interval --shrinkable``; per-organ sem-CRC takes the
same family through ``calibrate_semcrc_organ(shrinkable=True)``, with ``omega_k >= -anchor_k - H_k``, ``H_k`` the
organ's largest half-width, and thresholds from :func:`~.exact_omega.omega_thresholds` with ``floor=-width/2``;
both stream one scan at a time and recalibrate from their record: :mod:`.recalibrate` stores the ``need`` of the
voxels with ``need > -width/2`` and, per organ, ``H_k``).

Family
------
The interval of voxel ``v`` at ``lambda`` is ``[q_lo - l_v, q_hi + l_v]`` with ``l_v = max(lambda, h_v)``,
``h_v = -(q_hi - q_lo) / 2`` (float64, ``-0.5 * width``): a negative ``lambda`` *tightens* the raw interval,
down to its midpoint, never past it (the interval cannot invert). So an under-confident quantile model
(raw coverage far above ``1 - epsilon``) is tightened, where the non-negative family can only widen.

Loss and exactness
------------------
``y`` is covered iff ``l_v >= need_v`` (``need_v = max(q_lo - y, y - q_hi) >= h_v`` up to rounding). A voxel
with ``need_v <= h_v`` (the truth at the midpoint) is covered for every ``lambda``; any other voxel is covered
iff ``lambda >= need_v``. The per-voxel threshold is therefore ``need_v`` itself (anchor 0, no rounding:
``lambda = omega``) or ``-inf``, and the exact CRC choice of :mod:`.exact_omega` applies unchanged with
``omega_min = -H``, ``H`` the largest half-width of the calibration voxels.

Guarantee
---------
``E[l01(test)] <= epsilon``, as for CRC: the loss is non-increasing in ``lambda``, bounded by 1, and the family
does not depend on the data. The unrestricted CRC choice over ``lambda in (-inf, lambda_max]`` is valid
(Angelopoulos et al., Thm 1); the returned ``max(lambda_hat, -H)`` is at least it, and the loss is
non-increasing in ``lambda``, so it is valid too (below ``-H`` every calibration interval is a point anyway).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .exact_omega import OmegaCurve, exact_omega
from .intervals import IntervalData, IntervalScan
from .procedures import (
    CONTROLLED,
    UNCONTROLLABLE,
    IntervalCalibration,
    _check_common,
    _require_calibration_size,
    _warn_uncontrollable,
)


def shrink_thresholds(need: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Per voxel the smallest covering ``lambda`` of the shrinkable family (``-inf``: always covered)."""
    need = np.asarray(need, dtype=np.float64)
    return np.where(need <= -0.5 * np.asarray(width, dtype=np.float64), -np.inf, need)


def largest_half_width(scans: list[IntervalScan]) -> float:
    return max((float(0.5 * s.width.max(initial=0.0)) for s in scans), default=0.0)


def shrink_omega(
    thresholds: list[np.ndarray], sizes: list[int], epsilon: float, half_width: float, lambda_max: float | None
) -> float:
    """Exact CRC ``lambda_hat`` of the shrinkable family from the per-scan thresholds (module docstring)."""
    curve = OmegaCurve.from_scans(thresholds, sizes)
    return exact_omega(curve, epsilon, omega_min=-half_width, omega_max=math.inf if lambda_max is None else lambda_max)


def calibrate_crc_interval_shrinkable(
    data: IntervalData, epsilon: float, *, lambda_max: float | None = None
) -> IntervalCalibration:
    """CRC with one scalar ``lambda`` that may be negative (down to minus the half-width, per voxel)."""
    epsilon = _check_common(data, epsilon, lambda_max)
    _require_calibration_size(data.n, "the calibration set")
    start = time.perf_counter()
    half_width = largest_half_width(data.scans)
    lam = shrink_omega(
        [shrink_thresholds(s.need, s.width) for s in data.scans],
        [s.d for s in data.scans],
        epsilon,
        half_width,
        lambda_max,
    )
    status = CONTROLLED if math.isfinite(lam) else UNCONTROLLABLE
    if status == UNCONTROLLABLE:
        _warn_uncontrollable("crc (whole scan, shrinkable)", data.n, epsilon, lambda_max)
    return IntervalCalibration(
        method="crc",
        epsilon=epsilon,
        groups=("all",),
        lam=np.array([lam]),
        anchor=np.zeros(1),
        omega=np.array([lam]),
        status=(status,),
        n_cal=np.array([data.n], dtype=np.int64),
        n_opt=0,
        organs=data.groups,
        lambda_max=lambda_max,
        seconds={"omega": time.perf_counter() - start},
        cal_cases=tuple(s.case_id for s in data.scans),
        shrink_floor=-half_width,
    )


def voxel_lambdas(calibration: IntervalCalibration, scan: IntervalScan) -> np.ndarray:
    """``l_v`` per counted voxel: ``lambda`` of the voxel's group, clamped at ``-width/2`` when shrinkable."""
    return calibration.voxel_lambda(scan)
