"""sem-CRC and friends (ConformalSegLib.semcrc): exact omega, anchor optimality, risk-control validity,
edge cases.

Validity test design: one seeded pool of synthetic scans; in each of R trials a uniformly random
permutation splits it into n_cal calibration scans and the rest as test scans. Conditional on the
pool, the scans are exchangeable under the random permutation, so every procedure's guarantee
``E[test risk] <= epsilon`` holds for the expectation over splits. The R trial means are i.i.d. given
the pool; the test asserts ``mean <= epsilon + 3 * sd / sqrt(R)`` (one-sided CLT bound, false-alarm
rate about 0.1 % per check). ``test_validity_check_has_power`` shows that the same check rejects a
procedure calibrated at a larger epsilon.
"""

from __future__ import annotations

import math
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError  # noqa: E402
from ConformalSegLib.semcrc import (  # noqa: E402
    AnchorSample,
    IntervalCalibrationError,
    IntervalData,
    IntervalInputError,
    OmegaCurve,
    OrganMap,
    UncontrollableRiskWarning,
    bisect_omega,
    calibrate_crc_interval,
    calibrate_interval_method,
    calibrate_kcrc,
    calibrate_semcrc,
    calibrate_semcrc_organ,
    exact_omega,
    lambdas_at,
    loss_quantile_partition,
    make_interval_scan,
    mc_dropout_intervals,
    omega_thresholds,
    organ_memberships,
    scan_loss,
    solve_anchor,
    surrogate_risk,
    synthetic_intervals,
)

EPS = 0.1
INF = math.inf


# ----------------------------------------------------------------------------------------- helpers


def brute_omega(thresholds: list[np.ndarray], sizes: list[int], epsilon: float, lo: float, hi: float) -> float:
    """Smallest candidate in {lo} U {t in (lo, hi]} with sum_i #{t > w}/d_i <= (n+1) eps - 1, in Fractions."""
    n = len(sizes)
    budget = (n + 1) * Fraction(repr(epsilon)) - 1
    if budget < 0:
        return INF
    candidates = sorted({lo} | {float(t) for ts in thresholds for t in ts if lo < t <= hi})
    for w in candidates:
        total = sum((Fraction(int(np.count_nonzero(ts > w)), d) for ts, d in zip(thresholds, sizes)), Fraction(0))
        if total <= budget:
            return w
    return INF


def random_problem(rng: np.random.Generator, ties: bool) -> tuple[list[np.ndarray], list[int]]:
    n = int(rng.integers(1, 25))
    thresholds, sizes = [], []
    for _ in range(n):
        d = int(rng.integers(1, 12))
        m = int(rng.integers(0, d + 1))
        t = rng.integers(-3, 8, m) / 4.0 if ties else rng.normal(0.5, 1.0, m)
        thresholds.append(np.asarray(t, dtype=np.float64))
        sizes.append(d)
    return thresholds, sizes


def adjusted_risk_exact(losses_num: list[int], sizes: list[int]) -> Fraction:
    n = len(sizes)
    mean = sum((Fraction(c, d) for c, d in zip(losses_num, sizes)), Fraction(0)) / n
    return Fraction(n, n + 1) * mean + Fraction(1, n + 1)


@pytest.fixture(scope="module")
def pool() -> IntervalData:
    return synthetic_intervals(400, shape=(1, 20, 20), seed=7).data()


# ----------------------------------------------------------------------------------------- exact omega


