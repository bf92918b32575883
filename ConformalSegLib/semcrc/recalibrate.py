"""Recalibrate an interval profile for a new epsilon without the volumes (``apply --epsilon``).

What is stored (:class:`IntervalRecord`, in the profile's ``.npz``)
------------------------------------------------------------------
* per calibration scan (``S_cal``): the number of counted voxels in each lambda group (``counts``, an
  ``(n_cal, K)`` matrix), and for every counted voxel that is *not* covered for every lambda its ``need`` (the
  smallest covering lambda, the voxel's coverage threshold; :mod:`.intervals`) and the index of its lambda
  group (:meth:`~.procedures.IntervalCalibration.voxel_groups`: the organ, or the K-CRC quantile group), one
  run per scan (``offsets``). Voxels with ``need <= 0`` (shrinkable CRC: ``need <= -width/2``) have the
  threshold ``-inf`` at every anchor (:func:`~.exact_omega.omega_thresholds`), never count in any loss
  curve, and are left out: only their number (in ``counts``) enters the loss denominators. Profiles written
  before ``counts`` existed store every counted voxel; their counts are the per-scan group sizes.
* for K-CRC / sem-CRC, the optimisation sample of ``S_opt`` that the anchor problem is solved on
  (:class:`~.anchor.AnchorSample`: a few hundred voxels per scan), with the gamma grid.
* shrinkable per-organ sem-CRC only: ``half_width``, per organ the largest half-width ``H_k`` of its voxels over
  ``S_cal`` (its omega may go down to ``-anchor_k - H_k``). Its kept voxels are those with ``need > -width/2``
  (covered at no lambda of the shrinkable family), stored with their ``need``: the voxel's omega threshold at
  anchor ``a`` is :func:`~.exact_omega.omega_thresholds` of ``need`` and ``a`` for these voxels and ``-inf``
  for the others, so the stored values do not move with the anchor.

Why recalibrating is the same as calibrating from scratch
---------------------------------------------------------
The ``S_opt`` / ``S_cal`` split and the voxel sample depend on the seed, never on epsilon, so a calibration
at a new epsilon with the same seed draws the same split and sample: its anchor is
``solve_anchor(sample, new epsilon)`` and its ``omega`` is the exact CRC choice (:mod:`.exact_omega`) over the
same ``need`` values and groups. :func:`recalibrate_interval` runs exactly these steps on the stored arrays,
so the lambdas are bit-identical to calibrating from scratch (tested). The guarantee is the method's own,
at the new epsilon (epsilon is chosen before the test scan is seen).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.exact import check_epsilon
from .anchor import DEFAULT_GAMMAS, AnchorSample, solve_anchor, stratified_sample
from .errors import IntervalCalibrationError, UncontrollableRiskWarning
from .exact_omega import OmegaCurve, exact_omega, lambdas_at, omega_thresholds
from .intervals import IntervalData
from .memberships import loss_quantile_partition
from .procedures import (
    CONTROLLED,
    NO_DATA,
    UNCONTROLLABLE,
    IntervalCalibration,
    _generator,
    _split,
    _warn_uncontrollable,
    auto_d_opt,
)
from .shrinkable import shrink_omega, shrink_thresholds

_SAMPLE_KEYS = ("offset", "width", "group", "weight", "cost")


@dataclass(frozen=True)
class IntervalRecord:
    """Per-scan coverage thresholds of ``S_cal`` and the anchor sample of ``S_opt`` (module docstring)."""

    need: np.ndarray  # float64, flat over the S_cal scans (voxels covered for every lambda left out)
    group: np.ndarray  # int32, the lambda group of each voxel
    offsets: np.ndarray  # int64, n_cal + 1
    sample: AnchorSample | None = None  # None for CRC (anchor 0)
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    from_anchor: bool = False  # per-organ sem-CRC: omega_k >= 0 (eq. 12 literally) or lambda_k >= 0
    counts: np.ndarray | None = None  # int64 (n_cal, K): counted voxels per scan and group; None: old profiles
    half_width: np.ndarray | None = None  # float64 (K,): shrinkable per-organ sem-CRC, H_k over S_cal; else None

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"record_need": self.need, "record_group": self.group, "record_offsets": self.offsets}
        if self.counts is not None:
            arrays["record_counts"] = self.counts
        if self.half_width is not None:
            arrays["record_half_width"] = self.half_width
        if self.sample is not None:
            arrays.update({f"sample_{k}": np.asarray(getattr(self.sample, k)) for k in _SAMPLE_KEYS})
        return arrays

    def to_json(self) -> dict[str, Any]:
        return {"gammas": list(self.gammas), "from_anchor": self.from_anchor, "anchor_sample": self.sample is not None}

    @classmethod
    def from_stored(cls, arrays: Any, doc: dict[str, Any]) -> IntervalRecord:
        sample = (
            AnchorSample(*(np.asarray(arrays[f"sample_{k}"]) for k in _SAMPLE_KEYS)) if doc["anchor_sample"] else None
        )
        offsets = np.asarray(arrays["record_offsets"], dtype=np.int64)
        need = np.asarray(arrays["record_need"], dtype=np.float64)
        if offsets.size < 1 or offsets[0] != 0 or offsets[-1] != need.size or np.any(np.diff(offsets) < 0):
            raise ValueError("inconsistent record offsets")
        counts = None
        if "record_counts" in arrays:
            counts = np.asarray(arrays["record_counts"], dtype=np.int64)
            if counts.ndim != 2 or counts.shape[0] != offsets.size - 1 or (counts < 0).any():
                raise ValueError("record counts do not fit the record offsets")
            if np.any(counts.sum(axis=1) < np.diff(offsets)):
                raise ValueError("a scan stores more thresholds than counted voxels")
        half_width = None
        if "record_half_width" in arrays:
            half_width = np.asarray(arrays["record_half_width"], dtype=np.float64)
            if half_width.ndim != 1 or not np.all(np.isfinite(half_width)) or (half_width < 0).any():
                raise ValueError("record half widths must be finite and >= 0, one per group")
        return cls(
            need,
            np.asarray(arrays["record_group"], dtype=np.int32),
            offsets,
            sample,
            tuple(float(g) for g in doc["gammas"]),
            bool(doc["from_anchor"]),
            counts,
            half_width,
        )

    def scans(self, n_groups: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(need, group, counted voxels per group)`` of every ``S_cal`` scan (``n_groups`` lambda groups)."""
        o = self.offsets
        if self.counts is not None and self.counts.shape[1] != n_groups:
            raise ValueError(f"the record has {self.counts.shape[1]} groups, the calibration {n_groups}")
        out = []
        for i in range(o.size - 1):
            need, group = self.need[o[i] : o[i + 1]], self.group[o[i] : o[i + 1]]
            if self.counts is not None:
                counts = self.counts[i]
            else:
                if group.size and int(group.max()) >= n_groups:
                    raise ValueError("a stored group index is outside the calibration's groups")
                counts = np.bincount(group, minlength=n_groups).astype(np.int64)
            out.append((need, group, counts))
        return out


