"""Conformal confidence sets (ConformalSegLib.conformal.confidence_sets) and score transforms
(ConformalSegLib.conformal.score_transforms)."""

from __future__ import annotations

import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage, special

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal.confidence_sets import (  # noqa: E402
    SetsCalibration,
    SetStatistics,
    SetStatisticsBuilder,
    apply_sets,
    calibrate_sets,
    case_statistics,
    conformal_upper_quantile,
    resolve_levels,
    select_transforms,
)
from ConformalSegLib.conformal.exact import as_fraction  # noqa: E402
from ConformalSegLib.conformal.score_transforms import IDENTITY, ScoreTransform, parse_transform, signed_distance_mm  # noqa: E402

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


def brute_q(x, alpha: float) -> float:
    """Smallest value v among the scores with #{x_i <= v} >= k (k = conformal rank), +inf if k > n."""
    x = [float(v) for v in x]
    k = brute_rank(len(x), alpha)
    if k > len(x):
        return INF
    for v in sorted(set(x)):
        if sum(1 for y in x if y <= v) >= k:
            return v
    raise AssertionError


def brute_signed_distance(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """O(V^2) signed distance in mm between voxel centres: +min distance to a voxel outside the mask for
    voxels inside, -min distance to a mask voxel for voxels outside."""
    coords = np.indices(mask.shape).reshape(3, -1).T * np.asarray(spacing_zyx, dtype=np.float64)
    flat = mask.ravel()
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    out = np.empty(flat.size)
    out[flat] = d[np.ix_(flat, ~flat)].min(axis=1)
    out[~flat] = -d[np.ix_(~flat, flat)].min(axis=1)
    return out.reshape(mask.shape)


# ----------------------------------------------------------------------------- signed distance


def test_signed_distance_single_voxel_anisotropic():
    # ITK spacing (x, y, z) = (1, 2, 3) -> numpy (z, y, x) spacing (3, 2, 1)
    geom = Geometry((5, 5, 5), spacing=(1.0, 2.0, 3.0))
    mask = np.zeros(geom.shape, bool)
    mask[2, 2, 2] = True
    sd = signed_distance_mm(mask, geom)
    assert sd.dtype == np.float32
    assert sd[2, 2, 2] == 1.0  # nearest outside voxel is one x-step away (1 mm)
    assert sd[2, 2, 4] == -2.0  # two x-steps
    assert sd[2, 3, 2] == -2.0  # one y-step
    assert sd[3, 2, 2] == -3.0  # one z-step
    assert sd[4, 2, 2] == -6.0
    assert sd[3, 3, 2] == pytest.approx(-np.sqrt(13.0), rel=1e-6)
    assert sd[3, 3, 3] == pytest.approx(-np.sqrt(14.0), rel=1e-6)


def test_signed_distance_slab():
    geom = Geometry((8, 3, 4), spacing=(0.5, 0.7, 2.5))  # z spacing 2.5
    mask = np.zeros(geom.shape, bool)
    mask[:3] = True  # z = 0, 1, 2 inside
    sd = signed_distance_mm(mask, geom)
    # inside: distance to z = 3 (the edt ignores the array border)
    np.testing.assert_allclose(sd[0], 7.5)
    np.testing.assert_allclose(sd[2], 2.5)
    np.testing.assert_allclose(sd[3], -2.5)
    np.testing.assert_allclose(sd[7], -12.5)


@pytest.mark.parametrize("seed", range(4))
def test_signed_distance_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.4, 3.0, 3))
    geom = Geometry((4, 5, 6), spacing=spacing)
    mask = rng.random(geom.shape) < rng.uniform(0.1, 0.6)
    mask[0, 0, 0], mask[-1, -1, -1] = True, False
    sd = signed_distance_mm(mask, geom)
    np.testing.assert_allclose(sd, brute_signed_distance(mask, geom.spacing_zyx), rtol=1e-6)
    # antisymmetric for the complement, and never zero
    np.testing.assert_array_equal(signed_distance_mm(~mask, geom), -sd)
    assert np.all(np.abs(sd) >= min(spacing) * (1 - 1e-6))
    assert np.all((sd > 0) == mask)


