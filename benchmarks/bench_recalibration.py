"""Recalibration latency from summaries: ``calibrate_cls`` / ``calibrate_crc`` for a new (eps, alpha)
vs recomputing every case's critical cutoff by bisection from the same summaries.

``n = 1000`` cases (``--quick``: 100) with lesion sizes drawn log-uniformly in 50..200000 voxels
(``--quick``: 50..20000). Each case's lesion probabilities are Beta-distributed with per-case
parameters (some confident cases, some under-confident ones), sorted descending and added with
``SummaryBuilder.add_sorted`` -- no volumes. Both precisions (float32 and uint16) are measured.

* ``calibrate_cls``: timeit-style median per call while cycling through new (eps, alpha) pairs
  (nothing is cached between calls).
* ``calibrate_crc``: the first call on a summaries object sorts all lesion values once (cached);
  "first" is measured on fresh objects sharing the same arrays, "subsequent" cycles through epsilons.
* Baselines (same summaries, decoded values): the paper's Algorithm 1 per case
  (``baselines.cls_bisection``, FNR by counting, ``delta = 1e-4``, cap 60) then its conformal step;
  the correct largest-cutoff bisection (tolerance 2**-24); and the strongest bisection, which finds
  FNR by binary search in pre-sorted ascending copies (the copies are made outside the timing).
* The CLS latency is also measured with 1 % lesion-free cases under the default ``empty="exclude"``
  policy, a common situation in real calibration sets.

Run: ``.venv/bin/python benchmarks/bench_recalibration.py [--quick]``.
"""

from __future__ import annotations

import sys
import warnings

import _common as C
import baselines as B
import numpy as np

from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import calibrate_crc
from ConformalSegLib.conformal.exact import allowed_misses_array
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder

