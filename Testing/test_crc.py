"""Expected-FNR control (ConformalSegLib.conformal.crc) against an exact Fraction brute force over every
candidate cutoff."""

from __future__ import annotations

import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError  # noqa: E402
from ConformalSegLib.conformal.crc import calibrate_crc, crc_budget, crc_cutoff, min_crc_calibration_size  # noqa: E402
from ConformalSegLib.conformal.guarantee_sentences import guarantee_sentence
from ConformalSegLib.conformal.summaries import LesionSummaries  # noqa: E402

INF = float("inf")


def frac(x: float) -> Fraction:
    return Fraction(repr(float(x)))


def brute_crc(cases: list[np.ndarray], epsilon: float) -> float:
    """Largest c among {distinct lesion values} U {+inf} with n/(n+1) * mean_i FNR_i(c) + 1/(n+1) <= eps
    (all exact), -inf if none. ``cases`` are the (decoded, float64) lesion values; empty arrays are
    lesion-free cases (FNR 0) and count in n."""
    n = len(cases)
    eps = frac(epsilon)
    candidates = sorted({float(x) for v in cases for x in v} | {INF}, reverse=True)
    for c in candidates:
        total = sum((Fraction(int(np.count_nonzero(v < c)), v.size) for v in cases if v.size), Fraction(0))
        mean = total / n
        if Fraction(n, n + 1) * mean + Fraction(1, n + 1) <= eps:
            return c
    return -INF


def summaries_from(cases: list[np.ndarray], precision: str = "float32") -> LesionSummaries:
    return LesionSummaries.from_sorted([(f"c{i}", np.sort(v)[::-1]) for i, v in enumerate(cases)], precision)


def decoded(summ: LesionSummaries) -> list[np.ndarray]:
    return [summ.case(i) for i in range(summ.n)]


def random_cases(rng, n, *, ties=None, empty_frac=0.0, max_m=40):
    out = []
    for _ in range(n):
        m = 0 if rng.random() < empty_frac else int(rng.integers(1, max_m))
        if ties:
            v = rng.integers(0, ties + 1, m) / ties
        else:
            v = rng.beta(rng.uniform(0.3, 3), rng.uniform(0.3, 3), m)
        out.append(v.astype(np.float32))
    return out


EPS = [0.05, 0.1, 0.15, 0.2, 0.29, 0.3, 1 / 3, 0.5, 0.7, 0.9, 1.0]


@pytest.mark.parametrize("ties", [None, 5, 1])
@pytest.mark.parametrize("n", [1, 3, 9, 10, 19, 40])
def test_crc_cutoff_matches_brute_force(n, ties):
    rng = np.random.default_rng(100 + n + (ties or 0))
    cases = random_cases(rng, n, ties=ties, empty_frac=0.15)
    summ = summaries_from(cases)
    for eps in EPS:
        assert crc_cutoff(summ, eps) == brute_crc(decoded(summ), eps), eps


def test_crc_cutoff_uint16_matches_brute_force_on_decoded_values():
    rng = np.random.default_rng(5)
    cases = random_cases(rng, 30, empty_frac=0.1)
    s16 = summaries_from(cases, "uint16")
    s32 = summaries_from(cases)
    for eps in EPS:
        c16 = crc_cutoff(s16, eps)
        assert c16 == brute_crc(decoded(s16), eps)
        assert c16 <= crc_cutoff(s32, eps)  # conservative


def test_exact_sum_at_the_budget_float_trap():
    """n = 9 lesion cases of 10 voxels, eps = 0.13: budget = 10 * 0.13 - 1 = 0.3 exactly. At c = 0.9 three
    cases miss one voxel each: FNR sum 3/10 = budget (feasible), although 0.1 + 0.1 + 0.1 > 0.3 in floats."""
    cases = []
    for i in range(9):
        v = np.full(10, 0.9, np.float32)
        if i < 3:
            v[0] = np.float32(0.2 + 0.01 * i)
        cases.append(v)
    summ = summaries_from(cases)
    assert crc_budget(9, 0.13) == Fraction(3, 10)
    assert 0.1 + 0.1 + 0.1 > 0.3
    assert crc_cutoff(summ, 0.13) == float(np.float32(0.9)) == brute_crc(decoded(summ), 0.13)
    # one more missed voxel makes 0.9 infeasible
    cases[3][0] = np.float32(0.25)
    summ = summaries_from(cases)
    assert crc_cutoff(summ, 0.13) == brute_crc(decoded(summ), 0.13) == float(np.float32(0.25))