def test_signed_distance_empty_and_full():
    geom = Geometry((3, 4, 5), spacing=(0.5, 2.0, 3.0))
    diag = float(np.sqrt((5 * 0.5) ** 2 + (4 * 2.0) ** 2 + (3 * 3.0) ** 2))
    empty = signed_distance_mm(np.zeros(geom.shape, bool), geom)
    full = signed_distance_mm(np.ones(geom.shape, bool), geom)
    assert empty.dtype == np.float32 and full.dtype == np.float32
    np.testing.assert_allclose(empty, -diag, rtol=1e-6)
    np.testing.assert_allclose(full, diag, rtol=1e-6)
    np.testing.assert_array_equal(full, -empty)
    with pytest.raises(ValueError):
        signed_distance_mm(np.zeros((3, 4, 6), bool), geom)


def test_distance_transform_uses_level():
    geom = Geometry((1, 1, 6))
    prob = np.array([0.1, 0.3, 0.45, 0.5, 0.7, 0.9], np.float32).reshape(1, 1, 6)
    t05 = parse_transform("distance")(prob, geom)
    np.testing.assert_array_equal(t05, signed_distance_mm(prob >= 0.5, geom))
    t04 = parse_transform("distance:0.4")(prob, geom)
    np.testing.assert_array_equal(t04, signed_distance_mm(prob >= 0.4, geom))
    np.testing.assert_array_equal(t05.ravel(), [-3, -2, -1, 1, 2, 3])


# ----------------------------------------------------------------------------- gaussian


def test_gaussian_sigma_in_mm_honours_anisotropic_spacing():
    geom = Geometry((9, 8, 7), spacing=(0.5, 1.0, 2.5))  # numpy (z, y, x) spacing (2.5, 1.0, 0.5)
    prob = np.random.default_rng(0).random(geom.shape).astype(np.float32)
    out = parse_transform("gaussian:2")(prob, geom)
    expected = ndimage.gaussian_filter(prob, [2 / 2.5, 2 / 1.0, 2 / 0.5], mode="nearest")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    wrong = ndimage.gaussian_filter(prob, [2 / 0.5, 2 / 1.0, 2 / 2.5], mode="nearest")
    assert not np.allclose(out, wrong, atol=1e-3)


def test_gaussian_impulse_response_has_sigma_mm_on_every_axis():
    """Independent check: the impulse response's variance along each axis, in mm^2, is sigma^2."""
    geom = Geometry((17, 33, 65), spacing=(0.5, 1.0, 2.0))  # numpy spacing (2, 1, 0.5): sigma_vox (2, 4, 8)
    sigma = 4.0
    impulse = np.zeros(geom.shape, np.float32)
    centre = tuple(s // 2 for s in geom.shape)
    impulse[centre] = 1.0
    out = parse_transform(f"gaussian:{sigma:g}")(impulse, geom).astype(np.float64)
    assert out.sum() == pytest.approx(1.0, rel=1e-4)
    for axis, spacing in zip(range(3), geom.spacing_zyx):
        other = tuple(a for a in range(3) if a != axis)
        profile = out.sum(axis=other)
        pos = (np.arange(profile.size) - centre[axis]) * spacing
        var = float((profile * pos**2).sum() / profile.sum())
        assert var == pytest.approx(sigma**2, rel=0.03), axis


def test_transforms_are_antisymmetric():
    rng = np.random.default_rng(1)
    geom = Geometry((6, 7, 8), spacing=(0.8, 1.2, 2.0))
    s = ndimage.gaussian_filter(rng.standard_normal(geom.shape), 1.0).astype(np.float32)
    for name in ["identity", "gaussian:1.5"]:
        t = parse_transform(name)
        np.testing.assert_allclose(t(-s, geom), -t(s, geom), atol=1e-6)
    # the distance transform at level c: the complement mask {s < c} gives the negated map
    mask = s >= 0
    np.testing.assert_array_equal(signed_distance_mm(~mask, geom), -signed_distance_mm(mask, geom))


# ----------------------------------------------------------------------------- parse_transform


@pytest.mark.parametrize(
    "text, expected",
    [
        ("identity", ScoreTransform("identity")),
        (" Identity ", ScoreTransform("identity")),
        ("distance", ScoreTransform("distance", 0.5)),
        ("distance:0.4", ScoreTransform("distance", 0.4)),
        ("distance:1", ScoreTransform("distance", 1.0)),
        ("gaussian:2", ScoreTransform("gaussian", 2.0)),
        ("GAUSSIAN:0.75", ScoreTransform("gaussian", 0.75)),
    ],
)
def test_parse_transform_valid(text, expected):
    t = parse_transform(text)
    assert t == expected
    assert parse_transform(t.name) == t
    assert t.units == ("mm" if t.kind == "distance" else "probability")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "foo",
        "identity:2",
        "distance:0",
        "distance:-0.2",
        "distance:1.5",
        "distance:abc",
        "distance:nan",
        "gaussian",
        "gaussian:",
        "gaussian:0",
        "gaussian:-1",
        "gaussian:nan",
        "gaussian:inf",
        "gaussian:x",
        "gauss:2",
    ],
)
def test_parse_transform_errors(text):
    with pytest.raises(ConformalSegError):
        parse_transform(text)