@pytest.mark.parametrize("ties", [False, True])
def test_exact_omega_equals_brute_force_and_bisection_limit(ties: bool) -> None:
    rng = np.random.default_rng(11 + ties)
    seen = {"min": 0, "inf": 0, "inner": 0}
    for _ in range(250):
        thresholds, sizes = random_problem(rng, ties)
        epsilon = float(rng.choice([0.05, 0.1, 0.2, 0.25, 0.3, 0.5]))
        lo = float(rng.choice([0.0, -0.5, -2.0]))
        hi = float(rng.choice([INF, 1.0, 3.0]))
        curve = OmegaCurve.from_scans(thresholds, sizes)
        exact = exact_omega(curve, epsilon, omega_min=lo, omega_max=hi)
        assert exact == brute_omega(thresholds, sizes, epsilon, lo, hi)
        # the same with the pivot bracketing forced (merge at most 3 thresholds)
        assert exact_omega(curve, epsilon, omega_min=lo, omega_max=hi, merge_limit=3) == exact
        bis = bisect_omega(curve, epsilon, omega_min=lo, omega_max=hi, tol=1e-12)
        if math.isinf(exact):
            assert math.isinf(bis)
            seen["inf"] += 1
        else:
            assert exact <= bis <= exact + 1e-12
            seen["min" if exact == lo else "inner"] += 1
    assert min(seen.values()) >= 5, seen  # every regime (omega_min, uncontrollable, interior) was exercised


def test_exact_omega_budget_equality_uses_exact_fractions() -> None:
    # n = 9, eps = 0.2: budget = 10 * 1/5 - 1 = 1 exactly; losses 1/3 + 1/3 + 1/3 = 1 must satisfy (<=)
    thresholds = [np.array([1.0]), np.array([1.0]), np.array([1.0])] + [np.array([0.5])] * 6
    sizes = [3, 3, 3] + [10**9] * 6
    curve = OmegaCurve.from_scans(thresholds, sizes)
    # at omega in [0.5, 1): the three 1/3 losses sum to exactly 1 = budget -> allowed
    assert exact_omega(curve, 0.2) == 0.5
    assert brute_omega(thresholds, sizes, 0.2, 0.0, INF) == 0.5


def test_exact_omega_too_few_scans_is_uncontrollable() -> None:
    curve = OmegaCurve.from_scans([np.array([0.1])] * 5, [2] * 5)  # n = 5 < 1/0.1 - 1 = 9
    assert exact_omega(curve, 0.1) == INF
    assert bisect_omega(curve, 0.1) == INF


def test_thresholds_match_float_addition_exactly() -> None:
    rng = np.random.default_rng(3)
    need = np.concatenate([rng.normal(0.2, 0.3, 2000), 0.5 + np.arange(1, 50) * 2.0**-53, [0.0, -1.0]])
    anchor = np.concatenate([rng.uniform(0, 0.6, 2000), np.full(49, 0.5), [0.3, 0.3]])
    t = omega_thresholds(need, anchor)
    pos = need > 0
    assert np.all(np.isneginf(t[~pos]))
    assert np.all(anchor[pos] + t[pos] >= need[pos])  # covered at its threshold
    assert np.all(anchor[pos] + np.nextafter(t[pos], -np.inf) < need[pos])  # not one float earlier


def test_calibration_is_tight_at_the_returned_lambda(pool: IntervalData) -> None:
    """At lambda_hat the CRC condition holds exactly; one float step below omega_hat it fails."""
    cal = pool.subset(range(80))
    for calib in (
        calibrate_crc_interval(cal, EPS),
        calibrate_semcrc(pool.subset(range(100)), EPS, n_opt=20, d_opt=100, gammas=(0.5,), seed=1),
    ):
        by_id = {s.case_id: s for s in pool.scans}
        scans = [by_id[c] for c in calib.cal_cases]
        assert len(scans) == 80 and not set(calib.cal_cases) & set(calib.opt_cases)
        sizes = [s.d for s in scans]
        misses = [int(np.count_nonzero(s.need > calib.voxel_lambda(s))) for s in scans]
        assert adjusted_risk_exact(misses, sizes) <= Fraction(repr(EPS))
        omega = float(calib.omega[0])
        below = lambdas_at(calib.anchor, np.nextafter(omega, -np.inf))
        misses_below = [int(np.count_nonzero(s.need > below[calib.voxel_groups(s)])) for s in scans]
        if omega > -float(calib.anchor.max()):
            assert adjusted_risk_exact(misses_below, sizes) > Fraction(repr(EPS))


# ----------------------------------------------------------------------------------------- anchor


