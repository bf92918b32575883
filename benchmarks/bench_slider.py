"""Slider latency of the Slicer panel: recalibrate a profile from its summaries and recompute the mask
of a 256 x 256 x 256 float32 probability map (``--quick``: 128^3). Goal: under 100 ms per step.

Every step moves the sliders to a new setting (cycling through a grid, so the threshold changes
each time: nothing is cached between steps) and times, with the library only:

* ``recalibrate`` alone (:meth:`CalibrationProfile.recalibrate`, summaries only);
* ``recalibrate + masks``: :meth:`CalibrationProfile.masks` (allocates new masks), for CLS,
  expected-FNR control (CRC) and identity-transform confidence sets (inner and outer);
* ``recalibrate + apply_threshold(out=)`` + voxel count: what the panel does per step for a lesion
  mask (:func:`ConformalSegLib.conformal.cls.apply_threshold` into a mask allocated once, then
  ``np.count_nonzero`` for the results table).

Not per step (reported once): CRC's first call after loading a profile (it sorts all stored lesion
values once and caches them) and a distance-transform score map (the panel computes it once per
probability map and caches it; :meth:`CalibrationProfile.masks` would recompute it).

The profiles are built from synthetic summaries like ``bench_recalibration.py``: ``n`` cases
(``--quick``: fewer) with log-uniform lesion sizes and Beta-distributed lesion probabilities;
confidence-set statistics are uniform random. The volume is ``_common.make_volume``. Segment import
into Slicer (``updateSegmentBinaryLabelmapFromArray``) is not included: it needs Slicer.

Run: ``.venv/bin/python benchmarks/bench_slider.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import _common as C
import numpy as np

from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import apply_threshold, calibrate_cls
from ConformalSegLib.conformal.confidence_sets import SetStatistics, calibrate_sets
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.profile import CalibrationProfile
from ConformalSegLib.conformal.score_transforms import parse_transform
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder

GOAL_S = 0.100
EPSILONS = (0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
ALPHAS = (0.05, 0.1, 0.15, 0.2)


def summaries(n: int, lo: int, hi: int, seed: int):
    rng = np.random.default_rng(seed)
    builder = SummaryBuilder("float32")
    for i, m in enumerate(np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)):
        a, b = rng.uniform(0.6, 6.0), rng.uniform(0.3, 1.5)
        values = rng.beta(a, b, int(m)).astype(np.float32)
        values.sort()
        builder.add_sorted(f"case{i:04d}", values[::-1])
    return builder.build()


def profiles(n: int, lo: int, hi: int, seed: int) -> dict[str, CalibrationProfile]:
    s = summaries(n, lo, hi, seed)
    rng = np.random.default_rng(seed + 1)
    stats = SetStatistics(
        rng.uniform(0.3, 0.99, n), -rng.uniform(0.0, 0.4, n), s.case_ids, "identity", "identity", s.lesion_sizes
    )
    fresh = LesionSummaries(s.values, s.offsets, s.case_ids, s.precision)  # no CRC cache yet (as after loading)
    return {
        "cls": CalibrationProfile(calibrate_cls(s, 0.1, 0.1), s),
        "crc": CalibrationProfile(calibrate_crc(s, 0.1), fresh),
        "sets": CalibrationProfile(calibrate_sets(stats, alpha_inner=0.1, alpha_outer=0.1), s, stats, "include"),
    }


def settings(steps: int):
    grid = [(e, a) for a in ALPHAS for e in EPSILONS]
    return [grid[i % len(grid)] for i in range(steps)]


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for i, (e, a) in enumerate(settings(steps)):
        t0 = time.perf_counter()
        step(e, a, i)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    side = 128 if args.quick else 256
    n, lo, hi = (60, 50, 20_000) if args.quick else (300, 50, 100_000)
    steps = 8 if args.quick else 32

    C.log(f"[slider] {side}^3 volume, {n} calibration cases ...")
    prob, lesion = C.make_volume((side, side, side), seed=args.seed)
    del lesion
    geometry = Geometry(prob.shape, spacing=(0.8, 0.8, 1.5))
    p = profiles(n, lo, hi, args.seed)
    buf = np.empty(prob.shape, dtype=bool)
    buf.fill(False)  # touch the pages once

    t0 = time.perf_counter()
    p["crc"].recalibrate(epsilon=0.11)  # builds the sorted cache of the stored lesion values
    crc_first = time.perf_counter() - t0

    def panel_step(e, a, i):
        threshold = p["cls"].recalibrate(epsilon=e, alpha=a).calibration.probability_threshold
        apply_threshold(prob, threshold, out=buf)
        np.count_nonzero(buf)

    cases = [
        ("CLS", "`recalibrate` only", lambda e, a, i: p["cls"].recalibrate(epsilon=e, alpha=a)),
        ("CLS", "`recalibrate` + `apply_threshold(out=)` + voxel count (panel path)", panel_step),
        (
            "CLS",
            "`recalibrate` + `masks` (new arrays)",
            lambda e, a, i: p["cls"].recalibrate(epsilon=e, alpha=a).masks(prob, geometry),
        ),
        (
            "CRC",
            "`recalibrate` + `masks` (after the first call)",
            lambda e, a, i: p["crc"].recalibrate(epsilon=e).masks(prob, geometry),
        ),
        (
            "sets (identity)",
            "`recalibrate` + `masks` (inner and outer)",
            lambda e, a, i: p["sets"].recalibrate(alpha_inner=a, alpha_outer=min(0.5, e + a)).masks(prob, geometry),
        ),
    ]
    rows, results = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no setting here may be "too small"
        for method, what, step in cases:
            C.log(f"[slider] {method}: {what} ...")
            step(*settings(1)[0], 0)  # warm-up
            times = timed_steps(step, steps)
            median, worst = statistics.median(times), max(times)
            rows.append([method, what, C.fmt_s(median), C.fmt_s(worst), "PASS" if median < GOAL_S else "FAIL"])
            results[f"{method}|{what}"] = median
    t0 = time.perf_counter()
    parse_transform("distance:0.5")(prob, geometry)
    distance_once = time.perf_counter() - t0

    out = [
        "### Slider latency (recalibrate + mask)\n",
        f"{side}^3 float32 probability volume ({prob.nbytes / 1e6:.0f} MB, `_common.make_volume`); profiles with "
        f"{n} calibration cases (lesion sizes log-uniform in {lo:,}..{hi:,} voxels); {steps} slider steps, each "
        f"to a new (epsilon, alpha). Goal: median under {GOAL_S * 1e3:.0f} ms per step.\n",
        C.md_table(["method", "per step", "median", "max", "goal"], rows),
        "",
        f"Once per profile / probability map (not per step): CRC's first `recalibrate` "
        f"{C.fmt_s(crc_first)} (sorts the stored lesion values once); distance-transform score map "
        f"{C.fmt_s(distance_once)} (cached by the panel, so distance-transform sets cost the same per step as "
        f"identity ones).",
        "",
    ]
    print("\n".join(out))
    sys.stdout.flush()
    C.log(f"[slider] peak RSS {C.peak_rss_mb():.0f} MiB")
    results.update(crc_first_s=crc_first, distance_once_s=distance_once)
    return results


if __name__ == "__main__":
    main()