@pytest.mark.parametrize(
    "transform",
    [ScoreTransform("gaussian", 1.2345678), ScoreTransform("gaussian", 1 / 3), ScoreTransform("distance", 0.123456789)],
)
def test_transform_name_round_trips(transform):
    """apply_sets rebuilds the transforms from the names stored in the calibration, so a name must
    parse back to exactly the transform the statistics were computed with."""
    assert parse_transform(transform.name) == transform


def test_apply_sets_uses_the_calibrated_gaussian():
    """End to end: statistics computed with gaussian sigma = 1.0000049999 mm (its name is "gaussian:1");
    the sets applied to the calibration cases must be exactly {T > lambda} and {T >= -lambda} for that
    same transform (the case that defines lambda has a voxel exactly at the threshold)."""
    rng = np.random.default_rng(2)
    geom = Geometry((10, 10, 10), spacing=(1.0, 1.0, 1.0))
    transform = ScoreTransform("gaussian", 1.0000049999)
    builder = SetStatisticsBuilder(transform, transform)
    cases = []
    for i in range(30):
        prob = rng.random(geom.shape).astype(np.float32)
        lesion = prob > 0.5
        builder.add_case(f"c{i}", prob, lesion, geom)
        cases.append((prob, lesion))
    cal = calibrate_sets(builder.build(), alpha=0.2, mode="joint-max")
    for prob, _ in cases:
        t = transform(prob, geom)
        inner, outer = apply_sets(prob, geom, cal)
        np.testing.assert_array_equal(outer, t.astype(np.float64) >= cal.outer_threshold)
        np.testing.assert_array_equal(inner, (t.astype(np.float64) > cal.inner_threshold) & outer)


# ----------------------------------------------------------------------------- case statistics


def random_case(rng, geom):
    """Smooth random lesion (15-40 % of the grid, never empty or full) and a noisy probability map."""
    field = ndimage.gaussian_filter(rng.standard_normal(geom.shape), 1.2)
    field /= field.std()
    thr = np.quantile(field, 1 - rng.uniform(0.15, 0.4))
    lesion = field > thr
    prob = special.expit(2.5 * (field - thr) + 0.8 * rng.standard_normal(geom.shape)).astype(np.float32)
    return prob, lesion