def tiny_sample(rng: np.random.Generator, k: int) -> AnchorSample:
    m = 8
    group = rng.integers(0, k, m)
    width = rng.uniform(0.05, 0.3, m)
    offset = np.abs(rng.normal(0.0, 0.25, m))
    weight = np.full(m, 1.0 / m)
    cost = np.bincount(group, minlength=k) / m + 0.05
    return AnchorSample(offset, width, group, weight, cost)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anchor_matches_grid_search_two_groups(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = tiny_sample(rng, 2)
    gamma, epsilon, upper = 0.5, 0.3, 1.0
    result = solve_anchor(sample, epsilon, gammas=(gamma,), lambda_max=upper)
    h = upper / 400
    grid = np.arange(0, upper + h / 2, h)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    lam = np.stack([a.ravel(), b.ravel()], axis=1)
    q = gamma / (1 - gamma)
    loss = np.maximum(0, 2 * (1 + q) * sample.offset / (sample.width + 2 * lam[:, sample.group]) - q) @ sample.weight
    feasible = loss <= epsilon
    assert feasible.any()
    objective = lam @ sample.cost
    best = float(objective[feasible].min())
    assert surrogate_risk(sample, result.lam, gamma) <= epsilon + 1e-6
    # grid optimum lies in [true optimum, true optimum + h * sum(cost)]
    assert result.objective <= best + 1e-6
    assert result.objective >= best - h * sample.cost.sum() - 1e-6


def test_anchor_single_group_is_the_surrogate_root() -> None:
    rng = np.random.default_rng(5)
    sample = tiny_sample(rng, 1)
    gamma, epsilon = 0.3, 0.2
    result = solve_anchor(sample, epsilon, gammas=(gamma,))
    lo, hi = 0.0, 10.0  # smallest lambda with surrogate risk <= epsilon (the risk decreases in lambda)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if surrogate_risk(sample, np.array([mid]), gamma) <= epsilon else (mid, hi)
    assert result.lam[0] == pytest.approx(hi, abs=1e-4)


def test_anchor_keeps_best_gamma() -> None:
    sample = tiny_sample(np.random.default_rng(9), 2)
    result = solve_anchor(sample, 0.3, gammas=(0.2, 0.5, 0.8), lambda_max=2.0)
    objectives = [obj for _, status, obj in result.trials if status.startswith("optimal")]
    assert len(objectives) == 3 and result.objective == pytest.approx(min(objectives))
    assert result.gamma in (0.2, 0.5, 0.8)


# ----------------------------------------------------------------------------------------- validity


def trial_risks(pool: IntervalData, method: str, trials: int, epsilon: float, n_cal: int = 60, **options) -> np.ndarray:
    """Per trial: mean test risk (whole scan), or per organ (R, K) for sem-crc-organ."""
    rng = np.random.default_rng(1234)
    out = []
    for r in range(trials):
        perm = rng.permutation(pool.n)
        cal, test = pool.subset(perm[:n_cal]), pool.subset(perm[n_cal:])
        calib = calibrate_interval_method(method, cal, epsilon, seed=r, **options)
        if method == "sem-crc-organ":
            out.append(
                [
                    np.mean([scan_loss(s.need[s.group == k], calib.lam[k]) for s in test.scans if (s.group == k).any()])
                    for k in range(pool.n_groups)
                ]
            )
        else:
            out.append(np.mean([scan_loss(s.need, calib.voxel_lambda(s)) for s in test.scans]))
    return np.asarray(out)


def within_tolerance(risks: np.ndarray, epsilon: float) -> np.ndarray:
    mean = risks.mean(axis=0)
    tol = 3 * risks.std(axis=0, ddof=1) / np.sqrt(risks.shape[0])
    return mean <= epsilon + tol


SHARED = dict(n_opt=15, d_opt=100, gammas=(0.5,))


def test_crc_validity(pool: IntervalData) -> None:
    risks = trial_risks(pool, "crc", 60, EPS)
    assert within_tolerance(risks, EPS)
    assert risks.mean() > EPS - 0.03  # not trivially conservative: CRC is tight up to about 1/(n+1)


@pytest.mark.parametrize("method", ["k-crc", "sem-crc"])
def test_kcrc_and_semcrc_validity(pool: IntervalData, method: str) -> None:
    risks = trial_risks(pool, method, 25, EPS, **SHARED)
    assert within_tolerance(risks, EPS)
    assert risks.mean() > EPS - 0.05


def test_per_organ_semcrc_validity_for_every_organ(pool: IntervalData) -> None:
    risks = trial_risks(pool, "sem-crc-organ", 25, EPS, from_anchor=False, **SHARED)
    assert risks.shape == (25, pool.n_groups)
    assert within_tolerance(risks, EPS).all(), risks.mean(axis=0)
    assert (risks.mean(axis=0) > EPS - 0.06).all()
    # whole-scan CRC does not control every organ in this data (the pancreas is under-covered)
    whole = []
    rng = np.random.default_rng(99)
    for _run in range(5):
        perm = rng.permutation(pool.n)
        calib = calibrate_crc_interval(pool.subset(perm[:60]), EPS)
        test = pool.subset(perm[60:])
        k = pool.groups.index("pancreas")
        whole.append(
            np.mean([scan_loss(s.need[s.group == k], calib.lam[0]) for s in test.scans if (s.group == k).any()])
        )
    assert np.mean(whole) > 1.5 * EPS


def test_validity_check_has_power(pool: IntervalData) -> None:
    """The same check flags intervals calibrated for a larger epsilon (i.e. invalid at EPS)."""
    risks = trial_risks(pool, "crc", 30, 0.15)
    assert not within_tolerance(risks, EPS)


def test_per_organ_from_anchor_never_goes_below_the_anchor(pool: IntervalData) -> None:
    calib = calibrate_semcrc_organ(pool.subset(range(80)), EPS, seed=3, from_anchor=True, **SHARED)
    assert calib.controlled and np.all(calib.lam >= calib.anchor) and np.all(calib.omega >= 0)


def test_per_organ_default_is_omega_from_zero(pool: IntervalData) -> None:
    """The default (``from_anchor=False``, CLI ``--organ-omega-from zero``) lets lambda_k go below the anchor
    (never below 0) and is never longer than the paper-literal eq. 12."""
    data = pool.subset(range(80))
    default = calibrate_semcrc_organ(data, EPS, seed=3, **SHARED)
    literal = calibrate_semcrc_organ(data, EPS, seed=3, from_anchor=True, **SHARED)
    assert np.array_equal(default.anchor, literal.anchor)  # the same S_opt split and anchor
    assert np.all(default.lam >= 0) and np.all(default.lam <= literal.lam)
    assert np.any(default.lam < default.anchor)


# ----------------------------------------------------------------------------------------- edge cases


def one_scan(**changes) -> dict:
    rng = np.random.default_rng(0)
    y = rng.normal(0.5, 0.1, (2, 4, 4))
    arrays = dict(
        lower=y - 0.1,
        upper=y + 0.1,
        truth=y + rng.normal(0, 0.1, y.shape),
        membership=np.zeros(y.shape, dtype=np.int32),
    )
    arrays.update(changes)
    return arrays


def test_nan_input_is_a_clear_error() -> None:
    arrays = one_scan()
    arrays["truth"][0, 1, 2] = np.nan
    with pytest.raises(IntervalInputError, match=r"truth of case 'c1' has 1 NaN/Inf.*Fix"):
        make_interval_scan(**arrays, case_id="c1")


def test_crossing_quantiles_and_shapes_are_clear_errors() -> None:
    arrays = one_scan()
    arrays["lower"], arrays["upper"] = arrays["upper"], arrays["lower"]
    with pytest.raises(IntervalInputError, match="crossing quantiles"):
        make_interval_scan(**arrays)
    with pytest.raises(IntervalInputError, match="shape"):
        make_interval_scan(**one_scan(upper=np.zeros((2, 4, 5))))
    with pytest.raises(IntervalInputError, match="no voxel inside the body"):
        make_interval_scan(**one_scan(membership=np.full((2, 4, 4), -1, dtype=np.int32)))
    assert issubclass(IntervalInputError, ConformalSegError)


def test_impossible_settings_give_the_trivial_result_and_a_warning(pool: IntervalData) -> None:
    """One convention across CRC (lesion), crc-interval and sem-CRC: too few scans for epsilon, or epsilon = 0,
    give the trivial result (lambda = +inf, status uncontrollable) and a warning that says why."""
    rest = {k: v for k, v in SHARED.items() if k != "n_opt"}
    cases = [
        (lambda: calibrate_crc_interval(pool.subset(range(5)), EPS), r"only 5 calibration scan\(s\), at least 9"),
        (lambda: calibrate_semcrc(pool.subset(range(12)), EPS, n_opt=6, **rest), r"only 6 .* at least 9"),
        (lambda: calibrate_kcrc(pool.subset(range(12)), EPS, n_opt=6, **rest), r"only 6 .* at least 9"),
        (lambda: calibrate_crc_interval(pool.subset(range(20)), 0.0), "needs epsilon > 0"),
        (lambda: calibrate_semcrc(pool.subset(range(40)), 0.0, **SHARED), "needs epsilon > 0"),
        (lambda: calibrate_semcrc_organ(pool.subset(range(40)), 0.0, **SHARED), "needs epsilon > 0"),
    ]
    for run, message in cases:
        with pytest.warns(UncontrollableRiskWarning, match=message):
            calib = run()
        assert np.all(np.isinf(calib.lam)) and set(calib.status) == {"uncontrollable"}
        assert issubclass(UncontrollableRiskWarning, CalibrationSetTooSmallWarning)  # the CLS / CRC warning


def test_bad_calibration_arguments_are_clear_errors(pool: IntervalData) -> None:
    with pytest.raises(IntervalCalibrationError, match="n_opt"):
        calibrate_kcrc(pool.subset(range(20)), EPS, n_opt=20)
    with pytest.raises(ConformalSegError, match="epsilon"):
        calibrate_crc_interval(pool.subset(range(20)), float("nan"))
    with pytest.raises(IntervalCalibrationError, match="unknown interval method"):
        calibrate_interval_method("foo", pool, EPS)


def test_empty_and_rare_organs_get_a_status_and_a_warning(pool: IntervalData) -> None:
    # drop the pancreas from every scan but 3 (relabel to body), and add an organ that never occurs
    groups = pool.groups[:-1] + ("adrenal", "body")
    pancreas, body = pool.groups.index("pancreas"), pool.n_groups - 1
    scans, with_pancreas = [], 0
    for s in pool.scans[:80]:
        g = s.group.copy()
        if (g == pancreas).any():
            with_pancreas += 1
            if with_pancreas > 3:
                g[g == pancreas] = body
        g[g == body] = len(groups) - 1
        scans.append(type(s)(s.shape, s.index, s.need, s.width, g, s.case_id))
    data = IntervalData(scans, groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = calibrate_semcrc_organ(data, EPS, seed=0, **SHARED)
    status = dict(zip(calib.groups, calib.status))
    assert status["adrenal"] == "no-calibration-data" and calib.lam[groups.index("adrenal")] == INF
    # at most 3 calibration scans contain the pancreas: n_k < 1/eps - 1 = 9, no finite lambda is valid
    assert int(calib.n_cal[pancreas]) <= 3
    assert status["pancreas"] == "uncontrollable" and calib.lam[pancreas] == INF
    assert status["liver"] == "controlled" and math.isfinite(calib.lam[0])
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, UncontrollableRiskWarning))
    assert "adrenal" in messages and "pancreas" in messages


