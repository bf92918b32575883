"""Interval calibration one scan at a time (what ``conformalseg calibrate --method crc-interval|k-crc|sem-crc|...``
runs): memory stays near one scan's volumes plus the compact per-scan summaries, whatever the number of scans.

How
---
The in-memory procedures (:mod:`.procedures`) hold every scan's voxels. They need, per scan, much less:

* ``S_opt`` (K-CRC, sem-CRC): the anchor sample (:class:`~.anchor.SampleBuilder`, a few hundred voxels per
  scan, drawn from the seeded generator in the same order), after one summary pass over ``S_opt`` when the
  sample's strata need it first: the K-CRC partition (per voxel position, the number of ``S_opt`` scans whose
  raw interval misses; :func:`~.memberships.partition_from_misses`) or the automatic ``d_opt`` (group
  counts; :func:`~.procedures.auto_d_opt_from_counts`). ``S_opt`` scans are therefore read twice.
* ``S_cal``: the scan's record part (:func:`~.recalibrate.record_scan`): counted voxels per lambda group and
  the coverage thresholds of the voxels not already covered at ``lambda = 0``.

The lambdas are then computed by :func:`~.recalibrate.recalibrate_interval` from that record, the path
``apply --epsilon`` takes: the split (:func:`~.procedures.split_order`), the sample and the thresholds are
the ones the in-memory procedure draws and computes, so the lambdas and the stored record are bit-identical
to :func:`~.procedures.calibrate_interval_method` followed by :func:`~.recalibrate.interval_record` (tested on
seeded data sets for every method, shrinkable CRC and shrinkable per-organ sem-CRC included: their record keeps
the voxels not covered at every lambda of the shrinkable family, and the largest half-widths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .anchor import DEFAULT_GAMMAS, SampleBuilder, auto_d_opt_from_counts
from .errors import IntervalCalibrationError, IntervalInputError
from .intervals import IntervalData, IntervalScan
from .memberships import partition_from_misses
from .procedures import (
    METHODS,
    IntervalCalibration,
    _check_common,
    _generator,
    _require_calibration_size,
    split_order,
)
from .recalibrate import IntervalRecord, build_record, group_half_widths, recalibrate_interval, record_scan

#: ``load(i)`` returns scan ``i`` (case order); ``progress(done, total, text)`` after each scan read.
ScanLoader = Callable[[int], IntervalScan]
StreamProgress = Callable[[int, int, str], None]
#: ``map_scans(task, shared, indices, case_ids)``: ``[task(shared, i) for i in indices]`` in order, on any
#: executor (``case_ids`` name the scans in progress and errors).
ScanMap = Callable[[Callable[[Any, int], Any], Any, list[int], list[str]], list[Any]]


def can_stream(method: str, options: dict[str, Any]) -> bool:
    """Whether ``method`` with ``options`` streams: shrinkable is for crc and sem-crc-organ only."""
    return not options.get("shrinkable", False) or method in ("crc", "sem-crc-organ")


def stream_calibration(
    method: str,
    case_ids: Sequence[str],
    load: ScanLoader,
    groups: tuple[str, ...],
    epsilon: float,
    *,
    progress: StreamProgress | None = None,
    anchor_progress: StreamProgress | None = None,
    map_scans: ScanMap | None = None,
    **options: Any,
) -> tuple[IntervalCalibration, IntervalRecord]:
    """Calibrate ``method`` (library spelling, :data:`~.procedures.METHODS`) on the scans ``load(0..n-1)``.

    ``groups`` are the organ groups of the memberships; ``options`` as for
    :func:`~.procedures.calibrate_interval_method` (plus ``shrinkable`` for CRC and per-organ sem-CRC). Returns the
    calibration and its record, as the in-memory path would (module docstring). ``progress`` is called after every
    scan read, ``anchor_progress`` after every gamma of the anchor problem (K-CRC, sem-CRC).

    ``map_scans(task, shared, indices, case_ids)`` runs the calibration split's scans, which are independent, on an
    executor (``[task(shared, i) for i in indices]`` in order; ``load`` must then be picklable): each worker
    reads one scan and returns its record part, merged here in scan order, so the result is bit-identical.
    The optimisation split's passes stay here: its anchor sample draws from one seeded generator in scan
    order (``n_opt`` scans, a few dozen).
    """
    if method not in METHODS:
        raise IntervalInputError(f"unknown interval method {method!r}", fix=f"use one of {', '.join(METHODS)}")
    n = len(case_ids)
    lambda_max = options.get("lambda_max")
    epsilon = _check_common(IntervalData([], groups), epsilon, lambda_max)
    shrink = bool(options.get("shrinkable", False))
    if not can_stream(method, options):
        raise IntervalCalibrationError(
            f"{method}: shrinkable intervals are implemented for crc and sem-crc-organ", fix="leave out shrinkable"
        )
    steps = _Steps(n if method == "crc" else n + int(options.get("n_opt") or 0), progress)
    rng = _generator(options.get("seed", 0))
    if method == "crc":
        _require_calibration_size(n, "the calibration set")
        opt_idx: list[int] = []
        cal_idx = list(range(n))
    else:
        perm = split_order(n, options.get("n_opt"), rng)  # type: ignore[arg-type]  # validated there
        n_opt = int(options["n_opt"])
        opt_idx, cal_idx = [int(i) for i in perm[:n_opt]], [int(i) for i in perm[n_opt:]]
    partition, shape, lam_groups = None, None, (("all",) if method == "crc" else groups)
    sample = None
    if method != "crc":
        partition, shape, lam_groups, sample = _opt_pass(method, opt_idx, load, groups, rng, steps, options)
    shared = (load, method, partition, shape, len(lam_groups), shrink)
    results = _calibration_pass(shared, cal_idx, case_ids, steps, map_scans)
    parts = [part for part, _ in results]
    halves = np.max([h for _, h in results], axis=0) if results else np.zeros(len(lam_groups))
    half = float(halves.max(initial=0.0))  # the whole calibration split's largest half-width
    gammas = tuple(options.get("gammas", DEFAULT_GAMMAS))
    organ_halves = halves if shrink and method == "sem-crc-organ" else None
    record = build_record(parts, len(lam_groups), sample, gammas, bool(options.get("from_anchor", False)), organ_halves)
    k = len(lam_groups)
    skeleton = IntervalCalibration(
        method=method,
        epsilon=epsilon,
        groups=lam_groups,
        lam=np.zeros(k),
        anchor=np.zeros(k),
        omega=np.zeros(k),
        status=("controlled",) * k,
        n_cal=np.zeros(k, dtype=np.int64),
        n_opt=len(opt_idx),
        organs=groups,
        partition=partition,
        shape=shape,
        lambda_max=lambda_max,
        opt_cases=tuple(case_ids[i] for i in opt_idx),
        cal_cases=tuple(case_ids[i] for i in cal_idx),
        shrink_floor=-half if shrink else None,
    )
    return recalibrate_interval(skeleton, record, epsilon, progress=anchor_progress), record


def _calibration_pass(
    shared: tuple[Any, ...], cal_idx: list[int], case_ids: Sequence[str], steps: _Steps, map_scans: ScanMap | None
) -> list[tuple[Any, np.ndarray]]:
    """:func:`scan_record_part` of every calibration scan, in scan order: here, or through ``map_scans``."""
    if map_scans is not None:
        return map_scans(scan_record_part, shared, cal_idx, [case_ids[i] for i in cal_idx])
    results = []
    for i in cal_idx:
        results.append(scan_record_part(shared, i))
        steps.done += 1
        if steps.progress is not None:
            steps.progress(min(steps.done, steps.total), steps.total, f"{case_ids[i]} (calibration split)")
    return results


def scan_record_part(shared: tuple[Any, ...], i: int) -> tuple[Any, np.ndarray]:
    """Read calibration scan ``i`` and return its record part (:func:`~.recalibrate.record_scan`) and per lambda
    group half its widest interval (the shrinkable floors; one group for CRC, which has one). Module level: the
    task of ``map_scans`` on any executor."""
    load, method, partition, shape, n_groups, shrink = shared
    scan = load(i)
    g = _lambda_groups(method, scan, partition, shape)
    if shrink and method == "sem-crc-organ":
        halves = group_half_widths(scan.width, g, n_groups)
    else:
        halves = np.full(n_groups, float(0.5 * scan.width.max(initial=0.0)))  # only its maximum is used
    return record_scan(scan.need, scan.width, g, n_groups, shrink=shrink), halves


class _Steps:
    """Progress over the scan reads of all passes."""

    def __init__(self, total: int, progress: StreamProgress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def read(self, load: ScanLoader, i: int, stage: str) -> IntervalScan:
        scan = load(i)
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, f"{scan.case_id} ({stage})")
        return scan


def _opt_pass(
    method: str,
    opt_idx: list[int],
    load: ScanLoader,
    groups: tuple[str, ...],
    rng: np.random.Generator,
    steps: _Steps,
    options: dict[str, Any],
) -> tuple[np.ndarray | None, tuple[int, ...] | None, tuple[str, ...], Any]:
    """The ``S_opt`` summary pass (K-CRC partition / automatic d_opt), then the anchor sample pass."""
    partition, shape = None, None
    if method == "k-crc":
        k = int(options.get("k", 4))
        if k < 1:
            raise IntervalInputError(f"K must be >= 1, got {k}", fix="pass e.g. k=4")
        shapes: set[tuple[int, ...]] = set()
        misses: np.ndarray | None = None
        for i in opt_idx:
            scan = steps.read(load, i, "optimisation split, partition")
            shapes.add(tuple(scan.shape))
            if len(shapes) > 1:
                raise IntervalInputError(
                    f"K-CRC needs all scans on one voxel grid, got shapes {sorted(shapes)}",
                    fix="crop/pad the scans to a common shape, or use sem-CRC",
                )
            if misses is None:
                misses = np.zeros(int(np.prod(scan.shape)), dtype=np.float64)
            misses[scan.index] += scan.need > 0
        assert misses is not None  # n_opt >= 1
        partition, k_eff = partition_from_misses(misses, len(opt_idx), k)
        shape = next(iter(shapes))
        lam_groups = tuple(f"q{j + 1}" for j in range(k_eff))
        d_opt, d_min = int(options.get("d_opt", 50)), int(options.get("d_min", 1))
    else:
        lam_groups = groups
        d_min = int(options.get("d_min", 2))
        d_opt_given = options.get("d_opt")
        if d_opt_given is None:
            counts, sizes = [], []
            for i in opt_idx:
                scan = steps.read(load, i, "optimisation split, group sizes")
                counts.append(scan.group_sizes(len(groups)))
                sizes.append([scan.d])
            d_opt = auto_d_opt_from_counts(np.stack(counts), np.array(sizes), d_min)
        else:
            d_opt = int(d_opt_given)
            steps.total -= len(opt_idx)
    builder = SampleBuilder(len(lam_groups), len(opt_idx), d_opt=d_opt, d_min=d_min, rng=rng)
    for i in opt_idx:
        scan = steps.read(load, i, "optimisation split, anchor sample")
        builder.add(scan.need, scan.width, _lambda_groups(method, scan, partition, shape))
    return partition, shape, lam_groups, builder.finish()


def _lambda_groups(
    method: str, scan: IntervalScan, partition: np.ndarray | None, shape: tuple[int, ...] | None
) -> np.ndarray:
    """The lambda group of every counted voxel (as :meth:`~.procedures.IntervalCalibration.voxel_groups`)."""
    if method == "crc":
        return np.zeros(scan.d, dtype=np.int64)
    if method == "k-crc":
        assert partition is not None
        if tuple(scan.shape) != tuple(shape or ()):
            raise IntervalCalibrationError(
                f"K-CRC was calibrated on grid {shape}, scan {scan.case_id!r} has {scan.shape}",
                fix="apply K-CRC only to scans on its calibration grid",
            )
        return partition[scan.index].astype(np.int64)
    return scan.group.astype(np.int64)