@pytest.mark.parametrize(
    "inner_name, outer_name",
    [
        ("identity", "identity"),
        ("distance", "distance"),
        ("distance:0.3", "identity"),
        ("gaussian:1.5", "distance"),
        ("identity", "gaussian:2"),
    ],
)
def test_case_statistics_match_brute_force(inner_name, outer_name):
    rng = np.random.default_rng(3)
    geom = Geometry((4, 5, 6), spacing=(0.7, 1.1, 2.3))
    inner_t, outer_t = parse_transform(inner_name), parse_transform(outer_name)

    def brute_transform(t, prob):
        if t.kind == "identity":
            return prob.astype(np.float64)
        if t.kind == "distance":
            mask = prob >= t.parameter
            if not mask.any() or mask.all():
                return signed_distance_mm(mask, geom).astype(np.float64)
            return brute_signed_distance(mask, geom.spacing_zyx)
        sig = [t.parameter / s for s in geom.spacing_zyx]
        return ndimage.gaussian_filter(prob.astype(np.float32), sig, mode="nearest").astype(np.float64)

    for _ in range(6):
        prob, lesion = random_case(rng, geom)
        tau, gamma = case_statistics(prob, lesion, geom, inner_t, outer_t)
        ti, to = brute_transform(inner_t, prob), brute_transform(outer_t, prob)
        assert tau == pytest.approx(ti[~lesion].max(), rel=1e-6)
        assert gamma == pytest.approx(-to[lesion].min(), rel=1e-6)


def test_case_statistics_empty_and_full_lesion():
    geom = Geometry((3, 3, 3))
    prob = np.random.default_rng(4).random(geom.shape).astype(np.float32)
    tau, gamma = case_statistics(prob, np.zeros(geom.shape, bool), geom)
    assert tau == float(prob.max()) and gamma == -INF
    tau, gamma = case_statistics(prob, np.ones(geom.shape, bool), geom)
    assert tau == -INF and gamma == -float(prob.min())


def test_set_statistics_builder_and_subsets():
    rng = np.random.default_rng(5)
    geom = Geometry((5, 5, 5))
    builder = SetStatisticsBuilder(IDENTITY, parse_transform("distance"))
    cases = [random_case(rng, geom) for _ in range(6)]
    cases.append((cases[0][0], np.zeros(geom.shape, bool)))
    for i, (prob, lesion) in enumerate(cases):
        builder.add_case(f"c{i}", prob, lesion, geom)
    stats = builder.build()
    assert stats.n == 7 and stats.inner_transform == "identity" and stats.outer_transform == "distance:0.5"
    assert stats.lesion_sizes.tolist() == [int(l.sum()) for _, l in cases]
    for i, (prob, lesion) in enumerate(cases):
        assert (stats.tau[i], stats.gamma[i]) == case_statistics(
            prob, lesion, geom, IDENTITY, parse_transform("distance")
        )
    ne = stats.without_empty()
    assert ne.n == sum(1 for _, l in cases if l.any()) and np.all(ne.lesion_sizes > 0)
    sub = stats.subset([2, 0])
    assert sub.case_ids == ("c2", "c0") and sub.tau.tolist() == [stats.tau[2], stats.tau[0]]
    again = SetStatistics.from_arrays(stats.to_arrays(), stats.case_ids, stats.inner_transform, stats.outer_transform)
    np.testing.assert_array_equal(again.tau, stats.tau)
    np.testing.assert_array_equal(again.gamma, stats.gamma)


# ----------------------------------------------------------------------------- calibration vs order statistics


def random_stats(rng, n, ties=False):
    # tau and gamma on overlapping ranges, so that max(tau, gamma) mixes both
    if ties:
        tau = rng.integers(0, 5, n) / 4.0
        gamma = rng.integers(-2, 5, n) / 4.0
    else:
        tau = rng.random(n)
        gamma = rng.random(n) * 1.2 - 0.3
    gamma = np.where(rng.random(n) < 0.1, -INF, gamma)  # empty lesions
    return SetStatistics(tau, gamma, tuple(f"c{i}" for i in range(n)))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [1, 4, 9, 10, 19, 20, 37, 100])
