"""CLS (ConformalSegLib.conformal.cls) against brute forces that scan every candidate cutoff with exact integer
counts."""

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
from ConformalSegLib.conformal.cls import (  # noqa: E402
    apply_threshold,
    calibrate_cls,
    conformal_lower_cutoff,
    critical_cutoff,
    critical_cutoffs,
    round_up_to_dtype,
)
from ConformalSegLib.conformal.summaries import LesionSummaries  # noqa: E402

INF = float("inf")

# ----------------------------------------------------------------------------- brute forces


def frac(x: float) -> Fraction:
    return Fraction(repr(float(x)))


def brute_rank(n: int, alpha: float) -> int:
    target = (1 - frac(alpha)) * (n + 1)
    k = 0
    while Fraction(k) < target:
        k += 1
    return k


def fnr_ok(values64: np.ndarray, c: float, epsilon: float) -> bool:
    """Exact test of FNR(c) <= epsilon for the mask prob >= c (values already exact float64)."""
    m = values64.size
    if m == 0:
        return True
    misses = int(np.count_nonzero(values64 < c))
    return Fraction(misses, m) <= frac(epsilon)


def brute_critical(values: np.ndarray, epsilon: float) -> float:
    """Largest candidate cutoff (distinct lesion values and +inf) whose FNR is <= epsilon."""
    v = np.asarray(values).astype(np.float64)  # exact for float16/32/64
    candidates = sorted(set(v.tolist()) | {INF}, reverse=True)
    for c in candidates:
        if fnr_ok(v, c, epsilon):
            return c
    raise AssertionError("the smallest lesion value always has FNR 0")


def round_down_f32(x: float) -> float:
    f = np.float32(x)
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def brute_eq5(cutoffs, alpha: float) -> float:
    """Paper eq. 5: t_hat = inf{t : #{i : t_i <= t} / n >= k / n}, t = 1 - c.

    Evaluated on the c side without forming 1 - c: t_i <= t  <=>  c_i >= c, and the infimum over t is the
    supremum over c; the candidate c's are the cutoffs themselves, scanned from the largest down.
    """
    c = [float(x) for x in cutoffs]
    n = len(c)
    k = brute_rank(n, alpha)
    if k > n:
        return -INF
    for cand in sorted(set(c), reverse=True):
        if Fraction(sum(1 for x in c if x >= cand), n) >= Fraction(k, n):
            return cand
    raise AssertionError


def make_cases(rng, n, *, empty_every=0, tie_levels=None, dtype=np.float32, max_m=60):
    """Random (probability map, lesion) pairs as flat arrays (a 'volume' of any shape works)."""
    cases = []
    for i in range(n):
        size = 80
        if tie_levels:
            prob = (rng.integers(0, tie_levels + 1, size) / tie_levels).astype(dtype)
        else:
            prob = rng.beta(rng.uniform(0.3, 3), rng.uniform(0.3, 3), size).astype(dtype)
        m = 0 if (empty_every and i % empty_every == 0) else int(rng.integers(1, max_m))
        lesion = np.zeros(size, bool)
        lesion[rng.choice(size, m, replace=False)] = True
        cases.append((f"c{i}", prob, lesion))
    return cases


EPS = [0.0, 0.05, 0.1, 0.2, 0.29, 0.3, 0.5, 0.7, 1 / 3, 0.999, 1.0]


# ----------------------------------------------------------------------------- critical cutoffs


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("tie_levels", [None, 4, 1])
def test_critical_cutoff_matches_brute_force(dtype, tie_levels):
    rng = np.random.default_rng(1)
    for _, prob, lesion in make_cases(rng, 25, empty_every=7, tie_levels=tie_levels, dtype=dtype):
        for eps in EPS:
            got = critical_cutoff(prob, lesion, eps)
            assert got == brute_critical(prob[lesion], eps), (eps,)
            assert isinstance(got, float)