def test_lambda_max_too_small_is_reported(pool: IntervalData) -> None:
    with pytest.warns(UncontrollableRiskWarning, match="lambda_max"):
        calib = calibrate_crc_interval(pool.subset(range(60)), EPS, lambda_max=1e-4)
    assert calib.status == ("uncontrollable",) and calib.lam[0] == INF
    assert not calib.controlled


def test_kcrc_partition_orders_groups_by_loss(pool: IntervalData) -> None:
    opt = pool.subset(range(30))
    partition, k = loss_quantile_partition(opt, 4)
    misses = np.zeros(partition.size)
    for s in opt.scans:
        misses[s.index] += s.need > 0
    groups_max = [misses[partition == j].max() for j in range(k) if (partition == j).any()]
    groups_min = [misses[partition == j].min() for j in range(k) if (partition == j).any()]
    assert all(hi <= lo for hi, lo in zip(groups_max[:-1], groups_min[1:]))
    assert 2 <= k <= 4


def test_memberships_from_label_map() -> None:
    labels = np.array([[[0, 1, 2, 5, 3]]], dtype=np.int16)
    organs = OrganMap.parse("1=liver,2=kidney,3=kidney")
    assert organs.groups == ("liver", "kidney", "body")
    assert organ_memberships(labels, organs, "all").tolist() == [[[2, 0, 1, 2, 1]]]
    assert organ_memberships(labels, organs, "nonzero").tolist() == [[[-1, 0, 1, 2, 1]]]
    mask = np.array([[[True, True, False, False, False]]])
    assert organ_memberships(labels, organs, mask).tolist() == [[[2, 0, 1, -1, 1]]]
    with pytest.raises(IntervalInputError, match="VALUE=NAME"):
        OrganMap.parse("liver")
    with pytest.raises(IntervalInputError, match="reserved"):
        OrganMap({1: "body"})