def test_calibrate_sets_matches_order_statistics(n, ties):
    rng = np.random.default_rng(n + 1000 * ties)
    stats = random_stats(rng, n, ties)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
        for a_in, a_out in [(0.1, 0.1), (0.05, 0.2), (0.3, 0.1), (1 / 3, 0.7)]:
            cal = calibrate_sets(stats, alpha_inner=a_in, alpha_outer=a_out, mode="marginal")
            assert cal.inner_threshold == brute_q(stats.tau, a_in)
            assert cal.outer_threshold == -brute_q(stats.gamma, a_out)
            assert cal.alpha == max(a_in, a_out) and cal.n == n
        for alpha in [0.1, 0.2, 0.3]:
            cal = calibrate_sets(stats, alpha=alpha, mode="joint-split")
            assert cal.inner_threshold == brute_q(stats.tau, alpha / 2)
            assert cal.outer_threshold == -brute_q(stats.gamma, alpha / 2)
            # explicit unequal levels (the default remainder is covered by the resolve_levels tests)
            cal = calibrate_sets(stats, alpha=alpha, alpha_inner=alpha / 4, alpha_outer=alpha / 2, mode="joint-split")
            assert cal.inner_threshold == brute_q(stats.tau, alpha / 4)
            assert cal.outer_threshold == -brute_q(stats.gamma, alpha / 2)
            assert (cal.alpha, cal.alpha_inner, cal.alpha_outer) == (alpha, alpha / 4, alpha / 2)
            cal = calibrate_sets(stats, alpha=alpha, mode="joint-max")
            lam = brute_q(np.maximum(stats.tau, stats.gamma), alpha)
            assert (cal.inner_threshold, cal.outer_threshold) == (lam, -lam)


def test_conformal_upper_quantile_known():
    x = np.arange(1, 20, dtype=float)  # n = 19
    assert conformal_upper_quantile(x, 0.1) == 18.0  # k = ceil(0.9 * 20) = 18
    assert conformal_upper_quantile(x, 0.05) == 19.0
    assert conformal_upper_quantile(x[:18], 0.05) == INF
    assert conformal_upper_quantile(x[:9], 0.1) == 9.0
    assert conformal_upper_quantile(x[:8], 0.1) == INF


def test_too_small_gives_trivial_sets_and_warning():
    rng = np.random.default_rng(6)
    geom = Geometry((6, 6, 6))
    stats = random_stats(rng, 5)
    for mode, kwargs in [
        ("marginal", dict(alpha=0.1)),
        ("joint-split", dict(alpha=0.2)),
        ("joint-max", dict(alpha=0.1)),
    ]:
        with pytest.warns(CalibrationSetTooSmallWarning, match=r"\b9\b"):
            cal = calibrate_sets(stats, mode=mode, **kwargs)
        assert cal.inner_threshold == INF and cal.outer_threshold == -INF
        inner, outer = apply_sets(rng.random(geom.shape).astype(np.float32), geom, cal)
        assert not inner.any() and outer.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_sets(stats, alpha=0.1, warn=False)
        calibrate_sets(random_stats(rng, 9), alpha=0.1)  # n = 9 is enough for alpha = 0.1
    with pytest.raises(ConformalSegError):
        calibrate_sets(random_stats(rng, 0), alpha=0.1)


# ----------------------------------------------------------------------------- resolve_levels


