"""Exact per-case critical cutoff (one gather + one partition) vs the CLS paper's bisection.

On a 512 x 512 x 300 float32 probability volume with an irregular lesion of ~1.8 % of the voxels
(see ``_common.make_volume``), times

* ``ConformalSegLib.conformal.cls.critical_cutoff`` (exact: the k-th largest lesion probability),
* the paper's Algorithm 1 (``baselines.cls_bisection``: bisection on ``t`` with ``prob >= 1 - t``
  until ``|FNR - eps| <= 1e-4``, capped at 60 iterations), with FNR evaluated as the paper does, by
  thresholding the whole volume at every iteration, and -- a stronger baseline -- on the lesion
  values gathered once,
* the correct bisection variant (``baselines.largest_cutoff_bisection``, tolerance 2**-24),
* ``ConformalSegLib.conformal.summaries.lesion_values`` (building one case's summary: gather + sort),

and checks each bisection answer: its iterations, its cutoff's distance from the exact one, and
whether the mask it describes (``prob >= cutoff``, compared exactly) really has ``FNR <= eps``.

Run: ``.venv/bin/python benchmarks/bench_cls_exact_vs_bisection.py [--quick] [--epsilon 0.1]``.
"""

from __future__ import annotations

import sys

import _common as C
import baselines as B
import numpy as np

from ConformalSegLib.conformal.cls import critical_cutoff
from ConformalSegLib.conformal.exact import allowed_misses
from ConformalSegLib.conformal.summaries import lesion_values

EPSILONS_CHECKED = (0.01, 0.05, 0.1, 0.2, 0.3)


def exact_misses(values: np.ndarray, cutoff: float) -> int:
    """Lesion voxels missed by the mask ``prob >= cutoff`` compared exactly (library convention)."""
    return int(np.count_nonzero(values < B.round_up_to_float_dtype(cutoff, values.dtype)))


def _correctness_rows(values: np.ndarray) -> tuple[list[list[object]], int]:
    """Per checked epsilon, both bisections' answers against the exact critical cutoff of ``values``;
    the rows and the number of answers that violate ``FNR <= eps``."""
    m = values.size

    def check_row(eps_i: float, exact_c: float, res: B.BisectionResult, name: str) -> list[object]:
        misses = exact_misses(values, res.cutoff)
        ok = misses <= allowed_misses(m, eps_i)
        return [
            eps_i,
            name,
            f"{exact_c:.9g}",
            f"{res.cutoff:.9g}",
            f"{res.cutoff - exact_c:+.3g}",
            f"{res.iterations}{'' if res.converged else ' (cap)'}",
            f"{res.fnr:.6f}",
            f"{misses / m:.6f}",
            "yes" if ok else "**NO**",
        ]

    check_rows, violations = [], 0
    for eps_i in EPSILONS_CHECKED:
        exact_c = critical_cutoff(values, np.ones(m, dtype=bool), eps_i)
        for name, res in (
            ("Algorithm 1", B.cls_bisection(B.ValuesFNR(values), eps_i)),
            ("largest-cutoff", B.largest_cutoff_bisection(B.ValuesFNR(values), eps_i)),
        ):
            row = check_row(eps_i, exact_c, res, name)
            violations += row[-1] != "yes"
            check_rows.append(row)
    return check_rows, violations


