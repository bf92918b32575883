"""The nested interval family and its 0-1 coverage loss (Teneggi, Stayman & Sulam, eqs. 1, 2, 5, 7, 11).

Family and coverage convention
------------------------------
For per-voxel quantile estimates ``q_lo <= q_hi`` and a non-negative ``lambda_v`` per voxel the
interval is the closed set ``[q_lo - lambda_v, q_hi + lambda_v]``. A truth value ``y`` is *covered*
iff it lies in the closed interval, i.e. iff ::

    need <= lambda_v,   need := max(q_lo - y, y - q_hi)        (covered iff lambda >= need)

``need`` is computed once per voxel (float64, from the inputs as given); every method and every
evaluation compares ``lambda`` against this stored ``need``, so calibration and evaluation agree
bit for bit. ``need <= 0`` means the raw quantile interval already covers the voxel.

Loss (eq. 2): for one scan, the fraction of *counted* voxels (inside the body mask, see
:mod:`.memberships`) that are not covered, ``l(lambda) = #{v : need_v > lambda_v} / d``. It lies in
[0, 1] (``B = 1``) and is non-increasing in every ``lambda``. The per-organ loss (eq. 11) is the same
fraction over the voxels of one organ; it is undefined (the scan does not count for that organ) when
the organ is absent from the scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import IntervalInputError

#: Membership value of voxels that do not count in any loss (background outside the body).
EXCLUDED = -1


@dataclass(frozen=True)
class IntervalScan:
    """One scan reduced to the voxels that count in the loss.

    ``index`` are the flat (C-order) positions of the counted voxels in a volume of ``shape``;
    ``need``/``width``/``group`` are per counted voxel: the smallest covering lambda (module
    docstring), the raw interval length ``q_hi - q_lo`` (>= 0) and the organ index (0..K-1).
    """

    shape: tuple[int, ...]
    index: np.ndarray
    need: np.ndarray
    width: np.ndarray
    group: np.ndarray
    case_id: str = ""

    @property
    def d(self) -> int:
        """Number of counted voxels (the loss denominator of eq. 2)."""
        return int(self.need.size)

    def group_sizes(self, n_groups: int) -> np.ndarray:
        """``|S_k(y)|`` for k = 0..n_groups-1 (int64)."""
        return np.bincount(self.group, minlength=n_groups).astype(np.int64)


@dataclass(frozen=True)
class IntervalData:
    """Scans with their organ-group names (``groups[k]`` names group ``k``; ``"body"`` is usually last)."""

    scans: list[IntervalScan]
    groups: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.scans)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def group_counts(self) -> np.ndarray:
        """``(n, K)`` int64 matrix of ``|S_k(y_i)|``."""
        if not self.scans:
            return np.zeros((0, self.n_groups), dtype=np.int64)
        return np.stack([s.group_sizes(self.n_groups) for s in self.scans])

    def subset(self, indices: Sequence[int] | np.ndarray) -> IntervalData:
        return IntervalData([self.scans[int(i)] for i in indices], self.groups)


def _as_float_volume(array: np.ndarray, name: str, case: str) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise IntervalInputError(
            f"{name} of case {case!r} has voxel type {a.dtype}, expected numbers", fix=f"pass {name} as a float array"
        )
    a = a.astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        raise IntervalInputError(
            f"{name} of case {case!r} has {int(bad.sum())} NaN/Inf voxel(s) "
            f"(first at flat index {int(np.flatnonzero(bad)[0])})",
            fix=f"fill or crop the non-finite voxels of {name} before calibration",
        )
    return a


def need_values(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``max(q_lo - y, y - q_hi)`` elementwise (float64): the smallest lambda that covers ``y``."""
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    return np.maximum(lo - y, y - hi)


def make_interval_scan(
    lower: np.ndarray, upper: np.ndarray, truth: np.ndarray, membership: np.ndarray, *, case_id: str = ""
) -> IntervalScan:
    """Validate one scan and keep its counted voxels (``membership != EXCLUDED``).

    ``membership`` is an integer array of the same shape with organ indices ``0..K-1`` or
    :data:`EXCLUDED` (see :func:`.memberships.organ_memberships`). Raises
    :class:`IntervalInputError` for mismatched shapes, NaN/Inf values, ``lower > upper`` (crossing
    quantiles) or a scan with no counted voxel.
    """
    case = case_id or "<unnamed>"
    lo = _as_float_volume(lower, "lower", case)
    hi = _as_float_volume(upper, "upper", case)
    y = _as_float_volume(truth, "truth", case)
    m = np.asarray(membership)
    for name, a in (("upper", hi), ("truth", y), ("organs", m)):
        if a.shape != lo.shape:
            raise IntervalInputError(
                f"{name} of case {case!r} has shape {a.shape}, lower has {lo.shape}",
                fix="give lower, upper, truth and organ maps on the same voxel grid",
            )
    if not np.issubdtype(m.dtype, np.integer):
        raise IntervalInputError(
            f"organ memberships of case {case!r} must be integers, got {m.dtype}",
            fix="build them with organ_memberships() from an integer label map",
        )
    crossing = lo > hi
    if crossing.any():
        raise IntervalInputError(
            f"lower > upper in {int(crossing.sum())} voxel(s) of case {case!r} (crossing quantiles)",
            fix="pass np.minimum(lower, upper) and np.maximum(lower, upper), or fix the model",
        )
    counted = m.reshape(-1) != EXCLUDED
    if not counted.any():
        raise IntervalInputError(
            f"case {case!r} has no voxel inside the body mask", fix="check the body mask / organ label map of this case"
        )
    if (m.reshape(-1)[counted] < 0).any():
        raise IntervalInputError(
            f"organ memberships of case {case!r} contain negative values other than {EXCLUDED}",
            fix="use organ_memberships() to build the memberships",
        )
    index = np.flatnonzero(counted).astype(np.int64)
    flat_lo, flat_hi, flat_y = lo.reshape(-1)[index], hi.reshape(-1)[index], y.reshape(-1)[index]
    return IntervalScan(
        shape=tuple(lo.shape),
        index=index,
        need=need_values(flat_lo, flat_hi, flat_y),
        width=flat_hi - flat_lo,
        group=m.reshape(-1)[index].astype(np.int32),
        case_id=case_id,
    )


def check_groups(data: IntervalData) -> None:
    """Raise :class:`IntervalInputError` if a scan uses a group index outside ``0..K-1``."""
    for scan in data.scans:
        if scan.group.size and int(scan.group.max()) >= data.n_groups:
            raise IntervalInputError(
                f"case {scan.case_id!r} has organ index {int(scan.group.max())} but only "
                f"{data.n_groups} organ group(s) are named",
                fix="name every organ group",
            )


def scan_loss(need: np.ndarray, lam: np.ndarray | float) -> float:
    """Eq. 2 for one scan: fraction of voxels with ``need > lambda`` (covered iff ``lambda >= need``)."""
    if need.size == 0:
        raise IntervalInputError(
            "loss of a scan without counted voxels is undefined", fix="exclude scans without voxels in the group"
        )
    return float(np.count_nonzero(need > lam)) / need.size


def mean_length(width: np.ndarray, lam: np.ndarray | float) -> float:
    """Mean interval length ``mean(q_hi - q_lo + 2 lambda)`` (``inf`` where lambda is infinite)."""
    return float(np.mean(width + 2.0 * np.asarray(lam, dtype=np.float64))) if width.size else float("nan")