def test_exact_sum_thirds():
    """m = 3 weights (1/3 is inexact): budget 1 reached exactly by three misses of 1/3."""
    cases = [np.array([0.8, 0.8, 0.1 + 0.1 * i], np.float32) for i in range(3)] + [np.full(3, 0.8, np.float32)] * 5
    n = len(cases)  # 8; eps = 2/9 -> budget = 9 * 2/9 - 1 = 1 (but eps is read as 0.2222222222222222)
    for eps in [0.23, 0.22, 2 / 9, 0.25]:
        summ = summaries_from(cases)
        assert crc_cutoff(summ, eps) == brute_crc(decoded(summ), eps), (eps, n)


def test_too_small_gives_minus_inf_and_warning():
    rng = np.random.default_rng(6)
    summ = summaries_from(random_cases(rng, 5))
    assert crc_cutoff(summ, 0.1) == -INF  # budget = 6 * 0.1 - 1 < 0
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b9\b"):
        res = calibrate_crc(summ, 0.1)
    assert res.probability_threshold == -INF and res.is_trivial and res.alpha is None and res.method == "crc"
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b19\b"):
        calibrate_crc(summ, 0.05)


def test_smallest_valid_n_gives_finite_cutoff_without_warning():
    rng = np.random.default_rng(7)
    cases = random_cases(rng, 9)
    summ = summaries_from(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = calibrate_crc(summ, 0.1)  # budget = 0: no miss allowed at all
    assert res.probability_threshold == min(float(v.min()) for v in cases) == brute_crc(decoded(summ), 0.1)


@pytest.mark.parametrize(
    "eps, expected",
    [
        (0.1, 9),
        (0.05, 19),
        (0.2, 4),
        (0.3, 3),
        (0.5, 1),
        (1.0, 0),
        (0.29, 3),
        (0.7, 1),
        (1 / 3, 3),
        (0.01, 99),
        (0.25, 3),
    ],
)
def test_min_crc_calibration_size(eps, expected):
    n = min_crc_calibration_size(eps)
    assert n == expected
    assert crc_budget(n, eps) >= 0 and (n == 0 or crc_budget(n - 1, eps) < 0)


def test_epsilon_zero_and_invalid():
    summ = summaries_from([np.array([0.5], np.float32)] * 3)
    with pytest.raises(ConformalSegError):
        min_crc_calibration_size(0.0)
    # one convention for impossible settings (as the evaluation): the trivial set and a warning
    with pytest.warns(CalibrationSetTooSmallWarning, match="needs epsilon > 0"):
        zero = calibrate_crc(summ, 0.0)
    assert zero.probability_threshold == float("-inf") and zero.is_trivial
    assert "needs epsilon > 0" in guarantee_sentence(zero)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConformalSegError):
            calibrate_crc(summ, bad)
    with pytest.raises(ConformalSegError):
        calibrate_crc(summ, 0.1, empty="bogus")