PAIRS = [(e, a) for e in (0.05, 0.1, 0.15, 0.2, 0.3) for a in (0.05, 0.1, 0.2)]
CRC_EPSILONS = (0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
HEADLINE = (0.1, 0.1)  # (eps, alpha) of the baseline comparison


def make_cases(n: int, lo: int, hi: int, seed: int) -> list[np.ndarray]:
    """Per-case float32 lesion probabilities sorted descending (log-uniform sizes in [lo, hi])."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)
    cases = []
    for m in sizes:
        a, b = rng.uniform(0.6, 6.0), rng.uniform(0.3, 1.5)  # mean a/(a+b): mostly 0.5..0.95
        v = rng.beta(a, b, int(m)).astype(np.float32)
        v.sort()
        cases.append(v[::-1])
    return cases


def build(cases: list[np.ndarray], precision: str) -> LesionSummaries:
    builder = SummaryBuilder(precision)
    for i, v in enumerate(cases):
        builder.add_sorted(f"case{i:04d}", v)
    return builder.build()


def fresh(s: LesionSummaries) -> LesionSummaries:
    """A new summaries object sharing the arrays (so its caches are empty)."""
    return LesionSummaries(s.values, s.offsets, s.case_ids, s.precision)


def bisection_baseline(
    s: LesionSummaries, eps: float, alpha: float, variant: str, ascending: list[np.ndarray] | None = None
) -> tuple[float, list[B.BisectionResult]]:
    """Critical cutoffs of every case by bisection from the summaries, then the conformal step."""
    flat = s.probabilities_view()  # decoded float64, cached: the baseline gets it for free
    off = s.offsets
    results = []
    for i in range(s.n):
        if variant == "sorted":
            oracle = B.SortedValuesFNR(ascending[i])
        else:
            oracle = B.ValuesFNR(flat[off[i] : off[i + 1]])
        if variant == "paper":
            results.append(B.cls_bisection(oracle, eps))
        else:
            results.append(B.largest_cutoff_bisection(oracle, eps))
    t = np.array([r.t for r in results])
    return B.conformal_cutoff_from_t(t, alpha), results


def _time_sorted_bisection(s: LesionSummaries, flat: np.ndarray, eps: float, alpha: float, reps: int) -> float:
    """Time of the largest-cutoff bisection by binary search in sorted copies (the copies freed on return)."""
    ascending = [np.ascontiguousarray(flat[s.offsets[i] : s.offsets[i + 1]][::-1]) for i in range(s.n)]
    t_sorted, _, _ = C.time_call(lambda: bisection_baseline(s, eps, alpha, "sorted", ascending), reps, warmup=0)
    return t_sorted


def _bench_precision(
    precision: str,
    cases: list,
    n: int,
    total: int,
    results: dict[str, float],
    summary_rows: list,
    latency_rows: list,
    baseline_rows: list,
    check_rows: list,
    *,
    repeats: int,
    reps_slow: int,
    min_time: float,
) -> None:
    """Build the summaries in ``precision`` and time calibration and the baselines on them; append the rows."""
    eps0, alpha0 = HEADLINE
    C.log(f"[recal] {precision}: building summaries ...")
    t_build, _, s = C.time_call(lambda: build(cases, precision), 1, warmup=0)
    mb = (s.values.nbytes + s.offsets.nbytes) / 1e6

    C.log(f"[recal] {precision}: calibrate_cls latency ...")
    t_cls = C.time_per_call(lambda i: calibrate_cls(s, *PAIRS[i % len(PAIRS)]), repeats=repeats, min_time=min_time)
    c_lib = calibrate_cls(s, eps0, alpha0).probability_threshold

    C.log(f"[recal] {precision}: calibrate_crc first / subsequent ...")
    t_crc_first, _, _ = C.time_call(lambda: calibrate_crc(fresh(s), eps0), reps_slow, warmup=0)
    s_crc = fresh(s)
    calibrate_crc(s_crc, eps0)
    t_crc_next = C.time_per_call(
        lambda i: calibrate_crc(s_crc, CRC_EPSILONS[i % len(CRC_EPSILONS)]),
        repeats=max(3, repeats // 2),
        min_time=min_time,
    )
    cache_mb = (s_crc.probabilities_view().nbytes + sum(a.nbytes for a in s_crc.weighted_distinct_descending())) / 1e6

    # 1 % lesion-free cases, default policy empty="exclude"
    n_empty = max(1, n // 100)
    s_empty = LesionSummaries(
        s.values,
        np.concatenate([s.offsets, np.full(n_empty, s.offsets[-1])]),
        s.case_ids + tuple(f"empty{i}" for i in range(n_empty)),
        s.precision,
    )
    t_cls_empty = C.time_per_call(
        lambda i: calibrate_cls(s_empty, *PAIRS[i % len(PAIRS)]), repeats=max(3, repeats // 2), min_time=min_time
    )
    t_crc_empty, _, _ = C.time_call(lambda: calibrate_crc(s_empty, CRC_EPSILONS[1]), max(1, reps_slow - 1), warmup=1)

    C.log(f"[recal] {precision}: bisection baselines ...")
    t_paper, _, (c_paper, r_paper) = C.time_call(
        lambda: bisection_baseline(s, eps0, alpha0, "paper"), reps_slow, warmup=0
    )
    t_tol, _, (c_tol, _) = C.time_call(lambda: bisection_baseline(s, eps0, alpha0, "tol"), reps_slow, warmup=0)
    flat = s.probabilities_view()
    t_sorted = _time_sorted_bisection(s, flat, eps0, alpha0, reps_slow)

    # per-case quality of Algorithm 1's t_i, checked exactly against the summaries
    capped = sum(not r.converged for r in r_paper)
    sizes = s.lesion_sizes
    allowed = allowed_misses_array(sizes, eps0)
    bad = 0
    for i, r in enumerate(r_paper):
        v = flat[s.offsets[i] : s.offsets[i + 1]]
        bad += int(np.count_nonzero(v < r.cutoff)) > allowed[i]  # float64 values: exact comparison
    iters = np.array([r.iterations for r in r_paper])

    summary_rows.append([precision, f"{n:,}", f"{total:,}", f"{mb:.1f}", f"{cache_mb:.0f}", C.fmt_s(t_build)])
    latency_rows += [
        [precision, "`calibrate_cls` (new eps, alpha each call)", f"{t_cls * 1e6:.1f}"],
        [precision, "`calibrate_crc`, first call (builds the sorted cache)", f"{t_crc_first * 1e6:,.0f}"],
        [precision, "`calibrate_crc`, subsequent calls (new eps)", f"{t_crc_next * 1e6:,.0f}"],
        [precision, f"`calibrate_cls` with {n_empty} empty cases (exclude policy)", f"{t_cls_empty * 1e6:,.1f}"],
        [precision, f"`calibrate_crc` with {n_empty} empty cases, repeated call", f"{t_crc_empty * 1e6:,.0f}"],
    ]
    baseline_rows += [
        [precision, "Algorithm 1 per case (count) + conformal step", C.fmt_s(t_paper), C.fmt_ratio(t_paper / t_cls)],
        [precision, "largest-cutoff bisection (count, tol 2^-24)", C.fmt_s(t_tol), C.fmt_ratio(t_tol / t_cls)],
        [
            precision,
            "largest-cutoff bisection (binary search in sorted copies)",
            C.fmt_s(t_sorted),
            C.fmt_ratio(t_sorted / t_cls),
        ],
    ]
    check_rows.append(
        [
            precision,
            f"{c_lib:.9g}",
            f"{c_paper:.9g}",
            f"{c_paper - c_lib:+.3g}",
            f"{c_tol:.9g}",
            f"{c_tol - c_lib:+.3g}",
            f"{capped} / {n}",
            f"{np.median(iters):.0f} / {iters.mean():.1f}",
            f"{bad} / {n}",
        ]
    )
    results.update(
        {
            f"{precision}_cls_us": t_cls * 1e6,
            f"{precision}_crc_first_s": t_crc_first,
            f"{precision}_crc_next_s": t_crc_next,
            f"{precision}_ratio_paper": t_paper / t_cls,
            f"{precision}_mb": mb,
        }
    )


def main(argv: list[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n, lo, hi = (100, 50, 20_000) if args.quick else (1000, 50, 200_000)
    reps_slow = 1 if args.quick else 3
    min_time = 0.05 if args.quick else 0.3
    repeats = 3 if args.quick else 7

    C.log(f"[recal] generating {n} cases ...")
    cases = make_cases(n, lo, hi, args.seed)
    total = sum(c.size for c in cases)
    summary_rows, latency_rows, baseline_rows, check_rows = [], [], [], []
    results: dict[str, float] = {}
    eps0, alpha0 = HEADLINE

    for precision in ("float32", "uint16"):
        _bench_precision(
            precision,
            cases,
            n,
            total,
            results,
            summary_rows,
            latency_rows,
            baseline_rows,
            check_rows,
            repeats=repeats,
            reps_slow=reps_slow,
            min_time=min_time,
        )

    out = [
        "### Recalibration from summaries\n",
        f"{n:,} cases, lesion sizes log-uniform in {lo:,}..{hi:,} voxels ({total:,} lesion values in all), "
        f"Beta-distributed probabilities; summaries built with `SummaryBuilder.add_sorted`.\n",
        C.md_table(
            ["precision", "cases", "lesion values", "summary MB", "CRC cache MB (float64)", "build time"], summary_rows
        ),
        "",
        f"Latency (median per call, timeit-style, cycling through {len(PAIRS)} (eps, alpha) pairs / "
        f"{len(CRC_EPSILONS)} epsilons):\n",
        C.md_table(["precision", "call", "µs per call"], latency_rows),
        "",
        f"Baselines at eps = {eps0}, alpha = {alpha0} (critical cutoffs of all {n:,} cases by bisection from the "
        f"same summaries' decoded values, then the conformal step; median of {reps_slow}):\n",
        C.md_table(["precision", "baseline", "time", "time / `calibrate_cls`"], baseline_rows),
        "",
        "Thresholds and per-case quality of Algorithm 1 (its t_i checked exactly: 'violations' are cases whose "
        "mask `prob >= 1 - t_i` misses more than floor(eps m) lesion voxels):\n",
        C.md_table(
            [
                "precision",
                "`calibrate_cls` c_hat",
                "Alg. 1: 1 - t_hat",
                "difference",
                "largest-cutoff bisection",
                "difference",
                "Alg. 1 hit the 60-iteration cap",
                "Alg. 1 iterations median / mean",
                "Alg. 1 per-case violations",
            ],
            check_rows,
        ),
        "",
    ]
    print("\n".join(out))
    sys.stdout.flush()
    C.log(f"[recal] peak RSS {C.peak_rss_mb():.0f} MiB")
    return results


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no calibration here may be "too small"
        main()