def test_resolve_levels_defaults_and_errors():
    assert resolve_levels(0.1, None, None, "marginal") == (0.1, 0.1, 0.1)
    assert resolve_levels(None, 0.05, 0.2, "marginal") == (0.2, 0.05, 0.2)
    assert resolve_levels(0.1, None, None, "joint-split") == (0.1, 0.05, 0.05)
    assert resolve_levels(0.1, None, None, "joint-max") == (0.1, 0.1, 0.1)
    alpha, a_in, a_out = resolve_levels(None, 0.1, 0.2, "joint-split")
    assert (a_in, a_out) == (0.1, 0.2) and as_fraction(alpha) == Fraction(3, 10)
    # sum exactly equal to alpha is allowed although 0.1 + 0.2 > 0.3 in floats
    assert resolve_levels(0.3, 0.1, 0.2, "joint-split") == (0.3, 0.1, 0.2)
    with pytest.raises(ConformalSegError, match="exceeds"):
        resolve_levels(0.1, 0.06, 0.05, "joint-split")
    with pytest.raises(ConformalSegError, match="exceeds"):
        resolve_levels(0.1, 0.1, 0.0000001, "joint-split")
    with pytest.raises(ConformalSegError):
        resolve_levels(0.1, None, None, "bogus")
    with pytest.raises(ConformalSegError):
        resolve_levels(None, 0.05, 0.05, "joint-max")
    with pytest.raises(ConformalSegError):
        resolve_levels(None, None, None, "marginal")
    with pytest.raises(ConformalSegError):
        resolve_levels(None, 0.1, None, "joint-split")
    with pytest.raises(ConformalSegError):
        resolve_levels(0.1, 0.1, None, "joint-split")  # alpha_outer would be 0
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConformalSegError):
            resolve_levels(bad, None, None, "marginal")
        with pytest.raises(ConformalSegError):
            resolve_levels(bad, None, None, "joint-max")
    with pytest.raises(ConformalSegError):
        calibrate_sets(
            random_stats(np.random.default_rng(0), 30),
            alpha=0.1,
            alpha_inner=0.08,
            alpha_outer=0.05,
            mode="joint-split",
        )


@pytest.mark.parametrize("alpha, alpha_inner", [(0.4, 0.1), (0.8, 0.1), (0.9, 0.3), (0.2, 0.05), (0.1, 0.03)])
def test_resolve_levels_default_outer_level_is_the_remainder(alpha, alpha_inner):
    """joint-split with --alpha and --alpha-inner only: alpha_outer defaults to the rest of alpha, and the
    exact check alpha_inner + alpha_outer <= alpha must then pass (e.g. 0.4 - 0.1 = 0.30000000000000004
    in floats, which must not make the call fail)."""
    a, a_in, a_out = resolve_levels(alpha, alpha_inner, None, "joint-split")
    assert a == alpha and a_in == alpha_inner
    assert as_fraction(a_in) + as_fraction(a_out) <= as_fraction(alpha)
    assert a_out == pytest.approx(alpha - alpha_inner, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.09940633485631407, 0.5918234795347169, 0.1, 0.3, 0.05])
def test_resolve_levels_default_halves_are_valid(alpha):
    """joint-split with only --alpha: the default halves must satisfy the exact union-bound check."""
    a, a_in, a_out = resolve_levels(alpha, None, None, "joint-split")
    assert as_fraction(a_in) + as_fraction(a_out) <= as_fraction(a)
    assert a_in == pytest.approx(alpha / 2) and a_out == pytest.approx(alpha / 2)


# ----------------------------------------------------------------------------- apply_sets semantics


def identity_calibration(inner_thr: float, outer_thr: float, transform: str = "identity") -> SetsCalibration:
    return SetsCalibration("marginal", 0.1, 0.1, 0.1, 20, inner_thr, outer_thr, transform, transform)


def test_apply_sets_inner_strict_outer_inclusive():
    geom = Geometry((1, 1, 6))
    prob = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32).reshape(geom.shape)
    inner, outer = apply_sets(prob, geom, identity_calibration(float(prob[0, 0, 4]), float(prob[0, 0, 1])))
    assert inner.ravel().tolist() == [False, False, False, False, False, True]  # 0.5 is not > 0.5
    assert outer.ravel().tolist() == [False, True, True, True, True, True]  # 0.2 >= 0.2


