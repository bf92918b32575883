"""The driver's share of a scaled-out calibration over a simulated archive of 10,000 scans (issue 15).

With ``--executor processes|dask`` every scan is read and summarized on a worker; the driver only merges
the returned :class:`~ConformalSegLib.conformal.case_summaries.CaseSummary` objects in case order and
computes the exact threshold. This benchmark measures that driver step on summaries generated directly
(no volumes): per scan a descending vector of lesion-voxel probabilities, sizes log-normal (median 1,500
voxels, clipped to 1..40,000; ``--quick``: 1,000 scans), values from a Beta(2, 1) so that they look like a
network's lesion probabilities.

* **merge + thresholds**: ``merge_case_summaries`` (concatenation in case order) then
  ``calibrate_summaries`` (CLS, eps = alpha = 0.1), wall time and the driver's peak memory
  (``tracemalloc``, which sees NumPy's buffers), against
* **baseline**: the serial streaming path over the same vectors in one process (``SummaryBuilder.add_sorted``
  for every scan, i.e. the checks and float32 rounding a worker does, then ``calibrate_cls``), side by side.

The thresholds must be identical (checked). The one-pass path's memory is the concatenated summaries
(4 bytes per lesion voxel) plus one sort key per scan for CLS, and a sort of every voxel for CRC.

Two-pass (:mod:`ConformalSegLib.conformal.bracketed_quantile`, for summaries larger than the driver): the
summaries stay in 16 partitions of consecutive scans (what 16 workers hold, built outside the timing) and
the driver asks them for counts, then for the bracket's values. Side by side for CLS (eps = alpha = 0.1)
and CRC (eps = 0.1): one pass (merge + threshold) against two passes (no merge), time and peak memory. The
partitions live in this process here, so the two-pass peak also counts one partition's transient work (its
keys), which a cluster does on a worker: an upper bound of the driver's share.

Run: ``.venv/bin/python benchmarks/bench_archive_merge.py [--quick] [--seed S]``.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable

import _common as C
import numpy as np

from ConformalSegLib.conformal.bracketed_quantile import (
    LocalPartitions,
    cls_cutoff_partitioned,
    crc_cutoff_partitioned,
)
from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate_summaries
from ConformalSegLib.conformal.case_summaries import CaseSummary, merge_case_summaries
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import crc_cutoff
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder

PARTITIONS = 16


def archive(n: int, seed: int) -> list[np.ndarray]:
    """``n`` scans' lesion probabilities, each sorted descending (float64, as a worker computes them)."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.round(rng.lognormal(np.log(1500.0), 1.2, size=n)), 1, 40_000).astype(int)
    return [np.sort(rng.beta(2.0, 1.0, size=int(m)))[::-1] for m in sizes]


def worker_summaries(vectors: list[np.ndarray]) -> list[CaseSummary]:
    """What the workers send back: one single-scan summary per case (built outside the timing)."""
    parts = []
    for i, values in enumerate(vectors):
        builder = SummaryBuilder()
        builder.add_sorted(f"case{i:05d}", values)
        parts.append(CaseSummary(builder.build()))
    return parts