def test_mc_dropout_intervals() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(20, 2, 3, 4))
    lo, hi = mc_dropout_intervals(samples, lower_level=0.05, upper_level=0.95, chunk_voxels=5)
    np.testing.assert_allclose(lo, np.quantile(samples, 0.05, axis=0), rtol=1e-6)
    np.testing.assert_allclose(hi, np.quantile(samples, 0.95, axis=0), rtol=1e-6)
    assert np.all(lo <= hi)
    with pytest.raises(IntervalInputError, match="at least 2"):
        mc_dropout_intervals(samples[:1])
    samples[3, 0, 0, 0] = np.nan
    with pytest.raises(IntervalInputError, match="NaN"):
        mc_dropout_intervals(samples)


def test_seeded_calibration_is_reproducible(pool: IntervalData) -> None:
    data = pool.subset(range(60))
    a = calibrate_kcrc(data, EPS, seed=4, **SHARED)
    b = calibrate_kcrc(data, EPS, seed=4, **SHARED)
    np.testing.assert_array_equal(a.lam, b.lam)
    np.testing.assert_array_equal(a.partition, b.partition)


@pytest.mark.parametrize("method", ["crc", "k-crc", "sem-crc", "sem-crc-organ"])
def test_recalibration_from_the_record_is_bit_identical(pool: IntervalData, method: str, tmp_path) -> None:
    """A profile stores per-scan coverage thresholds (and the anchor sample): a new epsilon from them equals
    calibrating from scratch on the volumes, bit for bit, also after a save / load round trip."""
    from ConformalSegLib.semcrc.memberships import OrganMap
    from ConformalSegLib.semcrc.profile import IntervalProfile, load_interval_profile
    from ConformalSegLib.semcrc.recalibrate import interval_record

    data = pool.subset(range(60))
    options = {} if method == "crc" else dict(SHARED, seed=4)
    first = calibrate_interval_method(method, data, EPS, **options)
    organs = OrganMap({i + 1: g for i, g in enumerate(data.groups[:-1])})
    profile = IntervalProfile(first, organs, "all", {}, interval_record(first, data, **options))
    profile.save(tmp_path / "p.json")
    loaded = load_interval_profile(tmp_path / "p.json")
    for eps in (EPS, 0.2, 0.05):
        scratch = calibrate_interval_method(method, data, eps, **options)
        for again in (profile.recalibrate(eps).calibration, loaded.recalibrate(eps).calibration):
            for key in ("lam", "anchor", "omega", "n_cal"):
                assert np.array_equal(getattr(again, key), getattr(scratch, key)), (eps, key)
            assert again.status == scratch.status and again.gamma == scratch.gamma and again.epsilon == eps


