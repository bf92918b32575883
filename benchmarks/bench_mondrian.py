"""Deployment guarantees from summaries: recalibrating a group-conditional (Mondrian) profile for a new
(eps, alpha), a weighted threshold for one new scan, and the drift monitor, next to the marginal
``calibrate_cls`` they build on.

``n = 1000`` cases (``--quick``: 100) of summaries as in ``bench_recalibration.py`` (lesion sizes
log-uniform in 50..200000 voxels, Beta probabilities, no volumes). Groupings: 4 groups from a table
(random, like scanners) and 3 lesion-size bins (true and predicted size: 6 group thresholds).

* ``calibrate_cls``: the marginal recalibration (the baseline every ratio is against);
* ``calibrate_groups``: every group's threshold at new (eps, alpha) (per-scan scores once, one partition
  per group); and a **naive** Mondrian that calls ``calibrate_cls`` on each group's summaries subset
  (copies of the groups' lesion values: what one would write first);
* ``CalibrationProfile.recalibrate``: a whole Mondrian profile (marginal + groups), as the Slicer slider and
  ``apply --epsilon/--alpha`` do; the goal is < 1 ms at n = 1000;
* expected-FNR groups: first call (each group's subset and sorted cache) and later calls;
* ``weighted_calibration``: the weighted CLS threshold of one new scan (sort with weights, exact boundary);
* the monitor: p-values and Simple Jumper for 1000 reviewed cases after 1000 calibration scores.

Times are timeit-style medians (``_common.time_per_call``) cycling through 15 (eps, alpha) pairs.
Run: ``.venv/bin/python benchmarks/bench_mondrian.py [--quick]``.
"""

from __future__ import annotations

import sys
import warnings

import _common as C
import numpy as np
from bench_recalibration import PAIRS, build, make_cases

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.mondrian import calibrate_groups, grouping_by_size, grouping_from_table
from ConformalSegLib.conformal.monitoring import monitor
from ConformalSegLib.conformal.profile import CalibrationProfile
from ConformalSegLib.conformal.weighted import DomainClassifier, Weighting, weighted_calibration

GOAL_S = 1e-3


def naive_groups(s, members: list[np.ndarray], eps: float, alpha: float) -> list[float]:
    return [calibrate_cls(s.subset(np.flatnonzero(m)), eps, alpha).probability_threshold for m in members]


def _timings(s, table_grouping, size_grouping, members, repeats: int, min_time: float) -> list[tuple[str, float]]:
    like = calibrate_cls(s, 0.1, 0.1)
    profile = CalibrationProfile(like, s, groups=calibrate_groups(size_grouping, like, CalibrationProfile(like, s)))

    def pair(i: int) -> tuple[float, float]:
        return PAIRS[i % len(PAIRS)]

    rows = [("`calibrate_cls` (marginal, the baseline)", lambda i: calibrate_cls(s, *pair(i)))]
    rows.append(
        (
            "`calibrate_cls` + `calibrate_groups`, 4 groups from a table",
            lambda i: calibrate_groups(table_grouping, calibrate_cls(s, *pair(i)), profile, warn=False),
        )
    )
    rows.append(
        (
            "`calibrate_cls` + `calibrate_groups`, 3 lesion-size bins (true + predicted: 6 thresholds)",
            lambda i: calibrate_groups(size_grouping, calibrate_cls(s, *pair(i)), profile, warn=False),
        )
    )
    rows.append(
        (
            "naive Mondrian: `calibrate_cls` on each group's subset (4 groups)",
            lambda i: naive_groups(s, members, *pair(i)),
        )
    )
    rows.append(
        (
            "`CalibrationProfile.recalibrate` of a lesion-size Mondrian profile",
            lambda i: profile.recalibrate(epsilon=pair(i)[0], alpha=pair(i)[1]),
        )
    )
    out = []
    for label, fn in rows:
        C.log(f"[mondrian] {label}")
        out.append((label, C.time_per_call(fn, repeats=repeats, min_time=min_time)))
    return out


