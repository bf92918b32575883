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

The thresholds must be identical (checked). The two-pass bracketed order statistic of issue 15 (for
summaries larger than the driver's memory) is not implemented; this measures the one-pass path, whose
memory is the concatenated summaries (4 bytes per lesion voxel) plus one sort key per scan.

Run: ``.venv/bin/python benchmarks/bench_archive_merge.py [--quick] [--seed S]``.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable

import _common as C
import numpy as np

from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate_summaries
from ConformalSegLib.conformal.case_summaries import CaseSummary, merge_case_summaries
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.summaries import SummaryBuilder


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
