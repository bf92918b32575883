"""The statistical guarantees, tested as statistics over many independent calibration/test draws.

Every trial uses a fresh calibration set and ONE fresh test case, all i.i.d. and disjoint from every other
trial's, so the number of successes over T trials is a sum of T independent Bernoulli(p_t).

Lower test (validity). Every method promises p_t >= 1 - alpha, so the success count stochastically
dominates Binomial(T, 1 - alpha); we assert ``successes >= binom.ppf(0.001, T, 1 - alpha)``, a one-sided
test at level 0.001.

Upper test (not absurdly conservative). With the conformal rank k = ceil((1 - alpha)(n + 1)), success
means "the test score is within the k smallest of the n + 1 exchangeable scores" (CLS: c_test >= the
k-th largest calibration cutoff; sets: tau_test / gamma_test / max(tau, gamma)_test <= the k-th smallest).
When the scores are almost surely distinct the rank of the test score is uniform on 1..n+1, so the
success probability is *exactly* k / (n + 1) (the textbook bound k/(n+1) + 1/(n+1) is the tie-free
upper bound for a randomised rank; we can be sharper because we know where our ties are):

* CLS "include": lesion-free cases have c = +inf. Let E ~ Binomial(n + 1, 0.1) count them among the
  n + 1 cases; given E the success probability is max(k, E) / (n + 1) (an empty test case always
  succeeds; if E >= k the threshold is +inf and a non-empty test case fails; otherwise the finite test
  cutoff must be among the k - E largest of the n + 1 - E finite ones). So p = E[max(k, E)] / (n + 1).
* CLS "exclude": n_t = the number of calibration cases with a lesion varies between trials and the test
  case has a lesion, so p_t = k_t / (n_t + 1) (= 1 when the set is too small and c_hat = -inf).
* Remaining ties (float32 collisions, uint16 codes that lower c_hat by < 1/65535, the few lesion-free
  volumes with gamma = -inf, the inner set being intersected with the outer one) change p by far less
  than the slack 0.005 we add.

We assert ``successes <= binom.isf(0.001, T, mean_t p_t + 0.005)``. For varying p_t the count is
Poisson-binomial; by Hoeffding (1956, Thm. 4) its upper tail beyond mean + 1 is at most that of
Binomial(T, mean p_t), so this stays a level-0.001 test. For joint-split sets the joint success is at
most the smaller marginal one. The signed-distance transform produces massive ties (distances take few
values), so it gets the lower test only.

Expected-FNR control (CRC). The T test FNRs are i.i.d. in [0, 1] (one per independent trial), so by the
CLT their mean is approximately N(E[FNR], sigma^2 / T); with the sample standard deviation s and
z = Phi^{-1}(1 - 0.001) = 3.09 the tolerance is ``tol = z * s / sqrt(T)`` (one-sided, level 0.001 each
side; for T >= 500 and bounded losses the normal approximation is accurate; a rigorous but looser
alternative would be Hoeffding's sqrt(ln(1/0.001) / (2T))). We assert
``mean <= eps + tol`` (the guarantee E[FNR] <= eps) and, as a sanity check against over-conservative
thresholds, ``mean >= eps - (1 + J) / (n + 1) - tol`` with J = 2 / 20: CRC's c_hat is at least the
symmetric oracle c_low = max{c : sum over all n + 1 cases of FNR_i(c) <= (n + 1) eps - 1}, whose
FNR sum exceeds (n + 1) eps - 1 - J (J: the jump of that sum at c_low, one or at most a couple of voxels
of lesions with >= 20 voxels), so by exchangeability E[FNR_test] >= eps - (1 + J) / (n + 1).

All randomness is seeded; the whole file runs in well under 40 s.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, special
from scipy.stats import binom, norm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal.cls import apply_threshold, calibrate_cls  # noqa: E402
from ConformalSegLib.conformal.confidence_sets import SetStatistics, apply_sets, calibrate_sets, case_statistics  # noqa: E402
from ConformalSegLib.conformal.crc import calibrate_crc  # noqa: E402
from ConformalSegLib.conformal.score_transforms import parse_transform  # noqa: E402
from ConformalSegLib.conformal.summaries import LesionSummaries  # noqa: E402

LEVEL = 0.001
EMPTY_FRAC = 0.1


def brute_rank(n: int, alpha: float) -> int:
    target = (1 - Fraction(repr(alpha))) * (n + 1)
    k = 0
    while Fraction(k) < target:
        k += 1
    return k


SLACK = 0.005


def assert_binomial(successes: int, T: int, alpha: float, p_exact: float | None, label: str) -> None:
    """Lower test against 1 - alpha; upper test against the exact tie-free coverage p_exact (+ SLACK)."""
    lower = binom.ppf(LEVEL, T, 1 - alpha)
    assert successes >= lower, f"{label}: {successes}/{T} successes < {lower} (coverage below 1 - alpha = {1 - alpha})"
    if p_exact is not None and p_exact + SLACK < 1:
        upper = binom.isf(LEVEL, T, p_exact + SLACK)
        assert successes <= upper, f"{label}: {successes}/{T} successes > {upper} (too conservative, p = {p_exact})"


def include_coverage(n: int, k: int, q: float = EMPTY_FRAC) -> float:
    """E[max(k, E)] / (n + 1) with E ~ Binomial(n + 1, q) (see module docstring)."""
    e = np.arange(n + 2)
    return float(np.sum(binom.pmf(e, n + 1, q) * np.maximum(k, e)) / (n + 1))


def clt_tolerance(x: np.ndarray) -> float:
    return float(norm.isf(LEVEL) * x.std(ddof=1) / math.sqrt(x.size))


# ----------------------------------------------------------------------------- cheap lesion-value cases


class Pool:
    """i.i.d. cases as CSR arrays: per case a lesion size in [20, 400] (0 for a lesion-free case) and
    lesion probabilities from a per-case Beta(a, b), a in [0.5, 6], b in [0.5, 4] (FNR at 0.5 ranges from
    about 0.03 to 0.9), stored descending in float32 (the precision of real maps)."""

    def __init__(self, seed: int, n_cases: int, empty_frac: float):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(20, 401, n_cases)
        sizes[rng.random(n_cases) < empty_frac] = 0
        a = rng.uniform(0.5, 6.0, n_cases)
        b = rng.uniform(0.5, 4.0, n_cases)
        raw = rng.beta(np.repeat(a, sizes), np.repeat(b, sizes)).astype(np.float32)
        self.offsets = np.zeros(n_cases + 1, np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.values = np.empty_like(raw)
        for i in range(n_cases):
            s, e = self.offsets[i], self.offsets[i + 1]
            self.values[s:e] = np.sort(raw[s:e])[::-1]
        self.sizes = sizes
        self.ids = tuple(f"c{i}" for i in range(n_cases))

    def summaries(self, start: int, n: int) -> LesionSummaries:
        off = self.offsets[start : start + n + 1]
        return LesionSummaries(self.values[off[0] : off[-1]], off - off[0], self.ids[start : start + n], "float32")

    def case(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


@cache
def uint16_summaries(pool_key: str) -> LesionSummaries:
    pool = POOLS(pool_key)[0]
    return LesionSummaries.from_sorted(((pool.ids[i], pool.case(i)) for i in range(len(pool.ids))), "uint16")


def uint16_window(full: LesionSummaries, start: int, n: int) -> LesionSummaries:
    off = full.offsets[start : start + n + 1]
    return LesionSummaries(full.values[off[0] : off[-1]], off - off[0], full.case_ids[start : start + n], "uint16")


# pools: key -> (calibration pool, test pool of lesion cases, include-mode "test case is empty" flags, n, T)
CONFIG = {"n20": (20, 1000, 11), "n100": (100, 500, 12)}


@cache
def POOLS(key: str):
    n, T, seed = CONFIG[key]
    cal = Pool(seed, n * T, EMPTY_FRAC)
    test = Pool(seed + 1000, T, 0.0)
    test_empty = np.random.default_rng(seed + 2000).random(T) < EMPTY_FRAC
    return cal, test, test_empty, n, T


def fnr_counts(values: np.ndarray, cutoff: float) -> tuple[int, int]:
    """Misses and lesion size of the mask prob >= cutoff (exact float64 comparison)."""
    return int(np.count_nonzero(values.astype(np.float64) < cutoff)), values.size


def fnr_within(misses: int, m: int, eps: float) -> bool:
    return m == 0 or Fraction(misses, m) <= Fraction(repr(eps))


def run_cls(key: str, eps: float, alpha: float, empty: str, precision: str = "float32"):
    cal, test, test_empty, n, T = POOLS(key)
    full16 = uint16_summaries(key) if precision == "uint16" else None
    successes = 0
    p_up = []
    for t in range(T):
        summ = cal.summaries(t * n, n) if full16 is None else uint16_window(full16, t * n, n)
        res = calibrate_cls(summ, eps, alpha, empty=empty)
        n_t = n if empty == "include" else int(np.count_nonzero(cal.sizes[t * n : (t + 1) * n]))
        k_t = brute_rank(n_t, alpha)
        assert res.n == n_t and res.rank == k_t
        p_up.append(include_coverage(n, k_t) if empty == "include" else k_t / (n_t + 1))
        if empty == "include" and test_empty[t]:
            successes += 1  # a lesion-free test case has FNR 0
            continue
        successes += fnr_within(*fnr_counts(test.case(t), res.probability_threshold), eps)
    return successes, T, float(np.mean(p_up))


@pytest.mark.parametrize(
    "key, eps, alpha",
    [
        ("n20", 0.1, 0.1),
        ("n20", 0.2, 0.2),
        ("n20", 0.05, 0.15),
        ("n20", 0.3, 0.1),
        ("n100", 0.1, 0.1),
        ("n100", 0.2, 0.05),
        ("n100", 0.3, 0.2),
    ],
)
@pytest.mark.parametrize("empty", ["exclude", "include"])
@pytest.mark.filterwarnings(
    "ignore::ConformalSegLib.common.errors.CalibrationSetTooSmallWarning"
)  # n_t < 19 for alpha 0.05
def test_cls_high_probability_fnr_control(key, eps, alpha, empty):
    """P(FNR_test <= eps) >= 1 - alpha (conditional on a lesion for 'exclude', marginal for 'include')."""
    successes, T, p_up = run_cls(key, eps, alpha, empty)
    assert_binomial(successes, T, alpha, p_up, f"CLS {key} eps={eps} alpha={alpha} {empty}")


@pytest.mark.parametrize("key, eps, alpha", [("n20", 0.1, 0.1), ("n100", 0.2, 0.1)])
def test_cls_uint16_summaries(key, eps, alpha):
    successes, T, p_up = run_cls(key, eps, alpha, "exclude", "uint16")
    assert_binomial(successes, T, alpha, p_up, f"CLS uint16 {key} eps={eps} alpha={alpha}")


def test_cls_mask_from_apply_threshold_gives_same_outcome():
    """On a handful of trials, the success computed from real float32 'maps' via apply_threshold agrees
    with the count-based one (guards the >= convention end to end)."""
    cal, test, _, n, _ = POOLS("n20")
    for t in range(30):
        res = calibrate_cls(cal.summaries(t * n, n), 0.1, 0.1)
        v = test.case(t)
        mask = apply_threshold(v, res.probability_threshold)  # the lesion voxels are the whole 'map'
        misses, m = fnr_counts(v, res.probability_threshold)
        assert m - int(mask.sum()) == misses


def run_crc(key: str, eps: float, empty: str):
    cal, test, test_empty, n, T = POOLS(key)
    fnrs = np.zeros(T)
    lower_terms = []
    for t in range(T):
        res = calibrate_crc(cal.summaries(t * n, n), eps, empty=empty)
        n_t = n if empty == "include" else int(np.count_nonzero(cal.sizes[t * n : (t + 1) * n]))
        assert res.n == n_t
        lower_terms.append(eps - (1 + 2 / 20) / (n_t + 1))
        if empty == "include" and test_empty[t]:
            continue  # FNR 0
        misses, m = fnr_counts(test.case(t), res.probability_threshold)
        fnrs[t] = misses / m
    return fnrs, float(np.mean(lower_terms))


@pytest.mark.parametrize("key, eps", [("n20", 0.1), ("n20", 0.25), ("n100", 0.1), ("n100", 0.2)])
@pytest.mark.parametrize("empty", ["exclude", "include"])
def test_crc_expected_fnr_control(key, eps, empty):
    fnrs, lower = run_crc(key, eps, empty)
    tol = clt_tolerance(fnrs)
    mean = float(fnrs.mean())
    assert mean <= eps + tol, f"CRC {key} eps={eps} {empty}: mean FNR {mean:.4f} > {eps} + {tol:.4f}"
    assert mean >= lower - tol, f"CRC {key} eps={eps} {empty}: mean FNR {mean:.4f} < {lower:.4f} - {tol:.4f}"


# ----------------------------------------------------------------------------- confidence sets on small volumes


SET_GEOM = Geometry((12, 12, 12), spacing=(1.0, 1.0, 2.0))  # numpy (z, y, x) spacing (2, 1, 1)
SET_POOL = 6000  # i.i.d. volumes; a trial with n calibration cases uses n + 1 consecutive ones
TRANSFORMS = ("identity", "distance", "gaussian:1.5")
CONTINUOUS = ("identity", "gaussian:1.5")


def _smooth(rng, sigma_mm):
    f = ndimage.gaussian_filter(
        rng.standard_normal(SET_GEOM.shape), [sigma_mm / s for s in SET_GEOM.spacing_zyx], mode="reflect"
    )
    return f / f.std()


def volume_case(rng):
    """Lesion = thresholded (smoothed noise + central bump), rarely empty; probability =
    sigmoid(scale * (signed distance to the true boundary (mm, clipped to +-6) + shift + smooth noise))."""
    zyx = np.indices(SET_GEOM.shape) * np.asarray(SET_GEOM.spacing_zyx)[:, None, None, None]
    centre = np.asarray(SET_GEOM.shape) * np.asarray(SET_GEOM.spacing_zyx) / 2
    r2 = ((zyx - centre[:, None, None, None]) ** 2).sum(0)
    field = _smooth(rng, 2.0) + 2.0 * np.exp(-r2 / (2 * 4.0**2))
    lesion = field > rng.uniform(1.0, 2.6)
    sampling = SET_GEOM.spacing_zyx
    if lesion.any():
        sd = np.where(
            lesion,
            ndimage.distance_transform_edt(lesion, sampling=sampling),
            -ndimage.distance_transform_edt(~lesion, sampling=sampling),
        )
    else:
        sd = np.full(SET_GEOM.shape, -6.0)
    sd = np.clip(sd, -6.0, 6.0)
    logit = rng.uniform(0.6, 1.5) * (sd + rng.uniform(-1.5, 0.5) + rng.uniform(0.3, 1.2) * _smooth(rng, 1.5))
    return special.expit(logit).astype(np.float32), lesion


@cache
def set_pool():
    """SET_POOL volumes: (probability, lesion) and per-case (tau, gamma) for every transform."""
    rng = np.random.default_rng(2024)
    transforms = {name: parse_transform(name) for name in TRANSFORMS}
    stats = {name: np.zeros((SET_POOL, 2)) for name in TRANSFORMS}
    sizes = np.zeros(SET_POOL, np.int64)
    cases = []
    for i in range(SET_POOL):
        prob, lesion = volume_case(rng)
        cases.append((prob, lesion))
        sizes[i] = lesion.sum()
        for name, t in transforms.items():
            stats[name][i] = case_statistics(prob, lesion, SET_GEOM, t, t)
    return stats, sizes, cases


@cache
def set_outcomes(
    name: str, n: int, mode: str, alpha: float | None, alpha_inner: float | None, alpha_outer: float | None
):
    """Counts of (inner inside the lesion, lesion inside outer, both) over T = SET_POOL // (n + 1) trials:
    trial t calibrates on cases [t(n+1), t(n+1)+n) and tests on case t(n+1)+n."""
    stats, sizes, cases = set_pool()
    T = SET_POOL // (n + 1)
    ids = tuple(f"c{i}" for i in range(n))
    inner_ok = outer_ok = joint_ok = 0
    for t in range(T):
        s = slice(t * (n + 1), t * (n + 1) + n)
        window = SetStatistics(stats[name][s, 0].copy(), stats[name][s, 1].copy(), ids, name, name, sizes[s].copy())
        cal = calibrate_sets(window, alpha=alpha, alpha_inner=alpha_inner, alpha_outer=alpha_outer, mode=mode)
        prob, lesion = cases[t * (n + 1) + n]
        inner, outer = apply_sets(prob, SET_GEOM, cal)
        i_ok = not np.any(inner & ~lesion)
        o_ok = not np.any(lesion & ~outer)
        inner_ok += i_ok
        outer_ok += o_ok
        joint_ok += i_ok and o_ok
    return inner_ok, outer_ok, joint_ok, T


def test_set_pool_is_nontrivial():
    """The synthetic volumes exercise the method: lesions of varied size (a few empty), imperfect maps."""
    _, sizes, cases = set_pool()
    assert 1 <= np.count_nonzero(sizes == 0) < 0.15 * sizes.size
    assert np.median(sizes[sizes > 0]) > 20
    dice = []
    for prob, lesion in cases[:500]:
        if lesion.any():
            pred = prob >= 0.5
            dice.append(2 * np.sum(pred & lesion) / (pred.sum() + lesion.sum()))
    assert 0.4 < np.mean(dice) < 0.95 and np.percentile(dice, 5) < 0.75


def exact(n: int, alpha: float, name: str) -> float | None:
    """Tie-free coverage k / (n + 1) for the continuous transforms (None: lower test only)."""
    return brute_rank(n, alpha) / (n + 1) if name in CONTINUOUS else None


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n", [9, 19])
def test_marginal_inner_and_outer_containment(name, n):
    alpha = 0.1
    inner_ok, outer_ok, _, T = set_outcomes(name, n, "marginal", alpha, None, None)
    assert_binomial(inner_ok, T, alpha, exact(n, alpha, name), f"inner {name} n={n}")
    assert_binomial(outer_ok, T, alpha, exact(n, alpha, name), f"outer {name} n={n}")


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n, a_in, a_out", [(19, 0.1, 0.1), (19, 0.05, 0.15), (9, 0.1, 0.1)])
def test_joint_split_containment(name, n, a_in, a_out):
    alpha = 0.2
    inner_ok, outer_ok, joint_ok, T = set_outcomes(name, n, "joint-split", alpha, a_in, a_out)
    # the joint success is at most the smaller marginal success probability
    p_joint = min(exact(n, a_in, name), exact(n, a_out, name)) if name in CONTINUOUS else None
    assert_binomial(joint_ok, T, alpha, p_joint, f"joint-split {name} n={n} {a_in}+{a_out}")
    assert_binomial(inner_ok, T, a_in, exact(n, a_in, name), f"split inner {name} n={n}")
    assert_binomial(outer_ok, T, a_out, exact(n, a_out, name), f"split outer {name} n={n}")


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n", [9, 19])
def test_joint_max_containment(name, n):
    alpha = 0.1
    _, _, joint_ok, T = set_outcomes(name, n, "joint-max", alpha, None, None)
    assert_binomial(joint_ok, T, alpha, exact(n, alpha, name), f"joint-max {name} n={n}")