def test_apply_sets_non_representable_thresholds():
    geom = Geometry((1, 1, 4))
    f = np.float32(0.1)  # > 0.1
    prev = np.nextafter(f, np.float32(0))  # < 0.1
    prob = np.array([prev, f, np.float32(0.3), np.float32(0.9)], np.float32).reshape(geom.shape)
    inner, outer = apply_sets(prob, geom, identity_calibration(0.1, 0.1))
    assert inner.ravel().tolist() == [False, True, True, True]  # f > 0.1
    assert outer.ravel().tolist() == [False, True, True, True]  # f >= 0.1, prev < 0.1
    # inner threshold just below a float32 value (float32 cast would round up to that value)
    just_below = float(np.nextafter(float(f), -INF))
    assert np.float32(just_below) == f
    inner, _ = apply_sets(prob, geom, identity_calibration(just_below, 0.0))
    assert inner.ravel().tolist() == [False, True, True, True]
    # inner threshold just above f
    just_above = float(np.nextafter(float(f), INF))
    inner, outer = apply_sets(prob, geom, identity_calibration(just_above, just_above))
    assert inner.ravel().tolist() == [False, False, True, True]
    assert outer.ravel().tolist() == [False, False, True, True]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(0, 1, width=32), min_size=2, max_size=12),
    inner_thr=st.floats(-0.1, 1.1),
    outer_thr=st.floats(-0.1, 1.1),
)
def test_apply_sets_property(values, inner_thr, outer_thr):
    geom = Geometry((1, 1, len(values)))
    prob = np.array(values, np.float32).reshape(geom.shape)
    inner, outer = apply_sets(prob, geom, identity_calibration(inner_thr, outer_thr))
    p64 = prob.astype(np.float64)
    np.testing.assert_array_equal(outer, p64 >= outer_thr)
    np.testing.assert_array_equal(inner, (p64 > inner_thr) & outer)
    assert not np.any(inner & ~outer)


def test_apply_sets_with_distance_transform_in_mm():
    geom = Geometry((1, 1, 8), spacing=(1.5, 1.0, 1.0))
    prob = np.array([0.0, 0.1, 0.2, 0.6, 0.7, 0.8, 0.3, 0.1], np.float32).reshape(geom.shape)
    # signed distance (mm) to {prob >= 0.5} = voxels 3..5 along x with 1.5 mm spacing
    expected_t = np.array([-4.5, -3.0, -1.5, 1.5, 3.0, 1.5, -1.5, -3.0])
    np.testing.assert_allclose(parse_transform("distance")(prob, geom).ravel(), expected_t)
    inner, outer = apply_sets(prob, geom, identity_calibration(1.5, -1.5, "distance:0.5"))
    assert inner.ravel().tolist() == [False, False, False, False, True, False, False, False]
    assert outer.ravel().tolist() == [False, False, True, True, True, True, True, False]


def test_inner_subset_of_outer_on_real_calibration():
    rng = np.random.default_rng(7)
    geom = Geometry((8, 8, 8), spacing=(1.0, 1.0, 2.0))
    for name in ["identity", "distance", "gaussian:1.5"]:
        t = parse_transform(name)
        b = SetStatisticsBuilder(t, t)
        for i in range(25):
            b.add_case(f"c{i}", *random_case(rng, geom), geom)
        for mode, kw in [
            ("marginal", dict(alpha=0.2)),
            ("joint-split", dict(alpha=0.2)),
            ("joint-max", dict(alpha=0.2)),
        ]:
            cal = calibrate_sets(b.build(), mode=mode, **kw)
            for _ in range(3):
                prob, _ = random_case(rng, geom)
                inner, outer = apply_sets(prob, geom, cal)
                assert not np.any(inner & ~outer)
                tt = t(prob, geom).astype(np.float64)
                np.testing.assert_array_equal(outer, tt >= cal.outer_threshold)
                np.testing.assert_array_equal(inner, (tt > cal.inner_threshold) & outer)


# ----------------------------------------------------------------------------- transform selection


SEL_GEOM = Geometry((16, 16, 16), spacing=(1.0, 1.0, 1.5))


def noisy_blurred_case(rng):
    """Truth: a ball. Prediction: logit = 1.5 * (signed distance + shift) + strong white noise, i.e. a
    blurred, shifted truth corrupted voxel-wise; smoothing the map should tighten both sets."""
    zyx = np.indices(SEL_GEOM.shape).astype(float) * np.array(SEL_GEOM.spacing_zyx)[:, None, None, None]
    c = np.array(SEL_GEOM.shape) * np.array(SEL_GEOM.spacing_zyx) / 2 + rng.uniform(-2, 2, 3)
    truth = np.sqrt(((zyx - c[:, None, None, None]) ** 2).sum(0)) <= rng.uniform(4, 6)
    sd = signed_distance_mm(truth, SEL_GEOM)
    logit = 1.5 * (sd + rng.uniform(-1.5, 1.0)) + rng.normal(0, 2.5, SEL_GEOM.shape)
    return special.expit(logit).astype(np.float32), truth, SEL_GEOM


