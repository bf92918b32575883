"""Guarantees that survive deployment, measured on simulated scans: group-conditional (Mondrian) CLS where the
marginal guarantee hides a failing group, weighted CLS under covariate shift, and the drift monitor's false
alarms and detection delays. The numbers of README.md and RESULTS.md; the same designs are tested as
statistics in ``Testing/test_mondrian.py``, ``test_weighted.py`` and ``test_monitoring.py``.

Scans are summaries (sorted lesion probabilities), drawn fresh for every trial (seeded):

1. **Mondrian**: 30 % of scans have small lesions (20-79 voxels) the network is unsure of (Beta(a, b),
   a in [0.5, 1.5]); the rest large ones (150-399 voxels, a in [1.5, 6]). n = 100 calibration scans per
   trial; one new small-lesion scan, one new large-lesion scan and one new scan of the mixture.
2. **Weighted**: a label-free feature x is N(0, 1) at the calibration site and N(1, 1) at the target site;
   probabilities Beta(exp(1 - 0.7 x), b): harder at the target site, identical given x (covariate shift).
   n = 200 calibration scans and 200 unlabelled target scans per trial; weights from the true likelihood
   ratio exp(x - 1/2) and from the logistic domain classifier; one new target scan.
3. **Monitor**: 100 calibration scores then 300 reviewed ones, i.i.d. (false alarms) or shifted by 0.5 or
   1 standard deviation towards harder cases from the first reviewed case (detection).

Usage: ``.venv/bin/python benchmarks/eval_deployment.py [--quick] [--seed S]`` (full: about a minute).
"""

from __future__ import annotations

import sys
import warnings

import _common as C
import numpy as np

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning
from ConformalSegLib.conformal.cls import calibrate_cls, critical_cutoffs
from ConformalSegLib.conformal.mondrian import calibrate_groups, grouping_from_table
from ConformalSegLib.conformal.monitoring import monitor
from ConformalSegLib.conformal.profile import CalibrationProfile
from ConformalSegLib.conformal.summaries import LesionSummaries
from ConformalSegLib.conformal.weighted import (
    DomainClassifier,
    Weighting,
    effective_sample_size,
    fit_domain_classifier,
    weighted_calibration,
)

EPS, ALPHA = 0.1, 0.1


def _summaries(rng: np.random.Generator, sizes: np.ndarray, a: np.ndarray, b: np.ndarray) -> LesionSummaries:
    values = [np.sort(rng.beta(a[i], b[i], sizes[i]).astype(np.float32))[::-1] for i in range(sizes.size)]
    return LesionSummaries.from_sorted((f"c{i:04d}", v) for i, v in enumerate(values))


def grouped(rng: np.random.Generator, n: int, small_frac: float = 0.3) -> tuple[LesionSummaries, np.ndarray]:
    small = rng.random(n) < small_frac
    sizes = np.where(small, rng.integers(20, 80, n), rng.integers(150, 400, n))
    a = np.where(small, rng.uniform(0.5, 1.5, n), rng.uniform(1.5, 6.0, n))
    return _summaries(rng, sizes, a, rng.uniform(0.5, 2.0, n)), small


def shifted(rng: np.random.Generator, x: np.ndarray) -> LesionSummaries:
    return _summaries(rng, rng.integers(50, 300, x.size), np.exp(1.0 - 0.7 * x), rng.uniform(0.5, 1.5, x.size))


def _pm(x: list[float] | np.ndarray) -> str:
    x = np.asarray(x, dtype=float)
    return f"{x.mean():.3f} ± {1.96 * x.std(ddof=1) / np.sqrt(x.size):.3f}"


def mondrian_section(rng: np.random.Generator, trials: int) -> str:
    hits = {
        k: []
        for k in ("marginal, all scans", "marginal, small", "marginal, large", "Mondrian, small", "Mondrian, large")
    }
    thresholds = {"marginal": [], "small": [], "large": []}
    for _ in range(trials):
        s, small = grouped(rng, 100)
        like = calibrate_cls(s, EPS, ALPHA)
        groups = {c: ("small" if f else "large") for c, f in zip(s.case_ids, small)}
        m = calibrate_groups(grouping_from_table(s.case_ids, groups), like, CalibrationProfile(like, s))
        c = {
            name: critical_cutoffs(grouped(rng, 1, frac)[0], EPS)[0] for name, frac in (("small", 1.0), ("large", 0.0))
        }
        hits["marginal, all scans"].append(critical_cutoffs(grouped(rng, 1)[0], EPS)[0] >= like.probability_threshold)
        for name in ("small", "large"):
            hits[f"marginal, {name}"].append(c[name] >= like.probability_threshold)
            hits[f"Mondrian, {name}"].append(c[name] >= m.group(name).calibration.probability_threshold)
            thresholds[name].append(m.group(name).calibration.probability_threshold)
        thresholds["marginal"].append(like.probability_threshold)
    rows = [[k, _pm(v)] for k, v in hits.items()]
    lines = [
        f"#### Mondrian CLS (eps = alpha = 0.1): {trials} trials, n = 100 calibration scans (about 30 small-lesion)\n",
        C.md_table(["threshold, new scans", "ECR = P(FNR <= 0.1) (95 % CI)"], rows),
        "",
        f"Mean thresholds: marginal {np.mean(thresholds['marginal']):.4f}; "
        f"Mondrian small {np.mean(thresholds['small']):.4f}, large {np.mean(thresholds['large']):.4f} "
        "(a lower threshold is a larger mask).\n",
    ]
    return "\n".join(lines)