def measured(fn: Callable[[], float]) -> tuple[float, float, float]:
    """(seconds, peak MiB allocated during the call, the call's result)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20, result


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n = 1_000 if args.quick else 10_000
    C.log(f"simulating {n} scans' summaries ...")
    vectors = archive(n, args.seed)
    voxels = sum(v.size for v in vectors)
    parts = worker_summaries(vectors)
    request = CalibrationRequest(method="cls", epsilon=0.1, alpha=0.1)

    def driver() -> float:
        profile = calibrate_summaries(merge_case_summaries(parts, request), request)
        return float(profile.calibration.probability_threshold)

    def serial() -> float:
        builder = SummaryBuilder()
        for i, values in enumerate(vectors):
            builder.add_sorted(f"case{i:05d}", values)
        return float(calibrate_cls(builder.build(), 0.1, 0.1).probability_threshold)

    rows = []
    results: dict[str, tuple[float, float, float]] = {}
    for name, fn in (("driver: merge + exact threshold", driver), ("baseline: serial streaming build", serial)):
        fn()  # warm-up (imports, caches)
        seconds, peak, threshold = measured(fn)
        results[name] = (seconds, peak, threshold)
    (t_d, m_d, c_d), (t_s, m_s, c_s) = results.values()
    if c_d != c_s:
        raise SystemExit(f"thresholds differ: merged {c_d!r} vs serial {c_s!r}")
    rows.append(["driver: merge + exact threshold", C.fmt_s(t_d), f"{m_d:.0f} MiB", C.fmt_ratio(t_s / t_d)])
    rows.append(["baseline: serial streaming build + threshold", C.fmt_s(t_s), f"{m_s:.0f} MiB", "1.00x"])
    print(f"### Driver merge over a simulated archive (bench_archive_merge.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}")
    print(
        f"- {n} scans, {voxels:,} lesion voxels ({voxels * 4 / 2**20:.0f} MiB of float32 summaries); "
        f"CLS eps = alpha = 0.1; thresholds identical ({c_d:.6g}); peak = tracemalloc during the step\n"
    )
    print(C.md_table(["step", "time", "peak memory", "speed vs baseline"], rows))
    print()
    two_pass_table(parts, request)
    return 0


def partitions(parts: list[CaseSummary]) -> LocalPartitions:
    """What ``PARTITIONS`` workers would hold: runs of consecutive scans, each concatenated (outside the timing)."""
    bounds = np.linspace(0, len(parts), PARTITIONS + 1).round().astype(int)
    request = CalibrationRequest(method="cls", epsilon=0.1, alpha=0.1)
    return LocalPartitions([merge_case_summaries(parts[a:b], request).lesion for a, b in zip(bounds[:-1], bounds[1:])])


def two_pass_table(parts: list[CaseSummary], request: CalibrationRequest) -> None:
    """One pass (merge + threshold on the driver) against two passes over partitions, for CLS and CRC."""
    held = partitions(parts)

    def merged() -> LesionSummaries:  # a fresh object: no sort cached from an earlier call
        return merge_case_summaries(parts, request).lesion

    steps = {
        "CLS one pass: merge + `calibrate_cls`": lambda: float(calibrate_cls(merged(), 0.1, 0.1).probability_threshold),
        "CLS two passes: `cls_cutoff_partitioned`": lambda: cls_cutoff_partitioned(held, 0.1, 0.1),
        "CRC one pass: merge + `crc_cutoff` (sorts every voxel)": lambda: crc_cutoff(merged(), 0.1),
        "CRC two passes: `crc_cutoff_partitioned`": lambda: crc_cutoff_partitioned(held, 0.1),
    }
    results = {}
    for name, fn in steps.items():
        C.log(f"{name} ...")
        results[name] = measured(fn)
    rows = []
    names = list(steps)
    for one, two in ((names[0], names[1]), (names[2], names[3])):
        (t1, m1, c1), (t2, m2, c2) = results[one], results[two]
        if c1 != c2:
            raise SystemExit(f"two-pass threshold {c2!r} != one-pass {c1!r}")
        rows.append([one, C.fmt_s(t1), f"{m1:.0f} MiB", "1.00x", "1.00x", f"{c1:.9g}"])
        rows.append(
            [two, C.fmt_s(t2), f"{m2:.1f} MiB", C.fmt_ratio(t1 / t2), f"{m1 / max(m2, 1e-9):.0f}x less", "same"]
        )
    print(f"#### Two passes over {PARTITIONS} partitions against one pass on the merged summaries\n")
    print(C.md_table(["step", "time", "peak memory", "speed vs one pass", "memory vs one pass", "threshold"], rows))
    print()


if __name__ == "__main__":
    sys.exit(main())