def main(argv: list[str] | None = None) -> dict:
    args = C.parse_args(
        __doc__.splitlines()[0],
        argv,
        lambda p: p.add_argument(
            "--epsilon", type=float, default=0.1, help="FNR tolerance of the timed runs (default 0.1)"
        ),
    )
    eps = args.epsilon
    shape = C.QUICK_SHAPE if args.quick else C.FULL_SHAPE
    reps_fast, reps_slow = (3, 1) if args.quick else (7, 3)

    C.log(f"[cls] generating {shape} volume ...")
    gen_s, _, (prob, lesion) = C.time_call(lambda: C.make_volume(shape, seed=args.seed), 1, warmup=0)
    desc = C.volume_description(prob, lesion)
    C.log(f"[cls] {desc} ({gen_s:.1f} s)")
    values = prob[lesion]  # for the correctness checks only
    m = values.size

    C.log("[cls] exact critical_cutoff ...")
    t_exact, _, c_exact = C.time_call(lambda: critical_cutoff(prob, lesion, eps), reps_fast)
    t_gather, _, _ = C.time_call(lambda: prob[lesion], reps_fast)
    C.log("[cls] lesion_values (summary building) ...")
    t_summary, _, _ = C.time_call(lambda: lesion_values(prob, lesion), reps_fast)

    C.log("[cls] Algorithm 1, full-volume FNR per iteration ...")
    t_paper_vol, _, r_paper_vol = C.time_call(
        lambda: B.cls_bisection(B.VolumeFNR(prob, lesion), eps), reps_slow, warmup=0
    )
    C.log("[cls] largest-cutoff bisection, full volume ...")
    t_tol_vol, _, r_tol_vol = C.time_call(
        lambda: B.largest_cutoff_bisection(B.VolumeFNR(prob, lesion), eps), reps_slow, warmup=0
    )
    C.log("[cls] Algorithm 1 / largest-cutoff bisection on gathered lesion values ...")
    t_paper_val, _, r_paper_val = C.time_call(lambda: B.cls_bisection(B.ValuesFNR(prob[lesion]), eps), reps_fast)
    t_tol_val, _, r_tol_val = C.time_call(lambda: B.largest_cutoff_bisection(B.ValuesFNR(prob[lesion]), eps), reps_fast)
    assert r_paper_vol == r_paper_val and r_tol_vol == r_tol_val, "volume and gathered oracles disagree"

    # the whole-volume effect of the bisection's cutoff error at the timed epsilon
    def mask_difference(cutoff: float) -> int:
        """Voxels (anywhere in the volume) on which ``prob >= cutoff`` and ``prob >= c_exact`` differ."""
        a = B.round_up_to_float_dtype(min(cutoff, c_exact), prob.dtype)
        b = B.round_up_to_float_dtype(max(cutoff, c_exact), prob.dtype)
        return int(np.count_nonzero((prob >= a) & (prob < b)))

    allowed = allowed_misses(m, eps)
    timing_rows = [
        ["exact `critical_cutoff` (gather + partition)", C.fmt_s(t_exact), "1", "1.00x"],
        [
            "Algorithm 1, FNR by full-volume threshold (paper)",
            C.fmt_s(t_paper_vol),
            f"{r_paper_vol.iterations}{'' if r_paper_vol.converged else ' (cap)'}",
            C.fmt_ratio(t_paper_vol / t_exact),
        ],
        [
            "largest-cutoff bisection (tol 2^-24), full volume",
            C.fmt_s(t_tol_vol),
            str(r_tol_vol.iterations),
            C.fmt_ratio(t_tol_vol / t_exact),
        ],
        [
            "Algorithm 1 on gathered lesion values",
            C.fmt_s(t_paper_val),
            f"{r_paper_val.iterations}{'' if r_paper_val.converged else ' (cap)'}",
            C.fmt_ratio(t_paper_val / t_exact),
        ],
        [
            "largest-cutoff bisection on gathered values",
            C.fmt_s(t_tol_val),
            str(r_tol_val.iterations),
            C.fmt_ratio(t_tol_val / t_exact),
        ],
        [
            "(the gather `prob[lesion]` alone, part of every row but the full-volume ones)",
            C.fmt_s(t_gather),
            "1",
            C.fmt_ratio(t_gather / t_exact),
        ],
        ["`lesion_values` (summary: gather + sort)", C.fmt_s(t_summary), "1", C.fmt_ratio(t_summary / t_exact)],
    ]

    check_rows, violations = _correctness_rows(values)

    out = []
    out.append("### Exact critical cutoff vs bisection (one case)\n")
    out.append(
        f"Volume: {desc}. Timed at epsilon = {eps}; median of {reps_fast} runs "
        f"({reps_slow} for the full-volume bisections). Volume generation: {gen_s:.1f} s.\n"
    )
    out.append(C.md_table(["method", "median time", "passes / iterations", "time / exact"], timing_rows))
    out.append("")
    out.append(
        f"At epsilon = {eps}: exact c_i = {c_exact:.9g} (k = {m - allowed:,} of m = {m:,} lesion voxels, "
        f"at most {allowed:,} missed). Algorithm 1 returned t = {r_paper_vol.t:.9g}, i.e. cutoff "
        f"1 - t = {r_paper_vol.cutoff:.9g} ({r_paper_vol.cutoff - c_exact:+.3g} from exact; the two masks differ on "
        f"{mask_difference(r_paper_vol.cutoff):,} voxels of the volume); the largest-cutoff bisection returned "
        f"{r_tol_vol.cutoff:.9g} ({r_tol_vol.cutoff - c_exact:+.3g}; masks differ on "
        f"{mask_difference(r_tol_vol.cutoff):,} voxels).\n"
    )
    out.append(
        "Correctness of the bisection answers (FNR of the mask `prob >= cutoff`, compared exactly; "
        "'loop FNR' is what the loop itself measured with NumPy's float32 rounding of `1 - t`):\n"
    )
    out.append(
        C.md_table(
            [
                "eps",
                "bisection",
                "exact c_i",
                "bisection cutoff",
                "cutoff - exact",
                "iterations",
                "loop FNR",
                "true FNR",
                "FNR <= eps",
            ],
            check_rows,
        )
    )
    out.append("")
    print("\n".join(out))
    sys.stdout.flush()
    C.log(f"[cls] peak RSS {C.peak_rss_mb():.0f} MiB")
    return {
        "t_exact": t_exact,
        "t_paper_volume": t_paper_vol,
        "t_paper_values": t_paper_val,
        "t_summary": t_summary,
        "t_gather": t_gather,
        "ratio_paper_volume": t_paper_vol / t_exact,
        "ratio_paper_values": t_paper_val / t_exact,
        "violations": violations,
    }


if __name__ == "__main__":
    main()