def test_shrinkable_crc_tightens_an_under_confident_model_and_stays_valid(pool: IntervalData) -> None:
    """Intervals widened by 0.15 on each side (raw risk far below epsilon): the non-negative family keeps
    lambda = 0 and a tiny risk; the shrinkable family (lambda down to minus the half-width) tightens them to
    a risk close to epsilon, still <= epsilon on average over 60 random splits (CRC tolerance)."""
    from ConformalSegLib.semcrc.shrinkable import calibrate_crc_interval_shrinkable, voxel_lambdas

    wide = IntervalData(
        [type(s)(s.shape, s.index, s.need - 0.15, s.width + 0.3, s.group, s.case_id) for s in pool.scans], pool.groups
    )
    rng = np.random.default_rng(5)
    risks, plain, lams = [], [], []
    for _ in range(60):
        perm = rng.permutation(wide.n)
        cal, test = wide.subset(perm[:60]), wide.subset(perm[60:])
        calib = calibrate_crc_interval_shrinkable(cal, EPS)
        lams.append(calib.lam[0])
        risks.append(np.mean([np.count_nonzero(s.need > voxel_lambdas(calib, s)) / s.d for s in test.scans]))
        lam_plain = calibrate_crc_interval(cal, EPS).lam[0]
        plain.append(np.mean([scan_loss(s.need, lam_plain) for s in test.scans]))
    risks_arr = np.asarray(risks)
    assert within_tolerance(risks_arr, EPS) and risks_arr.mean() > EPS - 0.03
    assert np.mean(plain) < 0.5 * EPS and max(lams) < 0
    # the clamp: no interval is ever inverted, a negative lambda shrinks at most to the midpoint
    scan = test.scans[0]
    assert np.all(voxel_lambdas(calib, scan) >= -0.5 * scan.width)