def record_scan(
    need: np.ndarray, width: np.ndarray, group: np.ndarray, n_groups: int, *, shrink: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``S_cal`` scan's part of the record: ``(thresholds kept, their groups, counted voxels per group)``.

    ``need``/``width``/``group`` are per counted voxel (``group``: the lambda group). Kept are the voxels with
    a finite coverage threshold at some anchor: ``need > 0``, or for shrinkable CRC a finite
    :func:`~.shrinkable.shrink_thresholds` value (module docstring)."""
    g = np.asarray(group)
    values = shrink_thresholds(need, width) if shrink else np.asarray(need, dtype=np.float64)
    keep = np.isfinite(values) if shrink else values > 0
    return values[keep], g[keep].astype(np.int32), np.bincount(g, minlength=n_groups).astype(np.int64)


def build_record(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_groups: int,
    sample: AnchorSample | None,
    gammas: tuple[float, ...],
    from_anchor: bool,
    half_width: np.ndarray | None = None,
) -> IntervalRecord:
    """The record from the :func:`record_scan` parts of the ``S_cal`` scans (in ``cal_cases`` order);
    ``half_width``: shrinkable per-organ sem-CRC's ``H_k`` (module docstring)."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p[0].size for p in parts], out=offsets[1:])
    need = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
    group = np.concatenate([p[1] for p in parts]).astype(np.int32) if parts else np.zeros(0, np.int32)
    counts = np.stack([p[2] for p in parts]) if parts else np.zeros((0, n_groups), np.int64)
    return IntervalRecord(need, group, offsets, sample, gammas, from_anchor, counts, half_width)


def interval_record(calibration: IntervalCalibration, data: IntervalData, **options: Any) -> IntervalRecord | None:
    """The record of a calibration made by :func:`~.procedures.calibrate_interval_method` on ``data`` with
    ``options``: the ``S_cal`` thresholds, and the ``S_opt`` sample replayed from the seed (the split and
    sample do not depend on epsilon, so the replay draws exactly what the calibration drew)."""
    c = calibration
    by_id = {s.case_id: s for s in data.scans}
    cal = [by_id[i] for i in c.cal_cases]
    shrink = c.shrink_floor is not None  # store the shrinkable family's thresholds (:mod:`.shrinkable`)
    parts = [record_scan(s.need, s.width, c.voxel_groups(s), len(c.groups), shrink=shrink) for s in cal]
    gammas = tuple(options.get("gammas", DEFAULT_GAMMAS))
    from_anchor = bool(options.get("from_anchor", False))
    if c.method == "crc":
        return build_record(parts, len(c.groups), None, gammas, from_anchor)
    half_width = None
    if shrink:  # shrinkable per-organ sem-CRC
        by_scan = [group_half_widths(s.width, c.voxel_groups(s), len(c.groups)) for s in cal]
        half_width = np.max(by_scan, axis=0) if by_scan else np.zeros(len(c.groups))
    rng = _generator(options.get("seed", 0))
    opt, _ = _split(data, options["n_opt"], rng)
    d_min = int(options.get("d_min", 1 if c.method == "k-crc" else 2))
    if c.method == "k-crc":
        partition, _k = loss_quantile_partition(opt, int(options.get("k", 4)))
        groups = [partition[s.index].astype(np.int64) for s in opt.scans]
        d_opt = int(options.get("d_opt", 50))
        n_groups = len(c.groups)
    else:
        groups = [s.group.astype(np.int64) for s in opt.scans]
        d_opt = auto_d_opt(opt, d_min) if options.get("d_opt") is None else int(options["d_opt"])
        n_groups = data.n_groups
    sample = stratified_sample(
        [s.need for s in opt.scans], [s.width for s in opt.scans], groups, n_groups, d_opt=d_opt, d_min=d_min, rng=rng
    )
    return build_record(parts, len(c.groups), sample, gammas, from_anchor, half_width)


def group_half_widths(width: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per lambda group the largest half-width ``0.5 * width`` of its voxels in one scan (0 for an absent group)."""
    out = np.zeros(n_groups, dtype=np.float64)
    np.maximum.at(out, np.asarray(group, dtype=np.int64), 0.5 * np.asarray(width, dtype=np.float64))
    return out


def recalibrate_interval(
    calibration: IntervalCalibration,
    record: IntervalRecord,
    epsilon: float,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> IntervalCalibration:
    """The calibration at ``epsilon`` from the stored record only (module docstring); ``progress`` reports the
    anchor problem's gammas (:func:`~.anchor.solve_anchor`)."""
    c = calibration
    _check_epsilon_only(epsilon, c.lambda_max)
    start = time.perf_counter()
    k = len(c.groups)
    omega_max = math.inf if c.lambda_max is None else c.lambda_max
    if record.sample is None:
        anchor, gamma, anchor_seconds = np.zeros(k), None, 0.0
    else:
        result = solve_anchor(record.sample, epsilon, gammas=record.gammas, lambda_max=c.lambda_max, progress=progress)
        anchor, gamma, anchor_seconds = result.lam, result.gamma, result.solve_seconds
    try:
        scans = record.scans(k)
    except ValueError as exc:
        raise IntervalCalibrationError(f"the stored record is malformed ({exc})", fix="re-calibrate") from exc
    if c.shrink_floor is not None and c.method == "crc":
        w = shrink_omega(
            [t for t, _, _ in scans], [int(n.sum()) for _, _, n in scans], epsilon, -c.shrink_floor, c.lambda_max
        )
        state = CONTROLLED if math.isfinite(w) else UNCONTROLLABLE
        if state == UNCONTROLLABLE:
            _warn_uncontrollable("crc (whole scan, shrinkable)", len(scans), epsilon, c.lambda_max)
        omega, status, n_cal, lam = np.array([w]), [state], np.array([len(scans)], dtype=np.int64), np.array([w])
    elif c.method == "sem-crc-organ":
        omega, status, n_cal = _per_organ(c, scans, anchor, epsilon, omega_max, record)
        clip = c.shrink_floor is None
        lam = np.array([lambdas_at(anchor[g], omega[g], clip=clip) for g in range(k)], dtype=np.float64).reshape(-1)
    else:
        thresholds = [omega_thresholds(need, anchor[group]) for need, group, _ in scans]
        curve = OmegaCurve.from_scans(thresholds, [int(n.sum()) for _, _, n in scans])
        omega_min = 0.0 if c.method == "crc" else -float(anchor.max(initial=0.0))
        w = exact_omega(curve, epsilon, omega_min=omega_min, omega_max=omega_max)
        state = CONTROLLED if math.isfinite(w) else UNCONTROLLABLE
        if state == UNCONTROLLABLE:
            _warn_uncontrollable(f"{c.method} (whole scan)", len(scans), epsilon, c.lambda_max)
        omega, status, n_cal = np.full(k, w), [state] * k, np.full(k, len(scans), dtype=np.int64)
        lam = lambdas_at(anchor, w)
    seconds = {"anchor": anchor_seconds, "omega": time.perf_counter() - start}
    return dataclasses.replace(
        c,
        epsilon=float(epsilon),
        lam=lam,
        anchor=np.asarray(anchor, dtype=np.float64),
        omega=omega,
        status=tuple(status),
        n_cal=n_cal,
        gamma=gamma,
        seconds=seconds,
    )


def _per_organ(
    c: IntervalCalibration,
    scans: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    anchor: np.ndarray,
    epsilon: float,
    omega_max: float,
    record: IntervalRecord,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Per-organ omega, status and scan counts, as :func:`~.procedures.calibrate_semcrc_organ` computes them
    (shrinkable: every stored ``need`` has a finite threshold, and omega may go down to ``-anchor_k - H_k``)."""
    k_groups = len(c.groups)
    omega, status, n_cal = np.full(k_groups, math.inf), [], np.zeros(k_groups, dtype=np.int64)
    shrink = c.shrink_floor is not None
    if shrink and (record.half_width is None or record.half_width.shape != (k_groups,)):
        raise IntervalCalibrationError(
            "the stored record of this shrinkable profile has no per-organ half widths", fix="re-calibrate"
        )
    floor = -math.inf if shrink else 0.0  # shrinkable: the stored voxels are exactly those with need > -width/2
    for k in range(k_groups):
        thresholds, sizes = [], []
        for need, group, counts in scans:
            if counts[k] > 0:
                thresholds.append(omega_thresholds(need[group == k], float(anchor[k]), floor))
                sizes.append(int(counts[k]))
        if not sizes:
            status.append(NO_DATA)
            warnings.warn(
                f"organ {c.groups[k]!r} is absent from every calibration scan: its lambda is +inf "
                f"(status '{NO_DATA}'). Fix: add calibration scans that contain it",
                UncontrollableRiskWarning,
                stacklevel=3,
            )
            continue
        curve = OmegaCurve.from_scans(thresholds, sizes)
        n_cal[k] = curve.n
        lo = 0.0 if record.from_anchor else -float(anchor[k])
        if shrink and not record.from_anchor:
            lo -= float(record.half_width[k])  # type: ignore[index]  # checked above
        omega[k] = exact_omega(curve, epsilon, omega_min=lo, omega_max=omega_max)
        if math.isfinite(omega[k]):
            status.append(CONTROLLED)
        else:
            status.append(UNCONTROLLABLE)
            _warn_uncontrollable(f"organ {c.groups[k]!r}", curve.n, epsilon, c.lambda_max)
    return omega, status, n_cal


def _check_epsilon_only(epsilon: float, lambda_max: float | None) -> None:
    """The epsilon check of :func:`~.procedures._check_common` (the record has no volumes to check)."""
    try:
        check_epsilon(epsilon)
    except ConformalSegError as exc:
        raise IntervalCalibrationError(f"epsilon: {exc.message}", fix="pass e.g. epsilon=0.1") from exc