def test_everything_allowed_gives_plus_inf():
    rng = np.random.default_rng(8)
    cases = random_cases(rng, 6)
    summ = summaries_from(cases)
    assert crc_cutoff(summ, 1.0) == INF  # budget = n >= n_lesion
    # include policy: 3 lesion cases out of 10, eps = 0.4 -> budget = 11 * 0.4 - 1 = 3.4 >= 3
    cases = random_cases(rng, 3) + [np.zeros(0, np.float32)] * 7
    summ = summaries_from(cases)
    res = calibrate_crc(summ, 0.4, empty="include")
    assert res.probability_threshold == INF == brute_crc(decoded(summ), 0.4)
    assert res.n == 10 and res.n_excluded_empty == 0
    res = calibrate_crc(summ, 0.4)  # exclude: n = 3, budget = 0.6 < 3
    assert res.n == 3 and res.n_excluded_empty == 7
    assert res.probability_threshold == brute_crc(cases[:3], 0.4) < INF


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.3])
def test_empty_policies(eps):
    rng = np.random.default_rng(9)
    cases = random_cases(rng, 40, empty_frac=0.2)
    summ = summaries_from(cases)
    res_in = calibrate_crc(summ, eps, empty="include")
    res_ex = calibrate_crc(summ, eps, empty="exclude")
    with_lesion = [v for v in decoded(summ) if v.size]
    assert res_in.probability_threshold == brute_crc(decoded(summ), eps)
    assert res_ex.probability_threshold == brute_crc(with_lesion, eps)
    assert res_ex.n == len(with_lesion) and res_ex.n_excluded_empty == 40 - len(with_lesion)
    assert res_in.probability_threshold >= res_ex.probability_threshold
    assert res_ex.epsilon == eps


def test_all_empty():
    summ = summaries_from([np.zeros(0, np.float32)] * 4)
    with pytest.raises(ConformalSegError):
        calibrate_crc(summ, 0.3)
    assert calibrate_crc(summ, 0.3, empty="include").probability_threshold == INF  # budget 0.5 >= 0 lesions


def test_recalibration_on_same_summaries_uses_cache_correctly():
    """The cached cumulative weights must not leak between epsilons or between subsets."""
    rng = np.random.default_rng(10)
    cases = random_cases(rng, 25, ties=7)
    summ = summaries_from(cases)
    for eps in [0.3, 0.1, 0.5, 0.1, 0.2]:
        assert crc_cutoff(summ, eps) == brute_crc(decoded(summ), eps)
    sub = summ.subset([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    for eps in [0.1, 0.2]:
        assert crc_cutoff(sub, eps) == brute_crc(decoded(sub), eps)


case_strategy = st.lists(
    st.lists(
        st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), st.floats(0, 1, width=32)),
        min_size=0,
        max_size=8,
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    cases=case_strategy,
    epsilon=st.one_of(
        st.sampled_from([0.05, 0.1, 0.13, 0.2, 0.25, 0.29, 0.3, 1 / 3, 0.5, 0.7, 1.0]), st.floats(0.01, 1)
    ),
)
def test_crc_cutoff_property(cases, epsilon):
    arrays = [np.array(v, np.float32) for v in cases]
    summ = summaries_from(arrays)
    got = crc_cutoff(summ, epsilon)
    assert got == brute_crc(decoded(summ), epsilon)


@pytest.mark.parametrize("precision", ["float32", "uint16"])
def test_count_at_least_matches_brute_force(precision):
    rng = np.random.default_rng(11)
    cases = random_cases(rng, 20, ties=6, empty_frac=0.2) + random_cases(rng, 10)
    summ = summaries_from(cases, precision)
    dec = decoded(summ)
    probes = sorted({float(x) for v in dec for x in v[:3]})
    probes += [float(np.nextafter(x, INF)) for x in probes] + [float(np.nextafter(x, -INF)) for x in probes]
    for c in probes + [-INF, INF, 0.0, 1.0, 0.5]:
        assert summ.count_at_least(c).tolist() == [int(np.count_nonzero(v >= c)) for v in dec], c


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.35])
def test_crc_cutoff_explicit_n_ignores_empty_cases(eps):
    """crc_cutoff(summaries, eps, n=number of lesion cases) on summaries that still hold the lesion-free
    cases equals the cutoff of the lesion cases alone."""
    rng = np.random.default_rng(12)
    cases = random_cases(rng, 30, empty_frac=0.3)
    summ = summaries_from(cases)
    with_lesion = [v for v in decoded(summ) if v.size]
    assert crc_cutoff(summ, eps, n=len(with_lesion)) == brute_crc(with_lesion, eps)
    assert crc_cutoff(summaries_from(with_lesion), eps) == brute_crc(with_lesion, eps)