def test_shrinkable_profile_round_trip_and_recalibration(pool: IntervalData, tmp_path) -> None:
    from ConformalSegLib.semcrc.memberships import OrganMap
    from ConformalSegLib.semcrc.profile import IntervalProfile, load_interval_profile
    from ConformalSegLib.semcrc.recalibrate import interval_record
    from ConformalSegLib.semcrc.shrinkable import calibrate_crc_interval_shrinkable

    wide = IntervalData(
        [type(s)(s.shape, s.index, s.need - 0.15, s.width + 0.3, s.group, s.case_id) for s in pool.scans[:60]],
        pool.groups,
    )
    calib = calibrate_crc_interval_shrinkable(wide, EPS)
    organs = OrganMap({i + 1: g for i, g in enumerate(pool.groups[:-1])})
    IntervalProfile(calib, organs, "all", {}, interval_record(calib, wide)).save(tmp_path / "s.json")
    loaded = load_interval_profile(tmp_path / "s.json")
    assert loaded.calibration.lam[0] == calib.lam[0] < 0 and loaded.calibration.shrink_floor == calib.shrink_floor
    for eps in (0.05, 0.2):
        assert loaded.recalibrate(eps).calibration.lam[0] == calibrate_crc_interval_shrinkable(wide, eps).lam[0]


def test_shrinkable_per_organ_semcrc_is_valid_for_every_organ(pool: IntervalData) -> None:
    """Per-organ sem-CRC with ``shrinkable=True`` on the widened (under-confident) pool: every organ's mean risk
    within the CRC tolerance of epsilon and closer to it than the non-negative default, lambdas below 0."""
    wide = IntervalData(
        [type(s)(s.shape, s.index, s.need - 0.15, s.width + 0.3, s.group, s.case_id) for s in pool.scans], pool.groups
    )
    shrunk = trial_risks(wide, "sem-crc-organ", 20, EPS, shrinkable=True, **SHARED)
    plain = trial_risks(wide, "sem-crc-organ", 20, EPS, **SHARED)
    assert within_tolerance(shrunk, EPS).all(), shrunk.mean(axis=0)
    assert (shrunk.mean(axis=0) > plain.mean(axis=0)).all() and (shrunk.mean(axis=0) > EPS - 0.06).all()
    calib = calibrate_semcrc_organ(wide.subset(range(80)), EPS, shrinkable=True, seed=1, **SHARED)
    assert calib.controlled and (calib.lam < 0).any() and calib.shrink_floor is not None
    assert np.all(calib.lam >= calib.shrink_floor)
