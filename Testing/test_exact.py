"""Exact integer roundings (ConformalSegLib.conformal.exact) against brute-force Fraction arithmetic.

Convention under test: a float parameter ``x`` stands for ``Fraction(repr(x))`` (the shortest decimal
that round-trips), and the conformal rank / allowed misses are computed exactly from it.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.conformal.exact import (  # noqa: E402
    allowed_misses,
    allowed_misses_array,
    as_fraction,
    check_alpha,
    check_epsilon,
    conformal_rank,
    fnr_exceeds,
    min_calibration_size,
)

# ----------------------------------------------------------------------------- brute forces


def frac(x: float) -> Fraction:
    return Fraction(repr(float(x)))


def brute_rank(n: int, alpha: float) -> int:
    """Smallest integer k with k >= (1 - alpha)(n + 1), found by scanning (no ceil)."""
    target = (1 - frac(alpha)) * (n + 1)
    k = 0
    while Fraction(k) < target:
        k += 1
    return k


def brute_min_n(alpha: float) -> int:
    """Smallest n whose conformal rank is <= n (scan)."""
    n = 0
    while brute_rank(n, alpha) > n:
        n += 1
    return n


def brute_misses(m: int, epsilon: float) -> int:
    """Largest integer d with d <= epsilon * m, i.e. d / m <= epsilon (exact)."""
    e = frac(epsilon)
    # binary search on d in [0, m] (works for huge m too)
    lo, hi = 0, m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if Fraction(mid) <= e * m:
            lo = mid
        else:
            hi = mid - 1
    return lo


ALPHAS = [
    0.1,
    0.2,
    0.05,
    0.3,
    0.7,
    1 / 3,
    0.01,
    0.15,
    0.25,
    0.5,
    0.9,
    0.99,
    0.001,
    0.6,
    0.45,
    0.35,
    0.12,
    2 / 3,
    0.0999999999999999,
    0.1000000000000001,
    0.123456789012345,
]
NS = list(range(0, 60)) + [99, 100, 199, 999, 1000, 12345]


# ----------------------------------------------------------------------------- conformal rank


@pytest.mark.parametrize("alpha", ALPHAS)
def test_conformal_rank_matches_brute_force(alpha):
    for n in NS:
        assert conformal_rank(n, alpha) == brute_rank(n, alpha), (n, alpha)


@pytest.mark.parametrize(
    "n, alpha, expected",
    [
        (9, 0.1, 9),
        (19, 0.05, 19),
        (4, 0.2, 4),
        (99, 0.1, 90),
        (9, 0.3, 7),
        (9, 0.7, 3),
        (2, 1 / 3, 3),
        (5, 0.5, 3),
        (0, 0.1, 1),
        (39, 0.05, 38),
        (29, 0.1, 27),
        (20, 0.1, 19),
        (100, 0.1, 91),
    ],
)
def test_conformal_rank_known_values(n, alpha, expected):
    assert conformal_rank(n, alpha) == expected


def test_rank_grid_contains_float_traps():
    """The grid above is meaningful: naive float evaluation is wrong for some of its (n, alpha)."""
    wrong = [(n, a) for a in ALPHAS for n in NS if math.ceil((1 - a) * (n + 1)) != brute_rank(n, a)]
    assert wrong, "expected at least one float-rounding trap in the grid"
    for n, a in wrong:
        assert conformal_rank(n, a) == brute_rank(n, a)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    alpha=st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
    n=st.integers(min_value=0, max_value=10**6),
)
def test_conformal_rank_property(alpha, n):
    k = conformal_rank(n, alpha)
    a = frac(alpha)
    assert isinstance(k, int)
    # k is the ceiling: k - 1 < (1-a)(n+1) <= k, exactly
    assert Fraction(k - 1) < (1 - a) * (n + 1) <= Fraction(k)


def test_conformal_rank_negative_n():
    with pytest.raises(ValueError):
        conformal_rank(-1, 0.1)


# ----------------------------------------------------------------------------- minimum calibration size


@pytest.mark.parametrize("alpha", [a for a in ALPHAS if a >= 0.01])
def test_min_calibration_size_matches_scan(alpha):
    n_min = min_calibration_size(alpha)
    assert n_min == brute_min_n(alpha)
    assert conformal_rank(n_min, alpha) <= n_min
    if n_min > 0:
        assert conformal_rank(n_min - 1, alpha) > n_min - 1


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.1, 9),
        (0.05, 19),
        (0.2, 4),
        (0.5, 1),
        (0.25, 3),
        (0.3, 3),
        (0.7, 1),
        (1 / 3, 3),
        (0.01, 99),
        (0.9, 1),
        (0.99, 1),
    ],
)
def test_min_calibration_size_known(alpha, expected):
    assert min_calibration_size(alpha) == expected


@settings(max_examples=200, deadline=None, derandomize=True)
@given(alpha=st.floats(min_value=0.002, max_value=1, exclude_max=True))
def test_min_calibration_size_property(alpha):
    n = min_calibration_size(alpha)
    assert conformal_rank(n, alpha) <= n
    assert n == 0 or conformal_rank(n - 1, alpha) > n - 1


# ----------------------------------------------------------------------------- allowed misses


EPSILONS = [
    0.0,
    1.0,
    0.1,
    0.29,
    0.7,
    0.3,
    0.05,
    0.2,
    1 / 3,
    0.123456789012345,
    0.57,
    0.99,
    0.01,
    0.07,
    0.14,
    0.58,
    0.33,
    0.0001,
]
SIZES = list(range(0, 120)) + [1000, 1001, 65535, 10**6, 10**9 + 7, 10**12]


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_allowed_misses_matches_brute_force(epsilon):
    for m in SIZES:
        assert allowed_misses(m, epsilon) == brute_misses(m, epsilon), (m, epsilon)
    arr = allowed_misses_array(np.array(SIZES, dtype=np.int64), epsilon)
    assert arr.dtype == np.int64
    assert arr.tolist() == [brute_misses(m, epsilon) for m in SIZES]


@pytest.mark.parametrize(
    "m, epsilon, expected",
    [
        (100, 0.29, 29),
        (10, 0.7, 7),
        (10, 0.3, 3),
        (100, 0.57, 57),
        (100, 0.58, 58),
        (10, 0.1, 1),
        (3, 1 / 3, 0),
        (10**12, 0.123456789012345, 123456789012),
        (7, 0.0, 0),
        (7, 1.0, 7),
        (0, 0.5, 0),
        (100, 0.14, 14),
        (100, 0.07, 7),
    ],
)
def test_allowed_misses_known(m, epsilon, expected):
    assert allowed_misses(m, epsilon) == expected
    assert allowed_misses_array(np.array([m]), epsilon).tolist() == [expected]


def test_allowed_misses_grid_contains_float_traps():
    wrong = [(m, e) for e in EPSILONS for m in SIZES[:120] if math.floor(e * m) != brute_misses(m, e)]
    assert wrong, "expected at least one float-rounding trap in the grid"
    assert math.floor(0.29 * 100) == 28  # 0.29 * 100 = 28.999999999999996
    assert allowed_misses(100, 0.29) == 29


def test_allowed_misses_array_overflow_path():
    """int64 fast path vs Python-int path around p * m = 2**62, and huge sizes."""
    eps = 0.123456789012345
    p = frac(eps).numerator
    edge = 2**62 // p
    sizes = np.array([0, 1, 5, edge - 1, edge, edge + 1, 10**12, 2**40 + 3], dtype=np.int64)
    expected = [brute_misses(int(m), eps) for m in sizes]
    assert allowed_misses_array(sizes, eps).tolist() == expected
    # each size alone (so that each path is taken for the small ones too)
    for m, e in zip(sizes, expected):
        assert allowed_misses_array(np.array([m]), eps).tolist() == [e]
    # sizes near the int64 limit with a short epsilon
    big = np.array([2**62 + 1, 2**63 - 1], dtype=np.int64)
    assert allowed_misses_array(big, 0.7).tolist() == [brute_misses(int(m), 0.7) for m in big]


def test_allowed_misses_array_empty_and_shapes():
    out = allowed_misses_array(np.zeros(0, dtype=np.int64), 0.3)
    assert out.dtype == np.int64 and out.size == 0
    assert allowed_misses_array([10, 20, 0], 0.25).tolist() == [2, 5, 0]


@pytest.mark.parametrize("epsilon", [1e-20, 1e-19, 3e-19, 5e-324])
def test_allowed_misses_array_tiny_epsilon(epsilon):
    """A valid but tiny epsilon has a denominator above int64: the result must still be exact (0 misses
    for any realistic lesion), not an OverflowError."""
    sizes = np.array([0, 1, 100, 10**6], dtype=np.int64)
    assert [allowed_misses(int(m), epsilon) for m in sizes] == [0, 0, 0, 0]
    assert allowed_misses_array(sizes, epsilon).tolist() == [0, 0, 0, 0]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    epsilon=st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1)),  # tiny eps: see test above
    sizes=st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=6),
)
def test_allowed_misses_property(epsilon, sizes):
    e = frac(epsilon)
    arr = allowed_misses_array(np.array(sizes, dtype=np.int64), epsilon)
    for m, d in zip(sizes, arr.tolist()):
        assert allowed_misses(m, epsilon) == d
        assert Fraction(d) <= e * m < Fraction(d + 1)


def test_fnr_exceeds_exact():
    sizes = np.array([100, 100, 10, 10, 0, 3])
    misses = np.array([29, 30, 7, 8, 0, 1])
    assert fnr_exceeds(misses, sizes, 0.29).tolist() == [False, True, True, True, False, True]
    assert fnr_exceeds(misses, sizes, 0.7).tolist() == [False, False, False, True, False, False]
    assert bool(fnr_exceeds(29, 100, 0.29)) is False
    assert bool(fnr_exceeds(30, 100, 0.29)) is True


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), -float("inf"), "abc", None])
def test_invalid_alpha_raises(bad):
    with pytest.raises(ConformalSegError):
        check_alpha(bad)
    with pytest.raises(ConformalSegError):
        conformal_rank(10, bad)
    with pytest.raises(ConformalSegError):
        min_calibration_size(bad)


@pytest.mark.parametrize("bad", [-0.1, -1e-300, 1.0000000000000002, 2, float("nan"), float("inf"), "x", None])
def test_invalid_epsilon_raises(bad):
    with pytest.raises(ConformalSegError):
        check_epsilon(bad)
    with pytest.raises(ConformalSegError):
        allowed_misses(10, bad)
    with pytest.raises(ConformalSegError):
        allowed_misses_array(np.array([10]), bad)


def test_boundary_epsilons_are_valid():
    assert check_epsilon(0.0) == 0 and check_epsilon(1.0) == 1
    assert check_alpha("0.1") == Fraction(1, 10)  # numeric strings are read like floats


def test_as_fraction_is_shortest_decimal():
    assert as_fraction(0.1) == Fraction(1, 10)
    assert as_fraction(0.29) == Fraction(29, 100)
    assert as_fraction(np.float64(0.7)) == Fraction(7, 10)
    assert as_fraction(1 / 3) == Fraction(3333333333333333, 10**16)
    with pytest.raises(ConformalSegError):
        as_fraction(float("nan"))