def _crc_and_weighted(s, table_grouping, rng, repeats: int, min_time: float) -> list[tuple[str, float]]:
    like = calibrate_crc(s, 0.1)
    profile = CalibrationProfile(like, s)
    t0, _, _ = C.time_call(lambda: calibrate_groups(table_grouping, like, profile, warn=False), 1, warmup=0)
    eps = (0.05, 0.08, 0.1, 0.15, 0.2)
    t_next = C.time_per_call(
        lambda i: calibrate_groups(table_grouping, calibrate_crc(s, eps[i % 5]), profile, warn=False),
        repeats=max(3, repeats // 2),
        min_time=min_time,
    )
    x = rng.normal(size=(s.n, 1))
    oracle = DomainClassifier(("x",), np.zeros(1), np.ones(1), np.ones(1), -0.5, 1, 1)
    weighting = Weighting(oracle, x, x + 1.0)
    cls_like = calibrate_cls(s, 0.1, 0.1)
    cls_profile = CalibrationProfile(cls_like, s)
    weights = np.exp(rng.normal(0.5, 1.0, 64))
    t_weighted = C.time_per_call(
        lambda i: weighted_calibration(cls_like, cls_profile, weighting, float(weights[i % 64]), warn=False),
        repeats=repeats,
        min_time=min_time,
    )
    calibration, reviewed = rng.normal(size=1000), rng.normal(size=1000)
    ids = [str(i) for i in range(1000)]
    t_monitor, _, _ = C.time_call(lambda: monitor(calibration, reviewed, None, case_ids=ids), 3, warmup=1)
    return [
        ("expected-FNR groups (4), first call (subsets + sorted caches)", t0),
        ("expected-FNR groups (4), later calls (new eps, incl. marginal `calibrate_crc`)", t_next),
        ("`weighted_calibration`: weighted CLS threshold of one new scan", t_weighted),
        ("monitor: 1000 reviewed cases after 1000 calibration scores (p-values + jumper)", t_monitor),
    ]


def main(argv: list[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n, lo, hi = (100, 50, 20_000) if args.quick else (1000, 50, 200_000)
    repeats, min_time = (3, 0.05) if args.quick else (7, 0.3)
    rng = np.random.default_rng(args.seed)
    C.log(f"[mondrian] generating {n} cases ...")
    s = build(make_cases(n, lo, hi, args.seed), "float32")
    labels = rng.integers(0, 4, n)
    table_grouping = grouping_from_table(s.case_ids, {c: f"scanner{g}" for c, g in zip(s.case_ids, labels)})
    ml = s.lesion_sizes * 1e-3  # 1 mm^3 voxels
    size_grouping = grouping_by_size((0.5, 5.0), ml, ml * rng.lognormal(0.0, 0.3, n))
    members = [labels == g for g in range(4)]
    rows = _timings(s, table_grouping, size_grouping, members, repeats, min_time)
    rows += _crc_and_weighted(s, table_grouping, rng, repeats, min_time)
    base = rows[0][1]
    table = [[label, C.fmt_s(t), C.fmt_ratio(t / base)] for label, t in rows]
    recal = dict(rows)["`CalibrationProfile.recalibrate` of a lesion-size Mondrian profile"]
    verdict = "PASS" if recal < GOAL_S else "FAIL"
    print("### Deployment guarantees: Mondrian recalibration, weighted threshold, monitor\n")
    print(
        f"{n:,} cases ({s.values.size:,} lesion values, float32 summaries); groups: 4 from a table "
        f"(sizes {', '.join(str(int(m.sum())) for m in members)}), 3 lesion-size bins.\n"
    )
    print(C.md_table(["call", "time per call", "ratio to marginal `calibrate_cls`"], table))
    print(
        f"\nGoal: a Mondrian profile recalibrates in < 1 ms at n = 1000: {C.fmt_s(recal)}, **{verdict}**"
        + (" (--quick)" if args.quick else "")
        + ".\n"
    )
    sys.stdout.flush()
    return {"recalibrate_s": recal}


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        main()