@pytest.mark.parametrize("tie_levels", [None, 3, 1])
def test_critical_cutoffs_on_float32_summaries_match_brute_force(tie_levels):
    rng = np.random.default_rng(2)
    cases = make_cases(rng, 30, empty_every=6, tie_levels=tie_levels, dtype=np.float32)
    summ = LesionSummaries.from_volumes(cases)
    for eps in EPS:
        got = critical_cutoffs(summ, eps)
        assert got.dtype == np.float64 and got.shape == (30,)
        expected = [brute_critical(p[l], eps) for _, p, l in cases]
        assert got.tolist() == expected, eps
        # the single-case routine agrees
        assert got.tolist() == [critical_cutoff(p, l, eps) for _, p, l in cases]


def test_critical_cutoffs_from_float64_maps_are_rounded_down():
    """float64 maps are stored rounded towards -inf to float32: cutoffs are the round-down of the exact ones."""
    rng = np.random.default_rng(3)
    cases = make_cases(rng, 20, dtype=np.float64)
    summ = LesionSummaries.from_volumes(cases)
    assert summ.values.dtype == np.float32
    for eps in [0.0, 0.1, 0.29, 0.5]:
        got = critical_cutoffs(summ, eps)
        exact = np.array([critical_cutoff(p, l, eps) for _, p, l in cases])
        assert np.all(got <= exact)
        assert got.tolist() == [round_down_f32(x) if np.isfinite(x) else x for x in exact]


def test_empty_lesion_and_epsilon_one_give_inf():
    prob = np.linspace(0, 1, 50, dtype=np.float32)
    assert critical_cutoff(prob, np.zeros(50, bool), 0.1) == INF
    lesion = prob > 0.3
    assert critical_cutoff(prob, lesion, 1.0) == INF
    assert critical_cutoff(prob, lesion, 0.0) == float(prob[lesion].min())
    summ = LesionSummaries.from_volumes([("a", prob, lesion), ("b", prob, np.zeros(50, bool))])
    assert critical_cutoffs(summ, 1.0).tolist() == [INF, INF]
    assert critical_cutoffs(summ, 0.0).tolist() == [float(prob[lesion].min()), INF]


def test_critical_cutoff_all_ties():
    prob = np.full(10, 0.5, np.float32)
    lesion = np.ones(10, bool)
    for eps in [0.0, 0.1, 0.5, 0.9]:
        assert critical_cutoff(prob, lesion, eps) == 0.5
    assert critical_cutoff(prob, lesion, 1.0) == INF


def test_critical_cutoff_float_trap_0_29():
    """m = 100, eps = 0.29: 29 misses are allowed (float gives floor(28.999..) = 28)."""
    prob = (np.arange(100, dtype=np.float32) + 1) / np.float32(128)  # distinct, exact
    lesion = np.ones(100, bool)
    c = critical_cutoff(prob, lesion, 0.29)
    assert c == float(prob[29])  # voxels 0..28 (29 of them) are missed
    summ = LesionSummaries.from_volumes([("a", prob, lesion)])
    assert critical_cutoffs(summ, 0.29).tolist() == [float(prob[29])]
    assert critical_cutoffs(summ, 0.7).tolist() == [float(prob[70])]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    values=st.lists(
        st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 0.25, 0.5, 1.0])), min_size=1, max_size=40
    ),
    epsilon=st.one_of(st.floats(1e-12, 1), st.sampled_from([0.0, 0.1, 0.29, 0.7, 1.0])),
)
def test_critical_cutoff_property(values, epsilon):
    v = np.array(values, dtype=np.float32)
    lesion = np.ones(v.size, bool)
    c = critical_cutoff(v, lesion, epsilon)
    v64 = v.astype(np.float64)
    assert fnr_ok(v64, c, epsilon)
    if np.isfinite(c):
        assert not fnr_ok(v64, float(np.nextafter(c, INF)), epsilon)
        assert c in set(v64.tolist())
    else:
        assert fnr_ok(v64, INF, epsilon)
    summ = LesionSummaries.from_sorted([("x", np.sort(v)[::-1])])
    assert critical_cutoffs(summ, epsilon).tolist() == [c]


