"""Heuristic intervals from Monte-Carlo dropout samples (for lesion networks without quantile heads).

Given ``N`` stochastic forward passes stacked as ``(N, z, y, x)``, the per-voxel interval is
``[Q(alpha_lo), Q(alpha_hi)]`` of the ``N`` samples, with numpy's default (linear-interpolation,
Hyndman-Fan type 7) quantile: ``Q(t) = s_(floor(h)) + (h - floor(h)) (s_(floor(h)+1) - s_(floor(h)))``,
``h = (N - 1) t``, on the ascending samples ``s_(0) <= ... <= s_(N-1)``. These intervals carry no
guarantee by themselves; any of the CRC procedures in :mod:`.procedures` then conformalises them.
"""

from __future__ import annotations

import numpy as np

from .errors import IntervalInputError


def mc_dropout_intervals(
    samples: np.ndarray, *, lower_level: float = 0.1, upper_level: float = 0.9, chunk_voxels: int = 1 << 21
) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel ``(q_lo, q_hi)`` (float32) of MC-dropout ``samples`` shaped ``(N, z, y, x)``.

    Raises :class:`IntervalInputError` for fewer than 2 samples, a non-4D array, NaN/Inf samples or
    levels outside ``0 <= lower_level < upper_level <= 1``. Works in chunks of ``chunk_voxels``
    voxels to bound memory.
    """
    s = np.asarray(samples)
    if s.ndim != 4:
        raise IntervalInputError(
            f"MC-dropout samples must have shape (N, z, y, x), got {s.shape}",
            fix="stack the N stochastic predictions along a new first axis",
        )
    if s.shape[0] < 2:
        raise IntervalInputError(
            f"need at least 2 MC-dropout samples, got {s.shape[0]}", fix="run more stochastic forward passes (e.g. 20)"
        )
    if not (0.0 <= lower_level < upper_level <= 1.0):
        raise IntervalInputError(
            f"quantile levels must satisfy 0 <= lower < upper <= 1, got ({lower_level}, {upper_level})",
            fix="pass e.g. lower_level=0.1, upper_level=0.9",
        )
    flat = s.reshape(s.shape[0], -1)
    lower = np.empty(flat.shape[1], dtype=np.float32)
    upper = np.empty(flat.shape[1], dtype=np.float32)
    for start in range(0, flat.shape[1], chunk_voxels):
        block = flat[:, start : start + chunk_voxels].astype(np.float64)
        if not np.isfinite(block).all():
            raise IntervalInputError(
                "MC-dropout samples contain NaN/Inf values",
                fix="check the network output (e.g. disable mixed precision overflow)",
            )
        q = np.quantile(block, [lower_level, upper_level], axis=0)
        lower[start : start + block.shape[1]], upper[start : start + block.shape[1]] = q[0], q[1]
    return lower.reshape(s.shape[1:]), upper.reshape(s.shape[1:])