ORACLE = DomainClassifier(("x",), np.zeros(1), np.ones(1), np.ones(1), -0.5, 1, 1)  # log w = x - 1/2


def weighted_section(rng: np.random.Generator, trials: int) -> str:
    hits = {"unweighted CLS": [], "weighted, true likelihood ratio": [], "weighted, logistic domain classifier": []}
    trivial, ess, aucs = [], [], []
    for t in range(trials):
        x, xt = rng.normal(size=200), rng.normal(1.0, 1.0, size=200)
        s = shifted(rng, x)
        like = calibrate_cls(s, EPS, ALPHA)
        profile = CalibrationProfile(like, s)
        x_new = rng.normal(1.0, 1.0, size=(1, 1))
        c_new = critical_cutoffs(shifted(rng, x_new[:, 0]), EPS)[0]
        hits["unweighted CLS"].append(c_new >= like.probability_threshold)
        o = weighted_calibration(
            like, profile, Weighting(ORACLE, x[:, None], xt[:, None]), ORACLE.weights(x_new)[0], warn=False
        )
        hits["weighted, true likelihood ratio"].append(c_new >= o.calibration.probability_threshold)
        classifier, auc = fit_domain_classifier(x[:, None], xt[:, None], ("x",), cv_auc=t < 50)
        weighting = Weighting(classifier, x[:, None], xt[:, None])
        e = weighted_calibration(like, profile, weighting, weighting.weight_of(x_new), warn=False)
        hits["weighted, logistic domain classifier"].append(c_new >= e.calibration.probability_threshold)
        trivial.append(e.is_trivial)
        ess.append(effective_sample_size(weighting.calibration_weights))
        if auc is not None:
            aucs.append(auc)
    rows = [[k, _pm(v)] for k, v in hits.items()]
    return "\n".join(
        [
            f"#### Weighted CLS under covariate shift (eps = alpha = 0.1): {trials} trials, n = 200 calibration + 200 "
            "unlabelled target scans\n",
            C.md_table(["threshold at the target site", "ECR at the target site (95 % CI)"], rows),
            "",
            f"Domain classifier: cross-validated AUC {np.mean(aucs):.3f}; effective sample size {np.mean(ess):.1f} of "
            f"200; new target scans given the trivial set (weight too large): {np.mean(trivial):.1%}.\n",
        ]
    )


def _alarms(rng: np.random.Generator, runs: int, shift: float, kind: str, delta: float) -> list[int | None]:
    out = []
    for _ in range(runs):
        r = monitor(
            rng.normal(size=100),
            rng.normal(shift, 1.0, size=300),
            None,
            case_ids=[str(i) for i in range(300)],
            delta=delta,
            kind=kind,
            seed=int(rng.integers(1 << 30)),
        )
        out.append(r.alarm)
    return out


def monitor_section(rng: np.random.Generator, runs: int) -> str:
    rows = []
    for kind in ("jumper", "power"):
        for delta in (0.05, 0.01):
            false = np.mean([a is not None for a in _alarms(rng, runs, 0.0, kind, delta)])
            cells = [kind, f"{delta:g}", f"{false:.3f} (<= {delta:g})"]
            for shift in (0.5, 1.0):
                alarms = _alarms(rng, max(50, runs // 4), shift, kind, delta)
                found = [a + 1 for a in alarms if a is not None]
                median = f"{np.median(found):.0f}" if found else "-"
                cells.append(f"{median} ({len(found) / len(alarms):.0%} within 300)")
            rows.append(cells)
    header = ["martingale", "delta", "false alarms, exchangeable", "median cases to alarm, 0.5 sd shift", "1 sd shift"]
    return "\n".join(
        [
            f"#### Drift monitor: 100 calibration scores, 300 reviewed cases; {runs} exchangeable runs per row\n",
            C.md_table(header, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    trials, w_trials, runs = (60, 40, 60) if args.quick else (1000, 500, 1000)
    rng = np.random.default_rng(args.seed)
    print("### Deployment guarantees on simulated scans (eval_deployment.py)\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        C.log("[deploy] Mondrian ...")
        print(mondrian_section(rng, trials))
        C.log("[deploy] weighted ...")
        print(weighted_section(rng, w_trials))
        C.log("[deploy] monitor ...")
        print(monitor_section(rng, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