def test_critical_cutoffs_tiny_epsilon_behaves_like_zero():
    """eps = 1e-20 is a valid tolerance (fewer than 1 miss allowed for any lesion below 10^20 voxels)."""
    rng = np.random.default_rng(4)
    summ = LesionSummaries.from_volumes(make_cases(rng, 5))
    np.testing.assert_array_equal(critical_cutoffs(summ, 1e-20), critical_cutoffs(summ, 0.0))


# ----------------------------------------------------------------------------- conformal cutoff (eq. 5)


@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.05, 0.3, 0.7, 1 / 3, 0.5, 0.01])
def test_conformal_lower_cutoff_matches_eq5(alpha):
    rng = np.random.default_rng(5)
    for n in list(range(0, 30)) + [50, 99, 100]:
        for ties in (False, True):
            c = rng.integers(0, 4, n) / 3.0 if ties else rng.random(n)
            c = np.where(rng.random(n) < 0.15, INF, c)
            got = conformal_lower_cutoff(c, alpha)
            assert got == brute_eq5(c, alpha), (n, alpha)


def test_conformal_lower_cutoff_known():
    c = np.arange(1, 10) / 10.0  # n = 9
    assert conformal_lower_cutoff(c, 0.1) == 0.1  # k = 9: the smallest
    assert conformal_lower_cutoff(c, 0.2) == 0.2  # k = ceil(0.8 * 10) = 8
    assert conformal_lower_cutoff(c[:8], 0.1) == -INF  # k = 9 > 8
    assert conformal_lower_cutoff([], 0.5) == -INF


def test_calibrate_cls_warns_when_too_small():
    rng = np.random.default_rng(6)
    summ = LesionSummaries.from_volumes(make_cases(rng, 5))
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b9\b"):
        res = calibrate_cls(summ, 0.1, 0.1)
    assert res.probability_threshold == -INF and res.is_trivial
    assert res.n == 5 and res.rank == 6
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b19\b"):
        calibrate_cls(summ, 0.1, 0.05)
    with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b99\b"):
        calibrate_cls(summ, 0.1, 0.01)