def test_select_transforms_prefers_smoothing_on_noisy_maps():
    rng = np.random.default_rng(8)
    cases = [noisy_blurred_case(rng) for _ in range(24)]
    cands = [IDENTITY, parse_transform("gaussian:1.5"), parse_transform("distance")]
    sel = select_transforms(cases, cands, alpha_inner=0.1, alpha_outer=0.1, repeats=8, seed=3)
    assert sel.inner != IDENTITY and sel.outer != IDENTITY
    assert sel.mean_inner_size[sel.inner.name] > sel.mean_inner_size["identity"]
    assert sel.mean_outer_size[sel.outer.name] < sel.mean_outer_size["identity"]
    assert sel.inner.name == max(sel.mean_inner_size, key=sel.mean_inner_size.get)
    assert sel.outer.name == min(sel.mean_outer_size, key=sel.mean_outer_size.get)
    assert sel.mean_inner_size["gaussian:1.5"] > 2 * sel.mean_inner_size["identity"]
    assert sel.mean_outer_size["gaussian:1.5"] < 0.7 * sel.mean_outer_size["identity"]
    V = SEL_GEOM.n_voxels
    for d in (sel.mean_inner_size, sel.mean_outer_size):
        assert set(d) == {c.name for c in cands} and all(0 <= v <= V for v in d.values())
    # deterministic by seed (also when the cases come from a generator)
    again = select_transforms(iter(cases), cands, alpha_inner=0.1, alpha_outer=0.1, repeats=8, seed=3)
    assert again == sel
    other = select_transforms(cases, cands, alpha_inner=0.1, alpha_outer=0.1, repeats=8, seed=4)
    assert other.mean_inner_size != sel.mean_inner_size  # a different seed gives different splits


def test_select_transforms_sizes_match_a_direct_computation():
    """With one repeat, recompute the held-out mean set sizes directly from the same split."""
    rng = np.random.default_rng(9)
    cases = [noisy_blurred_case(rng) for _ in range(10)]
    cands = [IDENTITY, parse_transform("gaussian:1.5")]
    sel = select_transforms(cases, cands, alpha_inner=0.2, alpha_outer=0.2, repeats=1, seed=11)
    perm = np.random.default_rng(11).permutation(10)
    cal_idx, held = perm[:5], perm[5:]
    for t in cands:
        stats = [case_statistics(p, l, g, t, t) for p, l, g in cases]
        tau = np.array([s[0] for s in stats])
        gamma = np.array([s[1] for s in stats])
        lam_in = brute_q(tau[cal_idx], 0.2)
        thr_out = -brute_q(gamma[cal_idx], 0.2)
        inner = np.mean([np.count_nonzero(t(cases[j][0], cases[j][2]).astype(np.float64) > lam_in) for j in held])
        outer = np.mean([np.count_nonzero(t(cases[j][0], cases[j][2]).astype(np.float64) >= thr_out) for j in held])
        assert sel.mean_inner_size[t.name] == pytest.approx(inner)
        assert sel.mean_outer_size[t.name] == pytest.approx(outer)


def test_select_transforms_errors():
    rng = np.random.default_rng(10)
    cases = [noisy_blurred_case(rng) for _ in range(3)]
    with pytest.raises(ConformalSegError):
        select_transforms(cases, [IDENTITY], alpha_inner=0.1, alpha_outer=0.1)
    with pytest.raises(ConformalSegError):
        select_transforms(cases + cases, [], alpha_inner=0.1, alpha_outer=0.1)


def test_joint_split_fills_the_missing_inner_level():
    alpha, inner, outer = resolve_levels(0.1, None, 0.08, "joint-split")
    assert (alpha, inner, outer) == (0.1, 0.02, 0.08)
