"""RCPS (Hoeffding-Bentkus, Waudby-Smith-Ramdas) and Learn-Then-Test from summaries, against CRC and a grid.

``n = 200`` scans (``--quick``: 50), each with 20-2000 lesion voxels (a per-scan Beta distribution), stored as
:class:`LesionSummaries` (no volumes). At epsilon 0.1, delta 0.1:

* ``crc_cutoff`` (the baseline: expected FNR, no confidence), ``rcps_cutoff`` with both bounds, and
  ``ltt_test`` with the voxel FNR only (it equals RCPS-HB: checked);
* the same RCPS-HB threshold searched on a 1001-point grid of thresholds (what a grid implementation
  would do): it is never above the exact one, and the table shows how far below it lands.

Run: ``.venv/bin/python benchmarks/bench_risk_control.py [--quick]``.
"""

from __future__ import annotations

import sys

import _common as C
import numpy as np

from ConformalSegLib.conformal.crc import crc_cutoff
from ConformalSegLib.conformal.ltt import RiskData, ltt_test, parse_risks
from ConformalSegLib.conformal.rcps import hb_p_value, rcps_cutoff
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder


def make_summaries(n: int, seed: int) -> LesionSummaries:
    rng = np.random.default_rng(seed)
    builder = SummaryBuilder()
    for i in range(n):
        a, b = rng.uniform(1.0, 6.0), rng.uniform(0.5, 2.0)
        values = np.sort(rng.beta(a, b, int(rng.integers(20, 2000))).astype(np.float32))[::-1]
        builder.add_sorted(f"scan{i:05d}", values)
    return builder.build()


def grid_hb(s: LesionSummaries, eps: float, delta: float, points: int = 1001) -> float:
    """The largest grid threshold whose grid prefix all pass the HB test (a grid implementation)."""
    best = -np.inf
    for t in np.linspace(0.0, 1.0, points):
        fnr = np.mean([np.count_nonzero(s.case(i) < t) / s.case(i).size for i in range(s.n)])
        if hb_p_value(fnr, s.n, eps)[0] > delta:
            break
        best = t
    return float(best)


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n = 50 if args.quick else 200
    C.log(f"lesion summaries of {n} scans ...")
    s = make_summaries(n, args.seed)
    eps, delta = 0.1, 0.1
    risks = parse_risks([f"fnr={eps}"])
    t_crc, _, cut_crc = C.time_call(lambda: crc_cutoff(s, eps), 3)
    t_hb, _, cut_hb = C.time_call(lambda: rcps_cutoff(s, eps, delta, bound="hb"), 3)
    t_wsr, _, cut_wsr = C.time_call(lambda: rcps_cutoff(s, eps, delta, bound="wsr"), 3)
    t_ltt, _, result = C.time_call(lambda: ltt_test(RiskData(s), risks, delta), 3)
    assert result.threshold == cut_hb  # type: ignore[attr-defined]
    t_grid, _, cut_grid = C.time_call(lambda: grid_hb(s, eps, delta), 1)
    assert float(cut_grid) <= float(cut_hb)  # type: ignore[arg-type]
    print(f"### RCPS and Learn-Then-Test (bench_risk_control.py{' --quick' if args.quick else ''})\n")
    print(f"- {C.machine_line()}; n = {n} scans, {s.values.size} lesion voxels; epsilon {eps}, delta {delta}.\n")
    rows = [
        ["CRC (baseline, no confidence)", f"{cut_crc:.5f}", C.fmt_s(t_crc), "1.00x"],
        ["RCPS, Hoeffding-Bentkus", f"{cut_hb:.5f}", C.fmt_s(t_hb), C.fmt_ratio(t_hb / t_crc)],
        ["RCPS, Waudby-Smith-Ramdas", f"{cut_wsr:.5f}", C.fmt_s(t_wsr), C.fmt_ratio(t_wsr / t_crc)],
        ["LTT, voxel FNR only (= RCPS-HB)", f"{result.threshold:.5f}", C.fmt_s(t_ltt), C.fmt_ratio(t_ltt / t_crc)],  # type: ignore[attr-defined]
        ["RCPS-HB on a 1001-point grid", f"{cut_grid:.5f}", C.fmt_s(t_grid), C.fmt_ratio(t_grid / t_crc)],
    ]
    print(C.md_table(["method", "threshold", "median time", "vs CRC"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