def test_calibrate_cls_no_warning_when_large_enough():
    rng = np.random.default_rng(7)
    cases = make_cases(rng, 9)
    summ = LesionSummaries.from_volumes(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = calibrate_cls(summ, 0.2, 0.1)
    expected = min(brute_critical(p[l], 0.2) for _, p, l in cases)  # k = 9 = n: the smallest
    assert res.probability_threshold == expected and res.rank == 9 and not res.is_trivial


@pytest.mark.parametrize(
    "eps, alpha", [(0.1, 0.1), (0.29, 0.2), (0.0, 0.05), (0.5, 0.3), (1 / 3, 1 / 3), (1.0, 0.1), (0.7, 0.7)]
)
def test_calibrate_cls_empty_policies(eps, alpha):
    rng = np.random.default_rng(8)
    cases = make_cases(rng, 40, empty_every=5)
    summ = LesionSummaries.from_volumes(cases)
    crit = [brute_critical(p[l], eps) for _, p, l in cases]
    has = [bool(l.any()) for _, _, l in cases]
    res_ex = calibrate_cls(summ, eps, alpha)
    assert res_ex.n == sum(has) and res_ex.n_excluded_empty == 40 - sum(has)
    assert res_ex.probability_threshold == brute_eq5([c for c, h in zip(crit, has) if h], alpha)
    assert res_ex.rank == brute_rank(sum(has), alpha)
    res_in = calibrate_cls(summ, eps, alpha, empty="include")
    assert res_in.n == 40 and res_in.n_excluded_empty == 0
    assert res_in.probability_threshold == brute_eq5(crit, alpha)
    # including lesion-free cases (cutoff +inf) can only raise the threshold
    assert res_in.probability_threshold >= res_ex.probability_threshold
    assert res_ex.method == "cls" and res_ex.epsilon == eps and res_ex.alpha == alpha


def test_calibrate_cls_errors():
    prob = np.linspace(0, 1, 10, dtype=np.float32)
    only_empty = LesionSummaries.from_volumes([("a", prob, np.zeros(10, bool))] * 3)
    with pytest.raises(ConformalSegError):
        calibrate_cls(only_empty, 0.1, 0.5)
    res = calibrate_cls(only_empty, 0.1, 0.5, empty="include")  # k = 2 <= 3, all cutoffs +inf
    assert res.probability_threshold == INF
    summ = LesionSummaries.from_volumes([("a", prob, prob > 0.5)] * 3)
    with pytest.raises(ConformalSegError):
        calibrate_cls(summ, 0.1, 0.5, empty="drop")
    for bad_alpha in (0, 1, 1.5, float("nan")):
        with pytest.raises(ConformalSegError):
            calibrate_cls(summ, 0.1, bad_alpha)
    for bad_eps in (-0.1, 1.1, float("nan")):
        with pytest.raises(ConformalSegError):
            calibrate_cls(summ, bad_eps, 0.5)


def test_calibrated_threshold_meets_definition_on_calibration_cases():
    """At c_hat, at least k calibration cases have FNR <= eps; just above it, fewer than k do."""
    rng = np.random.default_rng(9)
    cases = make_cases(rng, 50)
    summ = LesionSummaries.from_volumes(cases)
    for eps, alpha in [(0.1, 0.1), (0.3, 0.2), (0.05, 0.05)]:
        res = calibrate_cls(summ, eps, alpha)
        c = res.probability_threshold
        ok_at = sum(fnr_ok(p[l].astype(np.float64), c, eps) for _, p, l in cases)
        ok_above = sum(fnr_ok(p[l].astype(np.float64), float(np.nextafter(c, INF)), eps) for _, p, l in cases)
        assert ok_at >= res.rank > ok_above
        # masks from apply_threshold agree with the exact definition
        for _, p, _lesion in cases[:10]:
            mask = apply_threshold(p, c)
            assert np.array_equal(mask, p.astype(np.float64) >= c)


# ----------------------------------------------------------------------------- apply_threshold


def test_apply_threshold_keeps_voxel_equal_to_cutoff():
    p = np.array([0.1, 0.3, 0.5, 0.7], dtype=np.float32)
    c = float(p[2])
    assert apply_threshold(p, c).tolist() == [False, False, True, True]
    above = float(np.nextafter(c, INF))  # float64 just above a float32 value: not representable in float32
    assert apply_threshold(p, above).tolist() == [False, False, False, True]
    below = float(np.nextafter(c, -INF))
    assert apply_threshold(p, below).tolist() == [False, False, True, True]


def test_apply_threshold_non_representable_cutoff():
    f = np.float32(0.1)  # 0.100000001490116... > 0.1
    prev = np.nextafter(f, np.float32(0))  # < 0.1
    p = np.array([prev, f, np.nextafter(f, np.float32(1))], dtype=np.float32)
    assert apply_threshold(p, 0.1).tolist() == [False, True, True]
    # a cutoff between prev and f, closer to prev: float32(c) rounds down to prev, which must not be kept
    c = float(prev) + (float(f) - float(prev)) * 0.25
    assert np.float32(c) == prev
    assert apply_threshold(p, c).tolist() == [False, True, True]
    assert round_up_to_dtype(c, np.float32) == f


def test_apply_threshold_infinite_and_dtypes():
    p = np.random.default_rng(10).random((3, 4, 5)).astype(np.float32)
    assert apply_threshold(p, -INF).all() and apply_threshold(p, -INF).shape == p.shape
    assert not apply_threshold(p, INF).any()
    p64 = p.astype(np.float64)
    assert np.array_equal(apply_threshold(p64, 0.5), p64 >= 0.5)
    p16 = p.astype(np.float16)
    assert np.array_equal(apply_threshold(p16, 0.3), p16.astype(np.float64) >= 0.3)
    u8 = (p * 255).astype(np.uint8)
    assert np.array_equal(apply_threshold(u8, 100.5), u8 >= 101)


def test_apply_threshold_out_argument():
    p = np.random.default_rng(12).random((4, 5)).astype(np.float32)
    out = np.zeros(p.shape, bool)
    for c in [0.3, float(p[1, 2]), -INF, INF, 0.3]:
        res = apply_threshold(p, c, out=out)
        assert res is out
        assert np.array_equal(out, p.astype(np.float64) >= c)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=30),
    cutoff=st.one_of(st.floats(-0.1, 1.1), st.floats(0, 1, width=32)),
    nudge=st.sampled_from([-1, 0, 1]),
)
def test_apply_threshold_property(values, cutoff, nudge):
    p = np.array(values, dtype=np.float32)
    if nudge:
        cutoff = float(np.nextafter(cutoff, nudge * INF))
    assert np.array_equal(apply_threshold(p, cutoff), p.astype(np.float64) >= cutoff)


# ----------------------------------------------------------------------------- uint16 summaries


def test_uint16_cutoffs_are_conservative_and_close():
    rng = np.random.default_rng(11)
    cases = make_cases(rng, 40, empty_every=9)
    # add values that sit exactly on (float64 renderings of) the uint16 grid and just around it
    grid = np.array([k / 65535 for k in (1, 2, 7, 32767, 65534)], dtype=np.float64)
    special = np.concatenate([grid, np.nextafter(grid, 0), np.nextafter(grid, 2), [0.0, 1.0]])
    cases.append(("special", special, np.ones(special.size, bool)))
    s32 = LesionSummaries.from_volumes(cases, precision="float32")
    s16 = LesionSummaries.from_volumes(cases, precision="uint16")
    assert s16.values.dtype == np.uint16
    # each code q is the largest one whose decoded float64 value q / 65535 does not exceed the probability
    for (_, p, l), i in zip(cases, range(len(cases))):
        v = np.sort(p[l].astype(np.float64))[::-1]
        q = s16.values[s16.offsets[i] : s16.offsets[i + 1]].astype(np.int64)
        assert np.all(q / 65535.0 <= v)
        assert np.all((q == 65535) | ((q + 1) / 65535.0 > v))
        np.testing.assert_array_equal(s16.case(i), q / 65535.0)
    float32_input = np.array([p.dtype == np.float32 for _, p, _ in cases])
    for eps in [0.0, 0.1, 0.29, 0.5, 0.9]:
        exact = np.array([critical_cutoff(p, l, eps) for _, p, l in cases])  # from the maps themselves
        c32 = critical_cutoffs(s32, eps)
        c16 = critical_cutoffs(s16, eps)
        finite = np.isfinite(exact)
        assert np.array_equal(finite, np.isfinite(c16)) and np.array_equal(finite, np.isfinite(c32))
        assert np.array_equal(c32[float32_input], exact[float32_input])  # float32 maps are stored exactly
        assert np.all(c32[finite] <= exact[finite])
        assert np.all(c16[finite] <= exact[finite])  # conservative
        assert np.all(exact[finite] - c16[finite] <= 1 / 65535 + 1e-12)  # and at most one code below
        # on float32 maps: uint16 cutoffs <= float32 cutoffs
        both = finite & float32_input
        assert np.all(c16[both] <= c32[both])
        for alpha in [0.1, 0.2]:
            t32 = calibrate_cls(s32, eps, alpha).probability_threshold
            t16 = calibrate_cls(s16, eps, alpha).probability_threshold
            t_exact = brute_eq5(exact[[bool(l.any()) for _, _, l in cases]], alpha)
            assert t16 <= t_exact and t32 <= t_exact
            if np.isfinite(t_exact):
                assert t_exact - t16 <= 1 / 65535 + 1e-12
